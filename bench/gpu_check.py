"""GPU measurements for bench/gpu_check.sh: training steps, encoding and search throughput.

Every number is measured in this one process on the GPU it finds, with a baseline in the same run:
fp32 vs fp16/bf16 for training, fixed padding vs length-sorted batches for encoding, and the roofline
(compute bound for encoding, memory-bandwidth bound for search).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dr.model import BiEncoder
from tests.helpers import make_train_rows, run, torchrun, write_jsonl, write_vocab

RESULTS: dict[str, object] = {}


def bert_base_dir(folder: Path) -> Path:
    """A randomly initialised bert-base-size encoder (110M parameters) with the fixture tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    write_vocab(folder)
    tokens = (folder / "vocab.txt").read_text().split()
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=30522)).save_pretrained(folder)
    return folder


def training_steps(model: Path, work: Path) -> None:
    data = write_jsonl(work / "train.jsonl", make_train_rows(512, n_negatives=7))
    base = [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--per_device_train_batch_size",
        "8",
        "--train_n_passages",
        "8",
        "--q_max_len",
        "16",
        "--p_max_len",
        "128",
        "--max_steps",
        "30",
        "--save_strategy",
        "no",
        "--logging_steps",
        "10",
        "--learning_rate",
        "5e-6",
    ]
    rows = {}
    for name, extra in {
        "fp32": [],
        "fp16": ["--fp16"],
        "bf16": ["--bf16"],
        "fp16+zero2": ["--fp16", "--deepspeed", "configs/deepspeed/zero2.json"],
        "bf16+zero3": ["--bf16", "--deepspeed", "configs/deepspeed/zero3.json"],
    }.items():
        out = work / f"train-{name}"
        launcher = torchrun(1) + ["-m", "dr.train"] if "zero" in name else [sys.executable, "-m", "dr.train"]
        try:
            run(launcher + base + ["--output_dir", str(out)] + extra, timeout=240)
            history = json.loads((out / "trainer_state.json").read_text())["log_history"]
            losses = [e["loss"] for e in history if "loss" in e]
            runtime = next(e["train_runtime"] for e in history if "train_runtime" in e)
            rows[name] = {
                "steps_per_s": 30 / runtime,
                "last_loss": losses[-1],
                "finite": all(map(math.isfinite, losses)),
            }
        except Exception as err:  # noqa: BLE001 - report and continue with the other checks
            rows[name] = {"error": str(err)[-500:]}
    RESULTS["training"] = rows
    print("\n| training (bert-base, 8 q x 8 p, q16/p128) | steps/s | last loss | finite |\n|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r.get('steps_per_s', float('nan')):.2f} | {r.get('last_loss', float('nan')):.3f} | "
            f"{r.get('finite', r.get('error', ''))} |"
        )


def grad_cache_memory(model: Path, work: Path) -> None:
    """Peak GPU memory and steps/s at a large batch (64 queries x 8 passages), with and without GradCache."""
    data = write_jsonl(work / "train-large.jsonl", make_train_rows(1024, n_negatives=7))
    base = [
        "--model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--per_device_train_batch_size",
        "64",
        "--train_n_passages",
        "8",
        "--q_max_len",
        "32",
        "--p_max_len",
        "128",
        "--max_steps",
        "8",
        "--save_strategy",
        "no",
        "--logging_steps",
        "4",
        "--bf16",
        "--skip_memory_metrics",
        "false",
    ]
    variants = {
        "DDP": [],
        "DDP + GradCache": ["--grad_cache", "--gc_q_chunk_size", "32", "--gc_p_chunk_size", "64"],
        "ZeRO-2": ["--deepspeed", "configs/deepspeed/zero2.json"],
        "ZeRO-2 + GradCache": [
            "--deepspeed",
            "configs/deepspeed/zero2.json",
            "--grad_cache",
            "--gc_q_chunk_size",
            "32",
            "--gc_p_chunk_size",
            "64",
        ],
    }
    rows = {}
    for name, extra in variants.items():
        out = work / f"gc-{name.replace(' ', '')}"
        try:
            run(torchrun(1) + ["-m", "dr.train"] + base + ["--output_dir", str(out)] + extra, timeout=240)
            history = json.loads((out / "trainer_state.json").read_text())["log_history"]
            final = next(e for e in history if "train_runtime" in e)
            rows[name] = {
                "steps_per_s": 8 / final["train_runtime"],
                "peak_gpu_mib": final.get("train_mem_gpu_peaked_delta", float("nan")) / 2**20
                + final.get("train_mem_gpu_alloc_delta", 0) / 2**20,
            }
        except Exception as err:  # noqa: BLE001
            rows[name] = {"error": str(err)[-500:]}
    RESULTS["grad_cache"] = rows
    print(
        "\n| bert-base, 64 q x 8 p, bf16 | steps/s | peak GPU MiB (Trainer memory tracker) |\n|---|---|---|"
    )
    for name, r in rows.items():
        print(
            f"| {name} | {r.get('steps_per_s', float('nan')):.2f} | {r.get('peak_gpu_mib', r.get('error', ''))} |"
        )


def encoding_throughput(model_dir: Path) -> None:
    model = BiEncoder.from_pretrained(str(model_dir), {"pooling": "cls"}).cuda().eval()
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(4.1, 0.45, size=8192).astype(int), 8, 128)  # MS MARCO-like lengths
    batch = 256
    flops_per_token = 2 * 85e6  # ~170 MFLOP per token forward for bert-base encoder layers
    peak = {"fp16": 989e12, "bf16": 989e12}  # H100 SXM dense tensor-core peak; adjust for other cards
    rows = {}
    for dtype_name, dtype in {"fp16": torch.float16, "bf16": torch.bfloat16}.items():
        for mode in ("fixed", "sorted"):
            order = np.argsort(lengths) if mode == "sorted" else np.arange(len(lengths))
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = 0
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                for i in range(0, len(order), batch):
                    idx = order[i : i + batch]
                    width = 128 if mode == "fixed" else int(math.ceil(lengths[idx].max() / 8) * 8)
                    ids = torch.randint(1000, 30000, (len(idx), width), device="cuda")
                    mask = (
                        torch.arange(width, device="cuda")[None]
                        < torch.as_tensor(lengths[idx], device="cuda")[:, None]
                    ).long()
                    model.encode_passage({"input_ids": ids, "attention_mask": mask})
                    tokens += int(lengths[idx].sum())
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rows[f"{dtype_name}/{mode}"] = {
                "passages_per_s": len(order) / seconds,
                "useful_tflops": tokens * flops_per_token / seconds / 1e12,
                "fraction_of_peak": tokens * flops_per_token / seconds / peak[dtype_name],
            }
    RESULTS["encoding"] = rows
    print("\n| encoding (bert-base) | passages/s | useful TFLOP/s | of peak |\n|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['passages_per_s']:.0f} | {r['useful_tflops']:.1f} | {r['fraction_of_peak']:.2f} |"
        )
    for d in ("fp16", "bf16"):
        print(
            f"sorted / fixed padding ({d}): {rows[f'{d}/sorted']['passages_per_s'] / rows[f'{d}/fixed']['passages_per_s']:.2f}x"
        )


def search_throughput(work: Path) -> None:
    from dr.search import search_shards
    from dr.shards import ShardMeta, write_shard

    n, dim, nq, shards = 1_000_000, 768, 8000, 4
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
    rows = {}
    from dr.search import choose_backend

    for backend in (choose_backend(True), "cpu"):
        start = time.perf_counter()
        search_shards(queries, paths, depth=100, max_memory_bytes=4 << 30, batch_size=-1, backend=backend)
        seconds = time.perf_counter() - start
        rows[backend] = {"seconds": seconds, "queries_per_s": nq / seconds}
    bandwidth = 3.35e12  # H100 SXM HBM3 bytes/s; one pass over fp16 vectors per query batch
    rows["bandwidth_bound_s"] = n * dim * 2 / bandwidth
    RESULTS["search"] = rows
    gpu = choose_backend(True)
    print(
        f"\nsearch 1M x {dim} fp16, {nq} queries, depth 100: GPU ({gpu}) {rows[gpu]['seconds']:.2f} s "
        f"({rows[gpu]['queries_per_s']:.0f} q/s), CPU {rows['cpu']['seconds']:.2f} s; "
        f"one pass at memory bandwidth {rows['bandwidth_bound_s'] * 1e3:.2f} ms"
    )


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible")
    RESULTS["device"] = torch.cuda.get_device_name(0)
    print("device:", RESULTS["device"], "| torch", torch.__version__)
    subprocess.run(["nvidia-smi", "-L"], check=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = bert_base_dir(work / "bert-base")
        for check in (
            lambda: encoding_throughput(model),
            lambda: search_throughput(work),
            lambda: training_steps(model, work),
        ):
            try:
                check()
            except Exception as err:  # noqa: BLE001 - one failing check must not hide the others
                print("check failed:", repr(err)[-800:])
    (REPO / "bench" / "gpu_results.json").write_text(json.dumps(RESULTS, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
