#!/usr/bin/env bash
# SciFact benchmark: BM25 vs zero-shot MiniLM vs MiniLM fine-tuned with `dr` (configs/scifact/minilm.yaml)
# vs a second round trained on negatives mined with the first (configs/scifact/minilm-round2.yaml).
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

# Round 2: rank the corpus for the training queries with the round-1 model, mine, retrain.
r1="$root/fine-tuned"
r2="$root/round2"
if [[ ! -f "$r1/train.run.txt" ]]; then
  step "$py" -m dr.encode --model_name_or_path "$r1/model" --dataset_name "$data" --dataset_split train \
    --encode_is_qry --q_max_len 64 --bf16 --encoded_save_path "$r1/embeddings/train_queries"
  step "$py" -m dr.search --query_reps "$r1/embeddings/train_queries.arrow" \
    --passage_reps "$r1/embeddings/corpus.*arrow" --depth 100 --save_ranking_to "$r1/train.run.txt"
fi
mkdir -p "$r2"
step "$py" -m dr.mine --run "$r1/train.run.txt" --queries "$data/queries.train.tsv" \
  --qrels "$data/qrels.train.trec" --corpus "$data/corpus.jsonl" --output "$r2/train.mined.jsonl" \
  --ranks 3 50 --n_negatives 15 --seed 42
export DR_ROUND2_TRAIN="$r2/train.mined.jsonl"
step "$py" -m dr.pipeline configs/scifact/minilm-round2.yaml --quiet --set "run_dir=$r2"

"$py" - "$root" "$(($(date +%s) - start))" <<'PY'
import json, sys
root, seconds = sys.argv[1], int(sys.argv[2])
rows = [("BM25 (bm25s)", "bm25"), ("MiniLM zero-shot", "zero-shot"), ("MiniLM fine-tuned (dr)", "fine-tuned"),
        ("round 2: mined negatives (dr mine)", "round2")]
metrics = ["nDCG@10", "MRR@10", "R@100"]
print(f"\nSciFact test (300 queries)        " + "".join(f"{m:>9}" for m in metrics))
for label, sub in rows:
    values = json.load(open(f"{root}/{sub}/metrics.json"))
    print(f"{label:<34}" + "".join(f"{values[m]:>9.4f}" for m in metrics))
print(f"{'BM25 (BEIR paper)':<34}{0.665:>9.4f}")
print(f"wall time of this invocation: {seconds} s")
PY
