"""GPU measurements for bench/gpu_check.sh: training precision, GradCache memory, encoding and search.

Every number is measured in this one process on the GPU it finds, with a baseline in the same run:
fp32 vs fp16/bf16 for training, plain vs GradCache for peak memory at a large batch, fixed padding vs
length-sorted batches for encoding, and the roofline (compute bound for encoding, memory-bandwidth bound
for search).

GPU time is scarce, so the script must not fail on its first GPU run: `--smoke` runs every check with a
tiny model and small sizes on the CPU (bf16 where the GPU run uses fp16), which CI-like machines can do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from bench.train_runs import read_train_log
from dr.model.encoder import BiEncoder
from tests.helpers import (
    as_flags,
    make_full_length_rows,
    make_tiny_model,
    run,
    torchrun,
    write_jsonl,
    write_vocab,
)

RESULTS: dict[str, object] = {}

# Dense tensor-core peak (fp16/bf16 FLOP/s) and memory bandwidth (bytes/s) of the cards we may be lent.
CARDS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


@dataclass(frozen=True)
class Plan:
    """Sizes of every check: the GPU plan (bert-base, real batch sizes) or the CPU smoke plan."""

    device: str  # "cuda" or "cpu"
    half: str  # the mixed precision whose loss scaling is exercised: fp16 on a GPU, bf16 on the CPU
    train_steps: int
    large_batch: int  # queries per device in the GradCache memory check (x 8 passages each)
    gc_chunks: tuple[int, int]  # (query, passage) GradCache chunk sizes
    p_max_len: int
    encode_passages: int
    search_shape: tuple[int, int, int]  # (passages, dim, queries)

    @property
    def env(self) -> dict[str, str]:
        """Child-process settings over tests.helpers' CPU defaults (which pin DeepSpeed to its CPU accelerator)."""
        return {"DS_ACCELERATOR": "cuda", "OMP_NUM_THREADS": "4"} if self.device == "cuda" else {}


GPU_PLAN = Plan("cuda", "fp16", 20, 64, (32, 64), 128, 8192, (1_000_000, 768, 8000))
SMOKE_PLAN = Plan("cpu", "bf16", 2, 8, (4, 16), 32, 256, (20_000, 64, 100))


def bert_base_dir(folder: Path) -> Path:
    """A randomly initialised bert-base-size encoder (110M parameters) with the fixture tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    write_vocab(folder)
    tokens = (folder / "vocab.txt").read_text().split()
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=30522)).save_pretrained(folder)
    return folder


def train_flags(model: Path, data: Path, plan: Plan, batch: int, q_max_len: int) -> list[str]:
    return as_flags(
        model_name_or_path=model,
        dataset_name=data,
        per_device_train_batch_size=batch,
        train_n_passages=8,
        q_max_len=q_max_len,
        p_max_len=plan.p_max_len,
        max_steps=plan.train_steps,
        save_strategy="no",
        logging_steps=1,
        learning_rate="5e-6",
    )


def run_training(name: str, cmd: list[str], out: Path, plan: Plan) -> dict[str, object]:
    """Run one `dr train` and summarise its log: steps/s, last loss, all losses finite, peak GPU memory."""
    try:
        run(cmd + ["--output_dir", str(out)], timeout=240, **plan.env)
        steps, runtime = read_train_log(out)
        return {
            "steps_per_s": plan.train_steps / runtime,
            "last_loss": steps[-1]["loss"],
            "finite": all(math.isfinite(e["loss"]) for e in steps),
            "peak_gpu_gib": max(
                (e.get("peak_gpu_mem_gib", float("nan")) for e in steps), default=float("nan")
            ),
        }
    except Exception as err:  # noqa: BLE001 - report and continue with the other variants
        return {"error": error_summary(err)}


def error_summary(err: Exception) -> str:
    """The last `...Error: message` line of a failed run's output (torchrun's own trailer says nothing)."""
    lines = [line for line in str(err).splitlines() if "Error" in line and "ChildFailedError" not in line]
    return (lines[-1] if lines else str(err))[-400:]


def print_table(title: str, rows: dict[str, dict[str, object]]) -> None:
    print(f"\n| {title} | steps/s | last loss | finite | peak GPU GiB |\n|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | error: {r['error'][-300:]} | | | |")
        else:
            print(
                f"| {name} | {r['steps_per_s']:.2f} | {r['last_loss']:.3f} | {r['finite']} | {r['peak_gpu_gib']:.2f} |"
            )


def training_steps(model: Path, work: Path, plan: Plan) -> None:
    """The reference recipe's shapes (8 q x 8 p, q16/p128) in fp32, fp16, bf16 and under ZeRO-2/3."""
    data = write_jsonl(work / "train.jsonl", make_full_length_rows(256, 16, plan.p_max_len))
    base = train_flags(model, data, plan, batch=8, q_max_len=16)
    variants = {"fp32": []}
    if plan.device == "cuda":
        variants |= {"fp16": ["--fp16"]}
    variants |= {
        "bf16": ["--bf16"],
        f"{plan.half} + ZeRO-2": [f"--{plan.half}", "--deepspeed", "configs/deepspeed/zero2.json"],
        "bf16 + ZeRO-3": ["--bf16", "--deepspeed", "configs/deepspeed/zero3.json"],
    }
    rows = {}
    for name, extra in variants.items():
        launcher = torchrun(1) if "ZeRO" in name else [sys.executable]
        out = work / ("train-" + "".join(c for c in name if c.isalnum()))
        rows[name] = run_training(name, launcher + ["-m", "dr.train"] + base + extra, out, plan)
    RESULTS["training"] = rows
    print_table("training (8 q x 8 p)", rows)


def grad_cache_memory(model: Path, work: Path, plan: Plan) -> None:
    """Peak GPU memory and steps/s at a large batch, with and without GradCache, plainly and under ZeRO-2.

    In the plan's half precision: on a GPU that is fp16, so the chunk backwards also go through torch's
    GradScaler and DeepSpeed's dynamic loss scale. One GPU, so "DDP" is the plain (unwrapped) path.
    """
    data = write_jsonl(
        work / "train-large.jsonl", make_full_length_rows(4 * plan.large_batch, 32, plan.p_max_len)
    )
    base = train_flags(model, data, plan, batch=plan.large_batch, q_max_len=32) + [f"--{plan.half}"]
    q_chunk, p_chunk = plan.gc_chunks
    grad_cache = ["--grad_cache", "--gc_q_chunk_size", str(q_chunk), "--gc_p_chunk_size", str(p_chunk)]
    zero2 = ["--deepspeed", "configs/deepspeed/zero2.json"]
    variants = {
        "DDP": [],
        "DDP + GradCache": grad_cache,
        "ZeRO-2": zero2,
        "ZeRO-2 + GradCache": zero2 + grad_cache,
    }
    rows = {}
    for name, extra in variants.items():
        out = work / ("gc-" + "".join(c for c in name if c.isalnum()))
        rows[name] = run_training(name, torchrun(1) + ["-m", "dr.train"] + base + extra, out, plan)
    for plain, cached in (("DDP", "DDP + GradCache"), ("ZeRO-2", "ZeRO-2 + GradCache")):
        if "error" not in rows[plain] and "error" not in rows[cached]:
            rows[cached]["memory_ratio"] = rows[cached]["peak_gpu_gib"] / rows[plain]["peak_gpu_gib"]
            rows[cached]["speed_ratio"] = rows[cached]["steps_per_s"] / rows[plain]["steps_per_s"]
    RESULTS["grad_cache"] = rows
    print_table(f"{plan.large_batch} q x 8 p, {plan.half}, chunks {q_chunk}/{p_chunk}", rows)
    for name, r in rows.items():
        if "memory_ratio" in r:
            print(
                f"{name}: peak memory {r['memory_ratio']:.2f}x, speed {r['speed_ratio']:.2f}x of the plain step"
            )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def encoding_throughput(model_dir: Path, plan: Plan, card: tuple[float, float] | None) -> None:
    """Passages/s with fixed (p_max_len) vs length-sorted padding, and the fraction of the compute peak."""
    device = plan.device
    model = BiEncoder.from_pretrained(str(model_dir), {"pooling": "cls"}).to(device).eval()
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    flops_per_token = 2 * params  # forward FLOPs per token of the transformer layers (~170 M for bert-base)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.1, 0.45, size=plan.encode_passages).astype(int), 8, plan.p_max_len)
    batch = 256
    vocab = model.config.vocab_size
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16} if device == "cuda" else {"bf16": torch.bfloat16}
    rows = {}
    for dtype_name, dtype in dtypes.items():
        for mode in ("fixed", "sorted"):
            order = np.argsort(lengths) if mode == "sorted" else np.arange(len(lengths))
            synchronize(device)
            start = time.perf_counter()
            tokens = 0
            with torch.inference_mode(), torch.autocast(device, dtype=dtype):
                for i in range(0, len(order), batch):
                    idx = order[i : i + batch]
                    width = plan.p_max_len if mode == "fixed" else int(math.ceil(lengths[idx].max() / 8) * 8)
                    ids = torch.randint(vocab // 2, vocab, (len(idx), width), device=device)
                    mask = (
                        torch.arange(width, device=device)[None]
                        < torch.as_tensor(lengths[idx], device=device)[:, None]
                    ).long()
                    model.encode_passage({"input_ids": ids, "attention_mask": mask})
                    tokens += int(lengths[idx].sum())
            synchronize(device)
            seconds = time.perf_counter() - start
            useful = tokens * flops_per_token / seconds
            rows[f"{dtype_name}/{mode}"] = {
                "passages_per_s": len(order) / seconds,
                "useful_tflops": useful / 1e12,
                "fraction_of_peak": useful / card[0] if card else float("nan"),
            }
    RESULTS["encoding"] = rows
    print("\n| encoding | passages/s | useful TFLOP/s | of peak |\n|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['passages_per_s']:.0f} | {r['useful_tflops']:.2f} | {r['fraction_of_peak']:.2f} |"
        )
    for d in dtypes:
        ratio = rows[f"{d}/sorted"]["passages_per_s"] / rows[f"{d}/fixed"]["passages_per_s"]
        print(f"sorted / fixed padding ({d}): {ratio:.2f}x")


def search_throughput(work: Path, plan: Plan, card: tuple[float, float] | None) -> None:
    """Exact search over float16 shards: the GPU backend vs the CPU, and vs one pass at memory bandwidth."""
    from dr.io.shards import ShardMeta, write_shard
    from dr.search.cli import choose_backend
    from dr.search.exact import search_shards

    n, dim, nq = plan.search_shape
    shards = 4
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        vecs = rng.standard_normal((n // shards, dim), dtype=np.float32)
        meta = ShardMeta(
            model="x",
            pooling="cls",
            normalize=False,
            dim=dim,
            dtype="float16",
            max_length=128,
            side="passage",
            count=len(vecs),
        )
        path = work / f"p.{s}.arrow"
        write_shard(path, meta, [f"d{s}-{i}" for i in range(len(vecs))], vecs)
        paths.append(str(path))
    queries = rng.standard_normal((nq, dim), dtype=np.float32)
    gpu = choose_backend(plan.device == "cuda")
    rows: dict[str, object] = {}
    for backend in dict.fromkeys((gpu, "cpu")):
        start = time.perf_counter()
        search_shards(queries, paths, depth=100, max_memory_bytes=4 << 30, batch_size=-1, backend=backend)
        seconds = time.perf_counter() - start
        rows[backend] = {"seconds": seconds, "queries_per_s": nq / seconds}
    rows["bandwidth_bound_s"] = n * dim * 2 / card[1] if card else float("nan")
    RESULTS["search"] = rows
    print(
        f"\nsearch {n} x {dim} fp16, {nq} queries, depth 100: {gpu} {rows[gpu]['seconds']:.2f} s "
        f"({rows[gpu]['queries_per_s']:.0f} q/s), cpu {rows['cpu']['seconds']:.2f} s; "
        f"one pass at memory bandwidth {rows['bandwidth_bound_s'] * 1e3:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: check the script runs")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks (by name)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench", help="folder for gpu_results[.smoke].json"
    )
    args = parser.parse_args()
    if args.smoke:
        plan = SMOKE_PLAN
    elif torch.cuda.is_available():
        plan = GPU_PLAN
    else:
        raise SystemExit("no CUDA GPU visible (use --smoke to check the script on the CPU)")
    name = torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu (smoke)"
    card = next((v for k, v in CARDS.items() if k in name), None)
    RESULTS["device"] = name
    print("device:", name, "| torch", torch.__version__)
    if plan.device == "cuda":
        subprocess.run(["nvidia-smi", "-L"], check=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_tiny_model(work / "tiny") if args.smoke else bert_base_dir(work / "bert-base")
        checks = {  # most wanted first: a run cut short by its time limit keeps what it measured
            "grad_cache": lambda: grad_cache_memory(model, work, plan),
            "training": lambda: training_steps(model, work, plan),
            "encoding": lambda: encoding_throughput(model, plan, card),
            "search": lambda: search_throughput(work, plan, card),
        }
        for check_name, check in checks.items():
            if args.only is not None and check_name not in args.only:
                continue
            try:
                check()
            except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
                RESULTS[check_name] = {"error": repr(err)[-800:]}
                print(f"check {check_name} failed:", repr(err)[-800:])
            save_results(args.out, args.smoke)


def save_results(folder: Path, smoke: bool) -> None:
    """gpu_results[.smoke].json in `folder`, and a copy in $OUT (what comes back from a lent machine)."""
    name = "gpu_results.smoke.json" if smoke else "gpu_results.json"
    text = json.dumps(RESULTS, indent=2, default=str) + "\n"
    targets = [folder / name] + ([Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else [])
    for target in targets:
        target.write_text(text)
    print("wrote", ", ".join(map(str, targets)), flush=True)


if __name__ == "__main__":
    main()
