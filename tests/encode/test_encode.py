"""`dr encode`: sharding, ranks, resume, query/passage symmetry, output format and bad inputs."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dr.io.corpus import load_corpus
from tests.helpers import command

main = command("encode")
from dr.io.shards import read_manifest, read_meta, read_shard
from tests.helpers import FILLER, SHARED_DATA, TOPICS, make_tiny_model, run, torchrun, write_jsonl

N_ROWS = 90


def make_rows(n: int = N_ROWS, seed: int = 0) -> list[dict]:
    """Passages of varied lengths (so length sorting reorders them), some with a title."""
    rng = random.Random(seed)
    return [
        {
            "docid": f"d{i}",
            "title": TOPICS[i % len(TOPICS)] if i % 3 else "",
            "text": " ".join(rng.choices(FILLER + TOPICS, k=rng.randint(1, 50))),
        }
        for i in range(n)
    ]


def encode(model: Path, data: Path, out: Path, *extra: str) -> int:
    """In-process `dr encode` with small, fast settings."""
    argv = [
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--encoded_save_path", str(out),
        "--per_device_eval_batch_size", "8", "--window_batches", "3", "--dataloader_num_workers", "0",
        "--p_max_len", "64", "--q_max_len", "64", "--dataset_cache_dir", str(out.parent / ".cache"),
    ]  # fmt: skip
    return main(argv + list(extra))


def read_all(pattern_dir: Path, glob: str) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    blocks = []
    for path in sorted(pattern_dir.glob(glob)):
        file_ids, vectors, _ = read_shard(path)
        ids += file_ids
        blocks.append(vectors)
    return ids, np.concatenate(blocks)


def direct_vectors(
    model_dir: Path, texts: list[str], side: str = "passage", max_length: int = 64
) -> np.ndarray:
    """Encode texts one at a time without padding or sorting: the reference for batched encoding."""
    import torch

    from dr.model.encoder import BiEncoder
    from dr.model.text import load_tokenizer

    model, tokenizer = BiEncoder.from_pretrained(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    fn = model.encode_query if side == "query" else model.encode_passage
    with torch.inference_mode():
        return np.stack(
            [
                fn(tokenizer([t], truncation=True, max_length=max_length, return_tensors="pt"))[0].numpy()
                for t in texts
            ]
        )


# ---- correctness ---------------------------------------------------------------------------------------


def test_vectors_match_direct_encoding_in_input_order(tiny_model_dir, corpus_file, tmp_path):
    out = tmp_path / "out" / "corpus_emb.pkl"
    assert encode(tiny_model_dir, corpus_file, out) == 0
    ids, vectors, meta = read_shard(tmp_path / "out" / "corpus_emb.arrow")
    rows = make_rows()
    assert ids == [r["docid"] for r in rows]  # input order, although batches were length-sorted
    texts = [f"{r['title']} {r['text']}" if r["title"] else r["text"] for r in rows]
    np.testing.assert_allclose(vectors, direct_vectors(tiny_model_dir, texts), atol=1e-4)
    assert (meta.side, meta.dim, meta.count, meta.max_length, meta.pooling) == (
        "passage",
        32,
        N_ROWS,
        64,
        "cls",
    )
    assert not list((tmp_path / "out").glob("*.pkl"))
    manifest = read_manifest(tmp_path / "out" / "corpus_emb.manifest.json")
    assert manifest["rows"] == N_ROWS and manifest["files"][0]["path"] == "corpus_emb.arrow"
    assert (tmp_path / "out" / "corpus_emb.config.json").is_file()


def test_fixed_padding_workers_and_bf16_agree(tiny_model_dir, corpus_file, tmp_path):
    assert encode(tiny_model_dir, corpus_file, tmp_path / "a" / "c") == 0
    extra = ["--pad_to_max_length", "--sort_by_length", "false", "--dataloader_num_workers", "1"]
    assert encode(tiny_model_dir, corpus_file, tmp_path / "b" / "c", *extra) == 0
    assert (
        encode(tiny_model_dir, corpus_file, tmp_path / "h" / "c", "--bf16", "--embedding_dtype", "float16")
        == 0
    )
    ids_a, a, _ = read_shard(tmp_path / "a" / "c.arrow")
    ids_b, b, _ = read_shard(tmp_path / "b" / "c.arrow")
    ids_h, h, meta_h = read_shard(tmp_path / "h" / "c.arrow")
    assert ids_a == ids_b == ids_h and meta_h.dtype == "float16"
    np.testing.assert_allclose(a, b, atol=1e-4)
    cos = (a * h).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(h.astype(np.float32), axis=1)
    assert cos.min() > 0.98  # bf16 autocast on CPU: close, not identical


def test_query_and_passage_differ_only_by_prefix_and_length(tiny_model_dir, tmp_path):
    rows = make_rows(20)
    texts = [r["text"] for r in rows]
    (tmp_path / "queries.tsv").write_text("".join(f"q{i}\t{t}\n" for i, t in enumerate(texts)))
    write_jsonl(tmp_path / "passages.jsonl", [{"docid": f"q{i}", "text": t} for i, t in enumerate(texts)])
    write_jsonl(
        tmp_path / "prefixed.jsonl", [{"docid": f"q{i}", "text": "query: " + t} for i, t in enumerate(texts)]
    )
    assert encode(tiny_model_dir, tmp_path / "queries.tsv", tmp_path / "o" / "q", "--encode_is_qry") == 0
    assert encode(tiny_model_dir, tmp_path / "passages.jsonl", tmp_path / "o" / "p") == 0
    assert encode(tiny_model_dir, tmp_path / "queries.tsv", tmp_path / "o" / "qp", "--encode_is_query",
                  "--query_prefix", "query: ") == 0  # fmt: skip
    assert encode(tiny_model_dir, tmp_path / "prefixed.jsonl", tmp_path / "o" / "pp") == 0
    q_ids, q, q_meta = read_shard(tmp_path / "o" / "q.arrow")
    p_ids, p, _ = read_shard(tmp_path / "o" / "p.arrow")
    _, qp, _ = read_shard(tmp_path / "o" / "qp.arrow")
    _, pp, _ = read_shard(tmp_path / "o" / "pp.arrow")
    assert q_meta.side == "query" and q_ids == p_ids
    np.testing.assert_allclose(q, p, atol=1e-5)  # tied model, no prefix, same max length
    assert np.abs(qp - q).max() > 1e-3  # the prefix changes the vectors ...
    np.testing.assert_allclose(qp, pp, atol=1e-5)  # ... exactly as encoding the prefixed text does
    assert encode(tiny_model_dir, tmp_path / "queries.tsv", tmp_path / "o" / "q8", "--encode_is_qry",
                  "--q_max_len", "8") == 0  # fmt: skip
    _, q8, _ = read_shard(tmp_path / "o" / "q8.arrow")
    np.testing.assert_allclose(q8, direct_vectors(tiny_model_dir, texts, "query", max_length=8), atol=1e-4)


# ---- sharding and ranks ---------------------------------------------------------------------------------


def test_shards_and_slurm_array_cover_corpus_once(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    for i in range(3):
        assert encode(tiny_model_dir, corpus_file, tmp_path / "flags" / "corpus_emb.pkl",
                      "--encode_num_shard", "3", "--encode_shard_index", str(i)) == 0  # fmt: skip
    ids, vectors = read_all(tmp_path / "flags", "corpus_emb.*.arrow")
    assert ids == [f"d{i}" for i in range(N_ROWS)]  # each id exactly once, in input order
    names = sorted(p.name for p in (tmp_path / "flags").glob("*.arrow"))
    assert names == [f"corpus_emb.{i:05d}-of-00003.rank00000-of-00001.arrow" for i in range(3)]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    for task in (3, 1, 2):  # array --array=1-3, any order
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert encode(tiny_model_dir, corpus_file, tmp_path / "slurm" / "corpus_emb.pkl") == 0
    slurm_ids, slurm_vectors = read_all(tmp_path / "slurm", "corpus_emb.*.arrow")
    assert slurm_ids == ids
    np.testing.assert_allclose(slurm_vectors, vectors, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "slurm").glob("*.arrow")) == names


def test_resubmitted_array_task_keeps_its_shard(tiny_model_dir, corpus_file, tmp_path, monkeypatch, capsys):
    """`sbatch --array=1` (resubmitting one task of a 0-2 array) sets SLURM_ARRAY_TASK_COUNT=1 and
    SLURM_ARRAY_TASK_MIN=1: the array's shape no longer says which shard it is. With --encode_num_shard N
    the task id itself is the shard index, so the resubmitted task redoes exactly its own missing shard
    (it used to encode shard 0 again, "complete: skipped", leaving shard 1 missing)."""
    out = tmp_path / "o" / "corpus"
    for i in (0, 2):
        assert (
            encode(
                tiny_model_dir, corpus_file, out, "--encode_num_shard", "3", "--encode_shard_index", str(i)
            )
            == 0
        )
    for key, value in {
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_ARRAY_TASK_COUNT": "1",
        "SLURM_ARRAY_TASK_MIN": "1",
    }.items():
        monkeypatch.setenv(key, value)
    assert encode(tiny_model_dir, corpus_file, out, "--encode_num_shard", "3") == 0
    assert (tmp_path / "o" / "corpus.00001-of-00003.rank00000-of-00001.arrow").is_file()
    ids, _ = read_all(tmp_path / "o", "corpus.*.arrow")
    assert ids == [f"d{i}" for i in range(N_ROWS)]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert encode(tiny_model_dir, corpus_file, out, "--encode_num_shard", "3") == 2
    assert "shard index 3 is not in [0, 3)" in capsys.readouterr().err


def test_shard_index_out_of_range(tiny_model_dir, corpus_file, tmp_path, capsys):
    rc = encode(tiny_model_dir, corpus_file, tmp_path / "o" / "c", "--encode_num_shard", "2",
                "--encode_shard_index", "2")  # fmt: skip
    assert rc == 2 and "shard index 2 is not in [0, 2)" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny_model_dir, corpus_file, tmp_path):
    assert encode(tiny_model_dir, corpus_file, tmp_path / "one" / "corpus") == 0
    one_ids, one, _ = read_shard(tmp_path / "one" / "corpus.arrow")
    out = tmp_path / "two" / "corpus_emb.pkl"
    cmd = torchrun(2) + ["-m", "dr.encode", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
                         str(corpus_file), "--encoded_save_path", str(out), "--per_device_eval_batch_size", "8",
                         "--window_batches", "2", "--p_max_len", "64", "--dataloader_num_workers", "1",
                         "--dataset_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    proc = run(cmd, timeout=180)
    two_ids, two = read_all(tmp_path / "two", "corpus_emb.*.arrow")
    assert two_ids == one_ids and len(set(two_ids)) == N_ROWS
    np.testing.assert_allclose(two, one, atol=1e-5)
    names = sorted(p.name for p in (tmp_path / "two").glob("*.arrow"))
    assert names == [f"corpus_emb.00000-of-00001.rank{r:05d}-of-00002.arrow" for r in range(2)]
    manifest = read_manifest(tmp_path / "two" / "corpus_emb.00000-of-00001.manifest.json")
    assert [f["rows"] for f in manifest["files"]] == [N_ROWS // 2, N_ROWS // 2] and manifest[
        "world_size"
    ] == 2
    assert "[rank 1/2]" in proc.stderr


# ---- resume ---------------------------------------------------------------------------------------------


def test_rerun_skips_complete_and_redoes_missing_or_broken(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "o" / "corpus"
    shards = [tmp_path / "o" / f"corpus.{i:05d}-of-00003.rank00000-of-00001.arrow" for i in range(3)]

    def run_all() -> str:
        for i in range(3):
            assert encode(tiny_model_dir, corpus_file, out, "--encode_num_shard", "3",
                          "--encode_shard_index", str(i)) == 0  # fmt: skip
        return capsys.readouterr().err

    run_all()
    ids, vectors = read_all(tmp_path / "o", "*.arrow")
    # Simulate a crash while writing shard 1 (a temporary left behind, no final file) and a shard 2 that
    # was copied in truncated by some other tool.
    mtime0 = shards[0].stat().st_mtime_ns
    shards[1].rename(shards[1].with_name(shards[1].name + ".tmp-crashed"))
    shards[2].write_bytes(shards[2].read_bytes()[:200])
    err = run_all()
    assert f"{shards[0].name} is complete" in err and "skipped" in err
    assert f"{shards[2].name}: redoing (unreadable" in err
    assert shards[0].stat().st_mtime_ns == mtime0  # not recomputed
    assert not list((tmp_path / "o").glob("*.tmp-*"))
    ids2, vectors2 = read_all(tmp_path / "o", "*.arrow")
    assert ids2 == ids and len(set(ids2)) == N_ROWS
    np.testing.assert_allclose(vectors2, vectors, atol=1e-6)
    assert encode(tiny_model_dir, corpus_file, out, "--encode_num_shard", "3", "--encode_shard_index", "0",
                  "--overwrite") == 0  # fmt: skip
    assert shards[0].stat().st_mtime_ns != mtime0


def test_checksum_mismatch_in_manifest_is_redone(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "o" / "corpus"
    assert encode(tiny_model_dir, corpus_file, out) == 0
    manifest_path = tmp_path / "o" / "corpus.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert encode(tiny_model_dir, corpus_file, out) == 0
    assert "redoing (sha256 differs" in capsys.readouterr().err
    assert read_manifest(manifest_path)["files"][0]["sha256"] != "0" * 64


def test_existing_output_of_other_model_or_layout_is_an_error(tiny_model_dir, corpus_file, tmp_path, capsys):
    other = make_tiny_model(tmp_path / "m16", hidden=16)
    out = tmp_path / "o" / "corpus"
    assert encode(other, corpus_file, out) == 0
    before = (tmp_path / "o" / "corpus.arrow").read_bytes()
    assert encode(tiny_model_dir, corpus_file, out) == 2
    err = capsys.readouterr().err
    assert "exists from a different model" in err and "dim=16" in err and "--overwrite" in err
    assert (tmp_path / "o" / "corpus.arrow").read_bytes() == before
    assert (
        encode(tiny_model_dir, corpus_file, out, "--encode_num_shard", "2", "--encode_shard_index", "0") == 2
    )
    assert "another shard/rank layout" in capsys.readouterr().err
    assert encode(tiny_model_dir, corpus_file, out, "--overwrite") == 0
    assert read_meta(tmp_path / "o" / "corpus.arrow").dim == 32


# ---- output format --------------------------------------------------------------------------------------


def test_output_opens_with_pyarrow_and_datasets(tiny_model_dir, corpus_file, tmp_path):
    assert encode(tiny_model_dir, corpus_file, tmp_path / "o" / "c.pkl", "--embedding_dtype", "float16") == 0
    path = tmp_path / "o" / "c.arrow"
    table = pa.ipc.open_file(str(path)).read_all()
    assert table.schema.names == ["id", "embedding"]
    assert table.schema.field("id").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 32)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["dr.side"] == "passage" and meta["dr.count"] == str(N_ROWS) and meta["dr.dtype"] == "float16"
    assert meta["dr.model"] == str(Path(tiny_model_dir).resolve()) and meta["dr.normalize"] == "false"
    import datasets

    ds = datasets.load_dataset("arrow", data_files=str(path), split="train", cache_dir=str(tmp_path / "dc"))
    assert ds.column_names == ["id", "embedding"] and ds[0]["id"] == "d0" and len(ds[0]["embedding"]) == 32


# ---- bad inputs -----------------------------------------------------------------------------------------


def _fails(capsys, rc: int, *needles: str, code: int = 1) -> None:
    """Exit status `code` (1: bad files, the default; 2: bad flags), one line naming `needles`."""
    err = capsys.readouterr().err
    assert rc == code, err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err


def test_missing_field_names_file_row_and_field(tiny_model_dir, tmp_path, capsys):
    rows = make_rows(6)
    del rows[3]["text"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    _fails(
        capsys, encode(tiny_model_dir, data, tmp_path / "o" / "c"), str(data), "row 4", "missing field 'text'"
    )
    assert not list((tmp_path / "o").glob("*.arrow"))
    no_id = write_jsonl(tmp_path / "noid.jsonl", [{"name": "x", "text": "apple"}])
    _fails(capsys, encode(tiny_model_dir, no_id, tmp_path / "o" / "c"), str(no_id), "missing id field")


def test_duplicate_ids_fail_before_writing(tiny_model_dir, tmp_path, capsys):
    rows = make_rows(40)
    rows[35]["docid"] = "d2"  # the duplicate is in another shard than the original
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    rc = encode(
        tiny_model_dir, data, tmp_path / "o" / "c", "--encode_num_shard", "2", "--encode_shard_index", "0"
    )
    _fails(capsys, rc, "duplicate docid 'd2' at rows 3 and 36")
    assert not list((tmp_path / "o").glob("*.arrow"))


def test_empty_input_unknown_pooling_fp16_cpu_and_missing_file(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, encode(tiny_model_dir, empty, tmp_path / "o" / "c"), str(empty))
    corpus = write_jsonl(tmp_path / "c.jsonl", make_rows(5))
    bad_model = tmp_path / "badpool"
    shutil.copytree(tiny_model_dir, bad_model)
    (bad_model / "dr_config.json").write_text(json.dumps({"pooling": "max"}))
    _fails(capsys, encode(bad_model, corpus, tmp_path / "o" / "c"), "dr_config.json", "pooling", "'max'")
    _fails(
        capsys, encode(tiny_model_dir, corpus, tmp_path / "o" / "c", "--pooling", "max"), "--pooling", code=2
    )
    _fails(
        capsys,
        encode(tiny_model_dir, corpus, tmp_path / "o" / "c", "--fp16"),
        "--fp16 needs a CUDA GPU",
        code=2,
    )
    _fails(
        capsys, encode(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "o" / "c"), "nope.jsonl", "no such"
    )
    assert not list((tmp_path / "o").glob("*.arrow"))


def test_cli_error_is_one_line_without_traceback(tiny_model_dir, tmp_path):
    proc = run([sys.executable, "-m", "dr.encode", "--model_name_or_path", str(tiny_model_dir), "--dataset_name",
                str(tmp_path / "missing.jsonl"), "--encoded_save_path", str(tmp_path / "c")], check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 1  # bad files: 1, bad flags: 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"dr encode: error: {tmp_path / 'missing.jsonl'}: no such file or folder"], proc.stderr
    assert "Traceback" not in proc.stderr


# ---- inputs: formats, Tevatron rows, real data ----------------------------------------------------------


def test_input_formats(tmp_path):
    beir = tmp_path / "beir"
    write_jsonl(
        beir / "corpus.jsonl",
        [{"_id": "1", "title": "T", "text": "body"}, {"_id": 2, "title": "", "text": "x"}],
    )
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "what"}])
    c = load_corpus(str(beir), "passage", prefix="passage: ")
    assert c.records(0, 2) == (["1", "2"], ["passage: T body", "passage: x"])
    assert load_corpus(str(beir), "query").records(0, 1) == (["q1"], ["what"])
    tev = write_jsonl(
        tmp_path / "train.jsonl", [{"query_id": "7", "query": "q", "positive_passages": [{"docid": "a"}]}]
    )
    assert load_corpus(str(tev), "query").records(0, 1) == (["7"], ["q"])
    tsv = tmp_path / "q.tsv"
    tsv.write_text('1\tNA "quoted\n2\tplain\n')
    assert load_corpus(str(tsv), "query").records(0, 2) == (["1", "2"], ['NA "quoted', "plain"])
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"docid": ["p1"], "text": ["t"]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"docid": ["p2"], "text": ["u"]}), tmp_path / "part-1.parquet")
    assert load_corpus(str(tmp_path / "part-*.parquet")).records(0, 2)[0] == ["p1", "p2"]
    from dr.io.corpus import resolve_input

    hub = resolve_input("Tevatron/msmarco-passage/dev", "query")
    assert (hub.kind, hub.name, hub.split) == ("hub", "Tevatron/msmarco-passage", "dev")
    assert resolve_input("Tevatron/msmarco-passage-corpus").name == "Tevatron/msmarco-passage-corpus"


@pytest.mark.skipif(
    not (SHARED_DATA / "scifact" / "corpus.jsonl").is_file(), reason="shared data not present"
)
def test_scifact_first_rows(tiny_model_dir, tmp_path):
    corpus = SHARED_DATA / "scifact" / "corpus.jsonl"
    assert encode(tiny_model_dir, corpus, tmp_path / "o" / "scifact", "--max_rows", "200") == 0
    ids, vectors, meta = read_shard(tmp_path / "o" / "scifact.arrow")
    with corpus.open() as handle:
        first = [json.loads(next(handle)) for _ in range(200)]
    assert ids == [r["docid"] for r in first] and vectors.shape == (200, 32) and meta.count == 200
    queries = SHARED_DATA / "scifact" / "queries.test.tsv"
    assert encode(tiny_model_dir, queries, tmp_path / "o" / "query_emb.pkl", "--encode_is_qry") == 0
    q_meta = read_meta(tmp_path / "o" / "query_emb.arrow")
    assert q_meta.side == "query" and q_meta.count == 300


def test_new_spellings_and_more_shards_than_rows(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "three.jsonl", make_rows(3))
    for i in range(5):
        argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(data), "--encode_output_path",
                str(tmp_path / "o" / "c"), "--dataset_number_of_shards", "5", "--dataset_shard_index", str(i),
                "--passage_max_len", "16", "--dataloader_num_workers", "0"]  # fmt: skip
        assert main(argv) == 0
    files = sorted((tmp_path / "o").glob("c.*.arrow"))
    assert len(files) == 5 and sum(read_meta(f).count for f in files) == 3  # empty shards: valid empty files
    assert read_all(tmp_path / "o", "c.*.arrow")[0] == ["d0", "d1", "d2"]
    assert read_meta(files[0]).max_length == 16


# ---- non-finite vectors and batching --------------------------------------------------------------------


def test_non_finite_vector_is_refused_naming_row_and_input(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A model that returns NaN for one text (here: the only text with an unknown word): exit 1, the error
    names the input file, the row and its id, and that shard's file is not written (no partial file)."""
    import torch

    from dr.model.encoder import BiEncoder

    rows = make_rows(30)
    rows[17].update(title="", text="жж")  # not in the tiny vocabulary: [UNK]
    data = write_jsonl(tmp_path / "corpus.jsonl", rows)
    unk = (tiny_model_dir / "vocab.txt").read_text().split().index("[UNK]")
    real = BiEncoder.encode_passage

    def nan_for_unknown_words(self, batch, **kwargs):
        reps = real(self, batch, **kwargs)
        bad = (batch["input_ids"] == unk).any(dim=1, keepdim=True)
        return torch.where(bad, torch.full_like(reps, float("nan")), reps)

    monkeypatch.setattr(BiEncoder, "encode_passage", nan_for_unknown_words)
    out = tmp_path / "o" / "c"
    shard = ["--encode_num_shard", "2", "--encode_shard_index"]
    assert encode(tiny_model_dir, data, out, *shard, "0") == 0  # rows 0-14: fine
    capsys.readouterr()
    assert encode(tiny_model_dir, data, out, *shard, "1") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(data) in err and "row 18 (id 'd17')" in err and "non-finite" in err, err
    names = sorted(p.name for p in (tmp_path / "o").iterdir() if p.name != ".cache")
    assert "c.00001-of-00002.rank00000-of-00001.arrow" not in names
    assert not [n for n in names if ".tmp-" in n] and "c.00001-of-00002.manifest.json" not in names
    assert "c.00000-of-00002.rank00000-of-00001.arrow" in names  # the other shard stays as it was


def test_length_sorted_batches_put_every_text_once_longest_first_padded_to_8(tiny_model_dir):
    from dr.encode.batching import BatchSettings, length_sorted_batches
    from dr.model.text import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [r["text"] for r in make_rows(23, seed=5)]
    lengths = [len(tokenizer(t, truncation=True, max_length=40)["input_ids"]) for t in texts]
    batches = length_sorted_batches(texts, tokenizer, BatchSettings(40, 5))
    positions = [int(i) for p, _ in batches for i in p]
    assert sorted(positions) == list(range(23)) and [len(p) for p, _ in batches] == [5, 5, 5, 5, 3]
    assert [lengths[i] for i in positions] == sorted(lengths, reverse=True)  # longest first
    for p, batch in batches:
        width = batch["input_ids"].shape[1]
        assert width == min(40, -(-max(lengths[i] for i in p) // 8) * 8)  # a multiple of 8, capped
        assert batch["attention_mask"].sum(1).tolist() == [lengths[i] for i in p]
    unsorted = length_sorted_batches(texts, tokenizer, BatchSettings(40, 5, sort_by_length=False))
    assert [int(i) for p, _ in unsorted for i in p] == list(range(23))
    assert length_sorted_batches([], tokenizer, BatchSettings(40, 5)) == []
