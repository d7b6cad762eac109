"""Outputs that must not be silently wrong, and format promises kept (issue 15, items 1, 4, 11-14, 16).

Metrics agree with ir-measures; ambiguous run formats are refused; piping a table into `head` is quiet;
atomically written files respect the umask; shards are readable as documented.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from dr.eval.metrics import ACCEPTED_METRIC_EXAMPLES
from tests.helpers import command

evaluate_main = command("eval")
convert = command("convert")

# ---------------------------------------------------------------------------------- item 1: dr eval metrics


def _graded_fixture(seed: int, ties: bool) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """Random graded qrels (every query has a relevant doc, some rel-0 judgments) and a run of 30 hits.

    With `ties`, scores are coarse (one decimal) so that many hits share a score; without, they are distinct.
    """
    rng = random.Random(seed)
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in range(25):
        qid = f"q{q}"
        pool = [f"d{rng.randrange(10_000):05d}" for _ in range(45)]
        pool = list(dict.fromkeys(pool))
        judged = rng.sample(pool, 8)
        qrels[qid] = {docid: rng.choice((0, 1, 1, 2, 3)) for docid in judged}
        qrels[qid][judged[0]] = rng.choice((1, 2, 3))
        hits = pool[:30]
        rng.shuffle(hits)
        if ties:
            run[qid] = {docid: round(rng.uniform(0, 2), 1) for docid in hits}
        else:
            run[qid] = {docid: 10.0 - i * 0.25 - rng.random() * 0.01 for i, docid in enumerate(hits)}
    run["unjudged"] = {"d00001": 1.0}  # a run query absent from the qrels: ignored by both
    return qrels, run


def _write_trec(tmp_path: Path, qrels, run) -> tuple[Path, Path]:
    qrels_path, run_path = tmp_path / "qrels.trec", tmp_path / "run.trec"
    qrels_path.write_text("".join(f"{q} 0 {d} {r}\n" for q, docs in qrels.items() for d, r in docs.items()))
    lines = []
    for qid, hits in run.items():
        for rank, (docid, score) in enumerate(sorted(hits.items(), key=lambda h: -h[1]), 1):
            lines.append(f"{qid} Q0 {docid} {rank} {score!r} t\n")
    run_path.write_text("".join(lines))
    return qrels_path, run_path


def _ir_measures_name(name: str) -> str:
    """ir-measures' spelling of a `dr eval` name (MRR@k is RR@k; MAP is AP)."""
    return name.replace("MRR@", "RR@").replace("MAP", "AP")


def _dr_eval(tmp_path: Path, qrels_path: Path, run_path: Path, names: list[str]) -> dict:
    out = tmp_path / "metrics.json"
    argv = ["--qrels", str(qrels_path), "--run", str(run_path), "--metrics", *names, "--output", str(out)]
    assert evaluate_main(argv) == 0
    return json.loads(out.read_text())


def _reference(qrels, run, names: list[str], ties: bool) -> dict[str, float]:
    """ir-measures on the same files; for RR@k on a tied run, trec_eval's `-M k -m recip_rank`.

    ir-measures evaluates RR@k with the MS MARCO script, which breaks ties by docid ascending, whereas
    every trec_eval measure (and `trec_eval -M k`) breaks them by docid descending; dr uses one tie rule
    for every metric (trec_eval's, on scored runs).
    """
    import ir_measures

    ref = {}
    for name in names:
        measure = ir_measures.parse_measure(_ir_measures_name(name))
        if ties and measure.NAME == "RR" and "@" in name:
            k = int(name.split("@")[1])
            top = {
                q: dict(sorted(h.items(), key=lambda x: (x[1], x[0]), reverse=True)[:k])
                for q, h in run.items()
            }
            ref[name] = ir_measures.calc_aggregate([ir_measures.RR], qrels, top)[ir_measures.RR]
        else:
            ref[name] = ir_measures.calc_aggregate([measure], qrels, run)[measure]
    return ref


@pytest.mark.parametrize("ties", [False, True], ids=["distinct-scores", "tied-scores"])
def test_every_accepted_metric_agrees_with_ir_measures_alone_and_combined(tmp_path, ties):
    qrels, run = _graded_fixture(seed=15, ties=ties)
    qrels_path, run_path = _write_trec(tmp_path, qrels, run)
    names = list(ACCEPTED_METRIC_EXAMPLES)
    reference = _reference(qrels, run, names, ties)
    assert len(set(reference.values())) > 5  # the fixture discriminates between measures
    combined = _dr_eval(tmp_path, qrels_path, run_path, names)
    for name in names:
        alone = _dr_eval(tmp_path, qrels_path, run_path, [name])
        for got in (alone[name], combined[name]):
            assert got == pytest.approx(reference[name], abs=1e-12), name
            assert f"{got:.4f}" == f"{reference[name]:.4f}", name


@pytest.mark.parametrize(
    "pair", [("AP", "MAP"), ("RR@10", "RR"), ("MRR@10", "RR@10"), ("MAP", "AP@10"), ("nDCG", "nDCG@10")]
)
def test_names_of_the_same_trec_eval_measure_do_not_zero_each_other(tmp_path, pair):
    qrels, run = _graded_fixture(seed=3, ties=False)
    qrels_path, run_path = _write_trec(tmp_path, qrels, run)
    reference = _reference(qrels, run, list(pair), ties=False)
    for names in (list(pair), list(reversed(pair))):
        results = _dr_eval(tmp_path, qrels_path, run_path, names)
        for name in pair:
            assert results[name] == pytest.approx(reference[name], abs=1e-12) and results[name] > 0, name


def test_every_pair_of_accepted_metrics_matches_each_alone(tmp_path):
    qrels, run = _graded_fixture(seed=7, ties=True)
    qrels_path, run_path = _write_trec(tmp_path, qrels, run)
    names = list(ACCEPTED_METRIC_EXAMPLES)
    alone = {name: _dr_eval(tmp_path, qrels_path, run_path, [name])[name] for name in names}
    for first, second in itertools.combinations(names, 2):
        results = _dr_eval(tmp_path, qrels_path, run_path, [first, second])
        assert (results[first], results[second]) == (alone[first], alone[second]), (first, second)


TIE_QRELS = "1 0 a 1\n"


@pytest.mark.parametrize(
    "run_text,fmt,expected",
    [
        ("1 Q0 a 1 5.0 t\n1 Q0 b 2 5.0 t\n", "auto", 0.5),  # TREC: trec_eval puts b (docid descending) first
        ("1\ta\t5.0\n1\tb\t5.0\n", "auto", 0.5),  # Tevatron scores: the same rule as TREC
        ("1\ta\t1\n1\tb\t2\n", "marco", 1.0),  # MS MARCO ranks: the file's ranking, as the official script
    ],
    ids=["trec", "tevatron", "marco"],
)
def test_tied_scores_follow_trec_eval_and_marco_ranks_are_kept(tmp_path, run_text, fmt, expected):
    (tmp_path / "qrels").write_text(TIE_QRELS)
    (tmp_path / "run").write_text(run_text)
    out = tmp_path / "m.json"
    argv = ["--qrels", str(tmp_path / "qrels"), "--run", str(tmp_path / "run"), "--run_format", fmt]
    argv += ["--output", str(out)]
    assert evaluate_main([*argv, "--metrics", "AP", "RR", "RR@10", "MRR@10"]) == 0
    results = json.loads(out.read_text())
    assert [results[n] for n in ("AP", "RR", "RR@10", "MRR@10")] == [expected] * 4


def test_unsupported_metric_names_are_refused_with_the_accepted_list(tmp_path, capsys):
    (tmp_path / "qrels").write_text(TIE_QRELS)
    (tmp_path / "run").write_text("1\ta\t1\n")
    for name in ("nDCG(dcg='exp-log2')@10", "NumRet", "Judged@10", "RR@0", "ERR@10"):
        argv = ["--qrels", str(tmp_path / "qrels"), "--run", str(tmp_path / "run"), "--metrics", name]
        assert evaluate_main(argv) == 2
        err = capsys.readouterr().err
        assert f"unknown metric {name!r}" in err and "nDCG@k" in err and "Traceback" not in err


# ------------------------------------------------------------------------- item 4: no guessing run formats

INTEGER_SCORES = "q1\td1\t30\nq1\td2\t20\nq1\td3\t10\n"  # Tevatron, integer scores: best is d1


def test_integer_scored_run_is_refused_without_from(tmp_path, capsys):
    source, out = tmp_path / "rank.txt", tmp_path / "out.marco"
    source.write_text(INTEGER_SCORES)
    assert convert(["--input", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "rank.txt: cannot tell" in err and "--from tevatron" in err and "--from marco" in err
    assert not out.exists() and not list(tmp_path.glob("out.marco*"))


def test_from_tevatron_keeps_integer_scores_order(tmp_path):
    source, out = tmp_path / "rank.txt", tmp_path / "out.marco"
    source.write_text(INTEGER_SCORES)
    assert convert(["--input", str(source), "--output", str(out), "--from", "tevatron"]) == 0
    assert out.read_text() == "q1\td1\t1\nq1\td2\t2\nq1\td3\t3\n"
    assert convert(["--input", str(source), "--output", str(out), "--from", "marco"]) == 0
    assert out.read_text() == "q1\td3\t1\nq1\td2\t2\nq1\td1\t3\n"  # asked for: 10 20 30 read as ranks


@pytest.mark.parametrize(
    "text,name,fmt",
    [
        ("q1\td1\t12.5\nq1\td2\t3\n", "rank.txt", "tevatron"),  # a float: not a rank
        ("q1\td1\t-1\nq1\td2\t3\n", "rank.txt", "tevatron"),  # negative: not a rank
        ("q1\td1\t2\nq1\td2\t2\n", "rank.txt", "tevatron"),  # repeated within a query: not ranks
        ("q1 Q0 d1 1 2.5 t\n", "rank.txt", "trec"),
        ("q1\td1\t1\nq1\td2\t2\n", "run.marco", "marco"),  # the suffix names the format
        ("q1\td1\t1\nq1\td2\t2\n", "run.tevatron", "tevatron"),
    ],
)
def test_formats_the_content_or_name_tells_apart_are_still_detected(tmp_path, text, name, fmt):
    from dr.io.runs import read_run

    path = tmp_path / name
    path.write_text(text)
    assert read_run(path)[1] == fmt


@pytest.mark.parametrize("name", ["eval", "mine"])
def test_eval_and_mine_refuse_to_guess_too(tmp_path, capsys, name):
    evaluate, mine = command("eval"), command("mine")
    (tmp_path / "rank.txt").write_text(INTEGER_SCORES)
    (tmp_path / "qrels").write_text("q1 0 d1 1\n")
    common = ["--run", str(tmp_path / "rank.txt"), "--qrels", str(tmp_path / "qrels")]
    if name == "eval":
        assert evaluate(common) == 2
    else:
        (tmp_path / "corpus.jsonl").write_text('{"docid": "d1", "text": "x"}\n')
        (tmp_path / "q.jsonl").write_text('{"query_id": "q1", "query": "x"}\n')
        extra = ["--corpus", str(tmp_path / "corpus.jsonl"), "--queries", str(tmp_path / "q.jsonl")]
        assert mine([*common, *extra, "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell" in err and "--run_format tevatron" in err


def test_convert_bad_content_is_exit_1(tmp_path, capsys):
    (tmp_path / "rank.txt").write_text("q1\td1\tabc\n")
    assert convert(["--input", str(tmp_path / "rank.txt"), "--output", str(tmp_path / "o.marco")]) == 1
    assert "rank.txt:1: score 'abc' is not a number" in capsys.readouterr().err


# ------------------------------------------------------------------------ item 11: `| head` is not an error

REPO = Path(__file__).resolve().parents[1]


def _through_closed_pipe(tmp_path: Path, args: list[str], stream: str = "stdout") -> tuple[str, str, int]:
    """Run `python -m ARGS` writing `stream` into a pipe whose reader, `head -1`, has already exited.

    `echo first` feeds head its one line; the command starts after head is gone, so its first write meets a
    closed pipe: deterministic, unlike racing head. Returns (what head printed, the command's other
    stream, the command's exit status).
    """
    import shlex
    import subprocess
    import sys

    command = shlex.join([sys.executable, "-m", *args])
    other = shlex.quote(str(tmp_path / "other.txt"))
    redirect = f"2>{other}" if stream == "stdout" else f"2>&1 >{other}"
    rc_file = shlex.quote(str(tmp_path / "rc"))
    script = f"{{ echo first; sleep 0.5; {command} {redirect}; echo $? > {rc_file}; }} | head -1"
    out = subprocess.run(
        ["bash", "-c", script], check=True, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    return out.stdout, (tmp_path / "other.txt").read_text(), int((tmp_path / "rc").read_text())


def _eval_files(tmp_path: Path) -> list[str]:
    (tmp_path / "qrels").write_text(TIE_QRELS)
    (tmp_path / "run.trec").write_text("1 Q0 a 1 5.0 t\n")
    return ["--qrels", str(tmp_path / "qrels"), "--run", str(tmp_path / "run.trec")]


@pytest.mark.parametrize("name", ["eval", "pipeline", "demo"])
def test_table_into_a_closed_pipe_exits_quietly(tmp_path, name):
    if name == "eval":
        args = ["dr.cli", "eval", *_eval_files(tmp_path), "--output", str(tmp_path / "m.json")]
    elif name == "pipeline":
        config = str(REPO / "dr" / "demo" / "demo.yaml")
        args = ["dr.cli", "pipeline", config, "--dry_run", "--set", f"run_dir={tmp_path}/r"]
    else:  # the BM25 table; a metrics.json present is reused, so nothing is computed
        (tmp_path / "bm25").mkdir()
        (tmp_path / "bm25" / "metrics.json").write_text('{"MRR@10": 0.5, "num_queries": 1}')
        args = ["dr.cli", "demo", "bm25", "--corpus", "c", "--queries", "q", "--qrels", "r"]
        args += ["--output_dir", str(tmp_path / "bm25"), "--metrics", "MRR@10"]
    stdout, other, rc = _through_closed_pipe(tmp_path, args)
    assert stdout == "first\n"
    assert other == ""  # no traceback, no "Exception ignored ... BrokenPipeError", and nothing else
    assert rc == 141  # what a shell reports for a writer stopped by SIGPIPE
    if name == "eval":  # the outputs were written before the table
        assert json.loads((tmp_path / "m.json").read_text())["MRR@10"] == 1.0


def test_echo_writes_lines_when_the_reader_stays(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "dr.cli", "eval", *_eval_files(tmp_path), "--metrics", "MRR@10"]
    out = subprocess.run(args, check=False, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[2].split() == ["MRR@10", "1.0000"]


# ------------------------------------------------------------------------- item 12: exact qrels messages


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "1 0 a 1\n1 0 b\n",
            (
                "qrels:2: 3 columns where line 1 has 4: every line must have the same columns "
                "(4: qid iter docid rel, 3: qid docid rel, or 2: qid docid)"
            ),
        ),
        (
            "1 a\n1 b 1\n",
            "qrels:2: 3 columns where line 1 has 2: every line must have the same columns",
        ),
        (
            "1 0 a 1 x\n",
            "qrels:1: 5 columns; qrels need 4 (qid iter docid rel), 3 (qid docid rel) or 2 (qid docid)",
        ),
    ],
)
def test_qrels_column_message_says_what_is_wrong(tmp_path, text, message):
    from dr.io.qrels import QrelsFormatError, read_qrels

    (tmp_path / "qrels").write_text(text)
    with pytest.raises(QrelsFormatError) as err:
        read_qrels(tmp_path / "qrels")
    assert message in str(err.value)


# --------------------------------------------------------------------- item 13: outputs respect the umask

_WRITE_ALL = r"""
import os, sys
import numpy as np
from pathlib import Path
os.umask(int(sys.argv[2], 8))
from dr.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from dr.io.runs import Run, write_run
from dr.io.shards import ShardMeta, write_shard
out = Path(sys.argv[1])
meta = ShardMeta("m", "mean", True, 4, "float32", 16, "passage", 2)
write_shard(out / "shards" / "corpus.0.arrow", meta, ["a", "b"], np.ones((2, 4)))
write_json_atomic(out / "corpus.manifest.json", {"x": 1})
write_json_atomic(out / "metrics.json", {"MRR@10": 0.5})
write_text_atomic(out / "notes.txt", "x")
write_run(out / "run.trec", Run({"q": [("a", 1.0)]}), "trec")
with atomic_path(out / "model" / "model.safetensors") as tmp:
    tmp.write_bytes(b"weights")
"""


@pytest.mark.parametrize("umask,file_mode,dir_mode", [("022", 0o644, 0o755), ("027", 0o640, 0o750)])
def test_atomically_written_outputs_respect_the_umask(tmp_path, umask, file_mode, dir_mode):
    import stat
    import subprocess
    import sys

    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", _WRITE_ALL, str(out), umask], check=True, cwd=REPO, timeout=120)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.relative_to(out).as_posix() for p in files] == [
        "corpus.manifest.json",
        "metrics.json",
        "model/model.safetensors",
        "notes.txt",
        "run.trec",
        "shards/corpus.0.arrow",
    ]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    for folder in (out, out / "shards", out / "model"):
        assert stat.S_IMODE(folder.stat().st_mode) == dir_mode, folder


# -------------------------------------------- items 14 and 16: the shard format, as docs/formats.md states it

FORMATS_DOC = REPO / "docs" / "formats.md"


def _doc_blocks() -> list[str]:
    """The ```python blocks of docs/formats.md, in order: [write, read with pyarrow, read with datasets]."""
    import re

    return re.findall(r"```python\n(.*?)```", FORMATS_DOC.read_text(), re.DOTALL)


def _write_as_documented(folder: Path, side: str = "passage", **replace: str) -> Path:
    """Run the docs' writing recipe in `folder` (side 'query' writes queries.arrow); `replace` edits it."""
    import os

    code = _doc_blocks()[0]
    if side == "query":
        code = code.replace('"passage"', '"query"').replace("corpus.arrow", "queries.arrow")
    for old, new in replace.items():
        assert old in code, old
        code = code.replace(old, new)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(code, str(FORMATS_DOC), "exec"), {})  # noqa: S102 - our own docs, on purpose
    finally:
        os.chdir(cwd)
    return folder / ("queries.arrow" if side == "query" else "corpus.arrow")


def _search(folder: Path, capsys) -> tuple[int, str]:
    search = command("search")
    argv = ["--query_reps", str(folder / "queries.arrow"), "--passage_reps", str(folder / "corpus.arrow")]
    rc = search([*argv, "--depth", "3", "--save_ranking_to", str(folder / "run.txt"), "--quiet"])
    return rc, capsys.readouterr().err


def test_shard_written_with_plain_pyarrow_from_the_docs_is_searched(tmp_path, capsys):
    from dr.io.runs import read_run

    _write_as_documented(tmp_path)
    _write_as_documented(tmp_path, side="query")
    rc, err = _search(tmp_path, capsys)
    assert rc == 0, err
    run, _ = read_run(tmp_path / "run.txt")
    assert sorted(run.rankings) == ["d1", "d2", "d3"]  # the query ids are the docs' ids too
    assert all(hits[0][0] == qid for qid, hits in run.rankings.items())  # each vector's best match is itself


@pytest.mark.parametrize("id_type", ["pa.large_string()", "pa.string()"])
def test_large_string_ids_are_searched(tmp_path, capsys, id_type):
    """Many Arrow writers (polars, pandas with pyarrow strings) store ids as large_string."""
    _write_as_documented(tmp_path, **{"pa.array(ids, pa.string())": "pa.array(ids, pa.large_string())"})
    _write_as_documented(
        tmp_path, side="query", **{"pa.array(ids, pa.string())": f"pa.array(ids, {id_type})"}
    )
    second = tmp_path / "more"  # a string-id shard next to the large_string one: chunks of two types
    second.mkdir()
    _write_as_documented(second, **{'"d1", "d2", "d3"': '"e1", "e2", "e3"'}).rename(
        tmp_path / "corpus.e.arrow"
    )
    search = command("search")
    argv = ["--query_reps", str(tmp_path / "queries.arrow"), "--depth", "6", "--quiet"]
    argv += ["--passage_reps", f"{tmp_path}/corpus*.arrow", "--save_ranking_to", str(tmp_path / "run.txt")]
    assert search(argv) == 0, capsys.readouterr().err
    lines = (tmp_path / "run.txt").read_text().splitlines()
    assert len(lines) == 18 and {line.split()[1] for line in lines} == {"d1", "d2", "d3", "e1", "e2", "e3"}


@pytest.mark.parametrize(
    "spelling,value",
    [("true", True), ("True", True), ("TRUE", True), ("1", True), ("yes", True)]
    + [("false", False), ("False", False), ("FALSE", False), ("0", False), ("No", False)],
)
def test_normalize_accepts_every_boolean_spelling(tmp_path, spelling, value):
    from dr.io.shards import read_meta

    path = _write_as_documented(tmp_path, **{'"dr.normalize": "false"': f'"dr.normalize": "{spelling}"'})
    assert read_meta(path).normalize is value


@pytest.mark.parametrize(
    "old,new,message",
    [
        ('"dr.normalize": "false"', '"dr.normalize": "maybe"', "dr.normalize 'maybe' is not a boolean"),
        ('"dr.normalize": "false"', '"dr.normalize": ""', "dr.normalize '' is not a boolean"),
        (
            '"dr.format_version": "1"',
            '"dr.format_version": "1.0"',
            "dr.format_version '1.0' is not supported",
        ),
        ('"dr.dim": "8"', '"dr.dim": "8.0"', "dr.dim '8.0' is not an integer"),
        ('"dr.count": str(len(ids))', '"dr.count": "-3"', "dr.count '-3' is not an integer"),
        ('"dr.pooling": "mean"', '"dr.pooling": "max"', "dr.pooling 'max' is not one of cls, mean, last"),
        ('"dr.side": "passage"', '"dr.side": "doc"', "dr.side 'doc' is not one of query, passage"),
        ('"dr.dtype": "float32"', '"dr.dtype": "float16"', "embedding column has type"),
        ('"dr.dim": "8"', '"dr.dim": "4"', "embedding column has type"),
        ('"dr.model": "my-encoder"', '"dr.model": ""', "dr.model is empty"),
        ('"dr.count": str(len(ids))', '"dr.count": "5"', "row count differs from dr.count=5"),
        ("pa.array(ids, pa.string())", "pa.array([1, 2, 3])", "id column has type int64"),
        ("pa.array(ids, pa.string())", 'pa.array(["d1", None, "d3"])', "id column holds a null"),
    ],
)
def test_bad_shard_fields_are_one_line_errors_naming_the_field(tmp_path, capsys, old, new, message):
    from dr.io.shards import ShardError, read_meta

    path = _write_as_documented(tmp_path, **{old: new})
    with pytest.raises(ShardError) as err:
        read_meta(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    _write_as_documented(tmp_path, side="query")
    rc, err = _search(tmp_path, capsys)
    assert rc == 1 and message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run.txt").exists()


@pytest.fixture
def dr_shards(tmp_path) -> tuple:
    """Two shards written by dr (ShardWriter), as corpus.0.arrow / corpus.1.arrow, plus corpus.arrow (both)."""
    import numpy as np

    from dr.io.shards import ShardMeta, write_shard

    vectors = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    ids = [f"p{i}" for i in range(5)]
    write_shard(
        tmp_path / "corpus.0.arrow",
        ShardMeta("m", "mean", True, 4, "float32", 16, "passage", 2),
        ids[:2],
        vectors[:2],
    )
    write_shard(
        tmp_path / "corpus.1.arrow",
        ShardMeta("m", "mean", True, 4, "float32", 16, "passage", 3),
        ids[2:],
        vectors[2:],
    )
    write_shard(
        tmp_path / "corpus.arrow", ShardMeta("m", "mean", True, 4, "float32", 16, "passage", 5), ids, vectors
    )
    return tmp_path, ids, vectors


def _run_doc_block(index: int, folder: Path) -> dict:
    import os

    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(_doc_blocks()[index], str(FORMATS_DOC), "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        os.chdir(cwd)
    return namespace


def test_dr_shards_read_with_pyarrow_as_documented(dr_shards):
    folder, ids, vectors = dr_shards
    ns = _run_doc_block(1, folder)
    assert ns["ids"] == ids and (ns["vectors"] == vectors).all()
    assert ns["meta"]["dr.format_version"] == "1" and ns["meta"]["dr.count"] == "5"
    assert list(ns["frame"]["id"]) == ids


def test_dr_shards_read_with_datasets_as_documented(dr_shards, monkeypatch, tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
    folder, ids, vectors = dr_shards
    ds = _run_doc_block(2, folder)["ds"]
    # data_files="corpus*.arrow": corpus.0, corpus.1, then corpus (sorted names) -> ids twice
    assert ds["id"] == ids + ids
    assert [list(v) for v in ds["embedding"][:5]] == vectors.tolist()


def test_datasets_from_file_does_not_read_shards_as_the_docs_say(dr_shards):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    folder, ids, _ = dr_shards
    assert '`datasets.Dataset.from_file("corpus.arrow")` fails' in FORMATS_DOC.read_text()
    with pytest.raises(pa.ArrowInvalid):
        datasets.Dataset.from_file(str(folder / "corpus.arrow"))
    table = pa.ipc.open_file(pa.memory_map(str(folder / "corpus.arrow"))).read_all()
    assert datasets.Dataset(table)["id"] == ids  # the documented alternative


def test_dr_shards_read_with_polars_as_documented(dr_shards):
    polars = pytest.importorskip("polars")
    folder, ids, _ = dr_shards
    assert polars.read_ipc(str(folder / "corpus.arrow"))["id"].to_list() == ids


def test_logged_summary_into_a_closed_pipe_is_quiet(tmp_path):
    """`dr convert` / `dr search` log their summary to stderr: `2>&1 | head -1` must stay quiet too."""
    (tmp_path / "run.trec").write_text("1 Q0 a 1 5.0 t\n")
    args = ["dr.cli", "convert", "--input", str(tmp_path / "run.trec"), "--output", str(tmp_path / "o.marco")]
    stdout, other, rc = _through_closed_pipe(tmp_path, args, "stderr")
    assert (stdout, other) == ("first\n", "") and rc in (0, 141)
    assert (tmp_path / "o.marco").read_text() == "1\ta\t1\n"
