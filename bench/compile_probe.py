"""Does `torch.compile` speed up the encoder's forward on this CPU? Eager vs compiled, alternating.

A probe for issue 14's encoding goal (fp32 >= 1.1x sentence-transformers): both tools run the same Hugging
Face forward, so the lever would have to make that forward itself faster. This times the MiniLM forward on
a few padded batches (the shapes `dr encode` sends: 32 passages of 192-256 tokens, part of them padded),
eager and ``torch.compile(dynamic=True)``, rounds alternating, and prints the ratio and the compile time.

    python -m bench.compile_probe                     # all-MiniLM-L6-v2, 3 batches x 3 rounds
    python -m bench.compile_probe --lengths 128,256 --rounds 5
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="HF model folder (default: the offline all-MiniLM-L6-v2)"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lengths", default="256,224,192", help="comma-separated batch widths (tokens)")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)

    import torch
    from transformers import AutoModel

    from bench.encode import default_model

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(opts.model or default_model()).eval()
    batches = []
    for width in (int(x) for x in opts.lengths.split(",")):
        mask = torch.ones(opts.batch_size, width, dtype=torch.long)
        mask[: opts.batch_size // 2, width - width // 8 :] = (
            0  # half the rows padded, as length-sorted batches
        )
        batches.append({"input_ids": torch.randint(1000, 20000, mask.shape), "attention_mask": mask})

    def forward(fn) -> tuple[float, list]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = [fn(**batch).last_hidden_state for batch in batches]
        return time.perf_counter() - start, out

    compiled = torch.compile(model, dynamic=True)
    compile_s, out_compiled = forward(compiled)  # the first call compiles
    _, out_eager = forward(model)
    diff = max((a - b).abs().max().item() for a, b in zip(out_eager, out_compiled))
    print(f"{len(batches)} batches of {opts.batch_size} x {opts.lengths} tokens, {torch.get_num_threads()} threads; "
          f"compile + first call {compile_s:.1f} s; max |eager - compiled| {diff:.1e}\n")  # fmt: skip
    print("| round | eager s | compiled s | eager / compiled |")
    print("|---|---|---|---|")
    ratios = []
    for r in range(opts.rounds):
        eager_s, _ = forward(model)
        compiled_s, _ = forward(compiled)
        ratios.append(eager_s / compiled_s)
        print(f"| {r} | {eager_s:.2f} | {compiled_s:.2f} | {ratios[-1]:.2f}x |")
    print(f"\nmean speed-up of torch.compile: {sum(ratios) / len(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
