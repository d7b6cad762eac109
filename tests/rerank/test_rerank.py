"""`dr rerank`: each query's candidate set kept and reordered by the cross-encoder's logits under the tie
rule; resume after a crash; 2 ranks == 1 process; bad inputs -> exit 1 naming them, nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dr.io.runs import read_run
from tests.helpers import TOPICS, command, run, torchrun, write_jsonl

rerank = command("rerank")
N_QUERIES, N_DOCS, DEPTH = 7, 30, 5


def make_cross_encoder(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT with a fresh 1-output classification head + its tokenizer (what `dr train
    --model_type cross_encoder` writes, minus dr_cross_encoder.json)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from tests.helpers import write_vocab

    folder.mkdir(parents=True, exist_ok=True)
    write_vocab(folder)
    tokens = (folder / "vocab.txt").read_text().split()
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cross_dir(tmp_path_factory) -> Path:
    return make_cross_encoder(tmp_path_factory.mktemp("tiny-ce"))


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Corpus (passages of varied length, so batches pad), queries, and a first-stage run whose candidates
    differ per query; one query (q3) has fewer than DEPTH hits and one run line ties two scores."""
    docs = [
        {"docid": f"d{i}", "title": "", "text": " ".join([TOPICS[i % len(TOPICS)]] * (1 + i % 6) + ["story"])}
        for i in range(N_DOCS)
    ]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    queries = tmp_path / "queries.tsv"
    queries.write_text("".join(f"q{i}\twhat about {TOPICS[i]}\n" for i in range(N_QUERIES + 1)))  # one unused
    lines = []
    for i in range(N_QUERIES):
        hits = 3 if i == 3 else DEPTH + 2
        for r in range(hits):
            lines.append(
                f"q{i}\td{(i * 3 + r) % N_DOCS}\t{10.0 - r if r != 2 else 9.0}\n"
            )  # r=1,2 tie at 9.0
    run_file = tmp_path / "first.tsv"
    run_file.write_text("".join(lines))
    return {"corpus": corpus, "queries": queries, "run": run_file}


def _flags(cross_dir: Path, inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(cross_dir), "--run", str(inputs["run"]), "--input_run_format", "tevatron",
        "--corpus", str(inputs["corpus"]), "--queries", str(inputs["queries"]), "--depth", str(DEPTH),
        "--save_ranking_to", str(out), "--batch_size", "3", "--bf16", "false", *extra,
    ]  # fmt: skip


def _expected(cross_dir: Path, inputs: dict[str, Path]) -> dict[str, list[tuple[str, float]]]:
    """Each query's first DEPTH candidates scored one pair per forward (no padding at all), sorted by
    (score desc, docid desc): what the reranked run must hold, up to float rounding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(cross_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(cross_dir)
    texts = {json.loads(x)["docid"]: json.loads(x)["text"] for x in inputs["corpus"].read_text().splitlines()}
    queries = dict(line.split("\t") for line in inputs["queries"].read_text().splitlines())
    first, _ = read_run(inputs["run"], "tevatron")
    out = {}
    for qid, hits in first.rankings.items():
        scored = []
        for docid, _ in hits[:DEPTH]:
            with torch.no_grad():
                enc = tokenizer(
                    queries[qid],
                    texts[docid],
                    truncation="longest_first",
                    max_length=256,
                    return_tensors="pt",
                )
                scored.append((docid, model(**enc).logits[0, 0].item()))
        out[qid] = sorted(scored, key=lambda h: (h[1], h[0]), reverse=True)
    return out


def test_rerank_keeps_each_candidate_set_and_orders_by_the_cross_encoder(cross_dir, inputs, tmp_path):
    out = tmp_path / "reranked.tsv"
    assert rerank(_flags(cross_dir, inputs, out)) == 0
    got, _ = read_run(out, "tevatron")
    first, _ = read_run(inputs["run"], "tevatron")
    expected = _expected(cross_dir, inputs)
    assert list(got.rankings) == list(first.rankings)  # run order of queries
    for qid, hits in got.rankings.items():
        assert {d for d, _ in hits} == {d for d, _ in first.rankings[qid][:DEPTH]}  # the top-K, nothing else
        assert len(hits) == min(DEPTH, len(first.rankings[qid]))
        assert [d for d, _ in hits] == [d for d, _ in expected[qid]], qid
        for (_, score), (_, want) in zip(hits, expected[qid]):
            assert score == pytest.approx(want, abs=1e-5)
    config = json.loads(Path(str(out) + ".config.json").read_text())
    assert config["num_queries"] == N_QUERIES and config["made_from"]["depth"] == DEPTH


def test_ties_follow_the_one_rule(cross_dir, inputs, tmp_path):
    """Two candidates with the same text score exactly alike: the larger docid (string order) comes first."""
    corpus = [json.loads(x) for x in inputs["corpus"].read_text().splitlines()]
    corpus.append({"docid": "d10x", "title": "", "text": corpus[9]["text"]})
    corpus.append({"docid": "d09", "title": "", "text": corpus[9]["text"]})
    write_jsonl(inputs["corpus"], corpus)
    inputs["run"].write_text("q0\td09\t3.0\nq0\td9\t2.0\nq0\td10x\t1.0\n")
    out = tmp_path / "ties.tsv"
    assert rerank(_flags(cross_dir, inputs, out)) == 0
    docids = [line.split("\t")[1] for line in out.read_text().splitlines()]
    assert docids == ["d9", "d10x", "d09"]  # one score, docid descending


def test_crash_between_parts_then_resume_gives_the_same_run(cross_dir, inputs, tmp_path, monkeypatch):
    reference = tmp_path / "reference.tsv"
    assert rerank(_flags(cross_dir, inputs, reference)) == 0
    out = tmp_path / "resumed.tsv"
    # shard 0 of 2 completes its part; the job of shard 1 dies part-way (a crash inside its part)
    assert rerank(_flags(cross_dir, inputs, out, "--num_shards", "2", "--shard_index", "0")) == 0
    assert not out.exists()
    import dr.rerank.run as rerank_run

    calls = {"n": 0}
    real = rerank_run.Reranker.rerank

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(rerank_run.Reranker, "rerank", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        rerank(_flags(cross_dir, inputs, out, "--num_shards", "2", "--shard_index", "1"))
    monkeypatch.undo()
    parts = sorted(p.name for p in Path(str(out) + ".parts").glob("rows-*"))
    assert parts == ["rows-000000000-000000003.tsv"] and not out.exists()  # no half part, no output
    assert rerank(_flags(cross_dir, inputs, out)) == 0  # one process finishes the rest; shard 0's part reused
    assert out.read_text() == reference.read_text()
    done = sorted(p.name for p in Path(str(out) + ".parts").glob("rows-*"))
    assert "rows-000000000-000000003.tsv" in done
    # another depth is another configuration: refused unless --overwrite
    assert rerank(_flags(cross_dir, inputs, out, "--depth", "2")) == 2


@pytest.mark.parametrize("what", ["docid", "query"])
def test_missing_docid_or_query_exits_1_naming_it_and_writes_nothing(
    cross_dir, inputs, tmp_path, capsys, what
):
    if what == "docid":
        inputs["run"].write_text(inputs["run"].read_text() + "q2\tnope-42\t99.0\n")  # q2's best hit
    else:
        inputs["run"].write_text(inputs["run"].read_text() + "q-missing\td1\t1.0\n")
    out = tmp_path / "bad.tsv"
    assert rerank(_flags(cross_dir, inputs, out)) == 1
    err = capsys.readouterr().err
    assert ("'nope-42'" if what == "docid" else "'q-missing'") in err and "Traceback" not in err
    assert not out.exists() and not Path(str(out) + ".parts").exists()


def test_a_docid_beyond_the_depth_is_not_looked_up(cross_dir, inputs, tmp_path):
    inputs["run"].write_text(inputs["run"].read_text() + "q0\tnot-in-corpus\t-5.0\n")  # rank > DEPTH
    assert rerank(_flags(cross_dir, inputs, tmp_path / "ok.tsv")) == 0


@pytest.mark.slow
def test_two_ranks_equal_one_process(cross_dir, inputs, tmp_path):
    one = tmp_path / "one.tsv"
    assert rerank(_flags(cross_dir, inputs, one)) == 0
    two = tmp_path / "two.tsv"
    flags = [
        "--run_file" if f == "--run" else f for f in _flags(cross_dir, inputs, two)
    ]  # torchrun: see dr rerank --help
    run(torchrun(2) + ["-m", "dr.rerank", *flags], timeout=300)
    assert two.read_text() == one.read_text()
    assert len(list(Path(str(two) + ".parts").glob("rows-*"))) == 2


KILL_AT_THIRD_QUERY = """
import os, signal, sys
import dr.rerank.run as rerank_run
from dr.cli import run_command

real, calls = rerank_run.Reranker.rerank, [0]

def rerank_then_die(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 part-way through the part
    return real(self, *args, **kwargs)

rerank_run.Reranker.rerank = rerank_then_die
sys.exit(run_command("rerank", sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_part_way_then_resume_gives_the_same_run(cross_dir, inputs, tmp_path):
    reference = tmp_path / "reference.tsv"
    assert rerank(_flags(cross_dir, inputs, reference)) == 0
    script = tmp_path / "kill_at_third_query.py"
    script.write_text(KILL_AT_THIRD_QUERY)
    out = tmp_path / "killed.tsv"
    proc = run([sys.executable, str(script), *_flags(cross_dir, inputs, out)], timeout=120, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    parts = Path(str(out) + ".parts")
    assert not out.exists() and not list(parts.glob("rows-*.tsv"))  # only a temporary file may be left
    assert rerank(_flags(cross_dir, inputs, out)) == 0
    assert out.read_text() == reference.read_text()
    assert [p.name for p in parts.iterdir() if p.name != "rerank.json"] == ["rows-000000000-000000007.tsv"]
