#!/usr/bin/env bash
# SciFact benchmark: BM25 vs zero-shot MiniLM vs MiniLM fine-tuned with `dr` (configs/scifact/minilm.yaml).
# Usage: bash bench/scifact.sh [RUN_ROOT]     (default runs/scifact-minilm; reruns reuse complete stages)
# Env: DR_DATA (default ../shared/data), PYTHON (default python).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="${1:-runs/scifact-minilm}"
data="${DR_DATA:-../shared/data}/scifact"
py="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

step() { echo "+ $*"; "$@"; }

step "$py" -m dr.demo bm25 --corpus "$data/corpus.jsonl" --queries "$data/queries.test.tsv" \
  --qrels "$data/qrels.test.trec" --output_dir "$root/bm25" --metrics nDCG@10 MRR@10 R@100
step "$py" -m dr.pipeline configs/scifact/minilm.yaml --quiet --set train=null --set "run_dir=$root/zero-shot"
step "$py" -m dr.pipeline configs/scifact/minilm.yaml --quiet --set "run_dir=$root/fine-tuned"

"$py" - "$root" "$(($(date +%s) - start))" <<'PY'
import json, sys
root, seconds = sys.argv[1], int(sys.argv[2])
rows = [("BM25 (bm25s)", "bm25"), ("MiniLM zero-shot", "zero-shot"), ("MiniLM fine-tuned (dr)", "fine-tuned")]
metrics = ["nDCG@10", "MRR@10", "R@100"]
print(f"\nSciFact test (300 queries)        " + "".join(f"{m:>9}" for m in metrics))
for label, sub in rows:
    values = json.load(open(f"{root}/{sub}/metrics.json"))
    print(f"{label:<34}" + "".join(f"{values[m]:>9.4f}" for m in metrics))
print(f"{'BM25 (BEIR paper)':<34}{0.665:>9.4f}")
print(f"wall time of this invocation: {seconds} s")
PY
