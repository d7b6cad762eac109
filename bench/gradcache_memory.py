"""GradCache on the CPU: peak memory and speed of a large-batch step, with and without it.

GradCache's point is memory: the activations of one chunk instead of the whole batch. On a GPU that is
measured by bench/gpu_check.sh; here the same trade is measured in resident memory (RSS) of `dr train`
with the packaged MiniLM-L6 (22M parameters) at 32 queries x 8 passages, q_max_len 32, p_max_len 128,
texts filling both lengths. Rows: plain, GradCache, and both under DeepSpeed ZeRO-2 (one process); a
1-query run gives the memory that does not depend on the batch (weights, optimizer, libraries), so
"activations" = peak - that baseline.

    python -m bench.gradcache_memory            # ~6 minutes on 2 cores
    python -m bench.gradcache_memory --batch 8  # ~1 minute
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from bench.train_runs import read_train_log, run_with_peak_rss
from tests.helpers import as_flags, make_full_length_rows, minilm_dir, subprocess_env, torchrun, write_jsonl

P_MAX_LEN, Q_MAX_LEN, GROUP = 128, 32, 8


def measure(
    model: Path, data: Path, out: Path, batch: int, steps: int, extra: list[str], zero2: bool
) -> dict:
    """Run `dr train` for `steps` steps; return steps/s (Trainer's timing) and the peak RSS."""
    flags = (
        as_flags(
            model_name_or_path=model,
            dataset_name=data,
            output_dir=out,
            per_device_train_batch_size=batch,
            train_n_passages=GROUP,
            q_max_len=Q_MAX_LEN,
            p_max_len=P_MAX_LEN,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            learning_rate="1e-5",
            dataloader_num_workers=0,
        )
        + extra
    )
    if zero2:
        launcher = torchrun(1) + ["-m", "dr.train"]
        flags += ["--deepspeed", str(REPO / "configs" / "deepspeed" / "zero2.json")]
    else:
        launcher = [sys.executable, "-m", "dr.train"]
    _, peak_mib = run_with_peak_rss(launcher + flags, subprocess_env(OMP_NUM_THREADS="2"), str(REPO))
    logged, runtime = read_train_log(out)
    return {"steps_per_s": steps / runtime, "peak_rss_mib": peak_mib, "first_loss": logged[0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32, help="queries per step (x 8 passages)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--q_chunk", type=int, default=8)
    parser.add_argument("--p_chunk", type=int, default=32)
    args = parser.parse_args()
    gc = ["--grad_cache", "--gc_q_chunk_size", str(args.q_chunk), "--gc_p_chunk_size", str(args.p_chunk)]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = minilm_dir()
        data = write_jsonl(work / "train.jsonl", make_full_length_rows(4 * args.batch, Q_MAX_LEN, P_MAX_LEN))
        plan = {
            "baseline (1 query)": (1, [], False),
            "plain": (args.batch, [], False),
            "GradCache": (args.batch, gc, False),
            "ZeRO-2": (args.batch, [], True),
            "ZeRO-2 + GradCache": (args.batch, gc, True),
        }
        for name, (batch, extra, zero2) in plan.items():
            out = work / "".join(c for c in name if c.isalnum())
            rows[name] = measure(model, data, out, batch, args.steps, extra, zero2)
            print(f"  done {name}: {rows[name]}", flush=True)
    base = rows["baseline (1 query)"]["peak_rss_mib"]
    print(
        f"\nMiniLM-L6, {args.batch} queries x {GROUP} passages (q{Q_MAX_LEN}/p{P_MAX_LEN}), fp32, "
        f"GradCache chunks {args.q_chunk} queries / {args.p_chunk} passages, {args.steps} steps\n"
    )
    print("| run | steps/s | speed vs plain | peak RSS MiB | activations MiB (peak - baseline) | vs plain |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        plain = rows["ZeRO-2" if name.startswith("ZeRO-2") else "plain"]
        act = r["peak_rss_mib"] - base
        nan = name == "baseline (1 query)"
        memory = float("nan") if nan else act / (plain["peak_rss_mib"] - base)
        speed = float("nan") if nan else r["steps_per_s"] / plain["steps_per_s"]
        print(
            f"| {name} | {r['steps_per_s']:.3f} | {speed:.2f} | {r['peak_rss_mib']:.0f} | {act:.0f} | {memory:.2f} |"
        )
    print(
        "\nFirst-step losses (they differ with GradCache only through dropout masks drawn per chunk): "
        + ", ".join(f"{name} {r['first_loss']:.4f}" for name, r in rows.items())
    )


if __name__ == "__main__":
    main()
