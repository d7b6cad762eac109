#!/usr/bin/env bash
# SciFact distillation benchmark (issue 11): round 1 contrastive -> mine negatives with the round-1 model ->
# `dr score` them with a teacher -> round 2 with --loss kl, as a mix (w = 0.5) and distillation only (w = 1),
# next to contrastive-only round 2 on the same mined negatives (the baseline: nDCG@10 0.696).
#
# Usage: bash bench/distill_scifact.sh [RUN_ROOT]     (default runs/scifact-minilm; complete stages are reused)
# Env:
#   TEACHER       teacher model folder (default: the round-1 model itself, i.e. self-distillation; a stronger
#                 teacher is the point: a larger bi-encoder or a cross-encoder from a PyPI package, or an
#                 ensemble's scores)
#   TEACHER_TYPE  bi | cross (default bi)
#   DISTIL_T      --distil_temperature (default 0.05 for bi teachers, 1.0 for cross-encoder logits)
#   SEEDS         training seeds for round 2 (default "42")
#   NPROC         processes for dr score (default 2), DR_DATA (default ../shared/data), PYTHON (default python)
# Takes over an hour on 2 CPU cores (round 1 and each round-2 training ~15 min, scoring ~10 min).
# Writes RUN_ROOT/distill-summary.txt: nDCG@10 / MRR@10 / R@100 of every run, for bench/RESULTS.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="${1:-runs/scifact-minilm}"
data="${DR_DATA:-../shared/data}/scifact"
py="${PYTHON:-python}"
nproc="${NPROC:-2}"
seeds="${SEEDS:-42}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
dr() { "$py" -m dr.cli "$@"; }
step() { echo "+ $*"; "$@"; }
start=$(date +%s)

r1="$root/fine-tuned"
d="$root/distill"
teacher="${TEACHER:-$r1/model}"
teacher_type="${TEACHER_TYPE:-bi}"
if [[ "$teacher_type" == cross ]]; then distil_t="${DISTIL_T:-1.0}"; else distil_t="${DISTIL_T:-0.05}"; fi

# 1. Round 1: contrastive on random corpus negatives (configs/scifact/minilm.yaml).
step dr pipeline configs/scifact/minilm.yaml --quiet --set "run_dir=$r1"

# 2. Rank the corpus for the training queries with the round-1 model; mine negatives from ranks [3, 50).
if [[ ! -f "$r1/train.run.txt" ]]; then
  step dr encode --model_name_or_path "$r1/model" --dataset_name "$data" --dataset_split train \
    --encode_is_qry --q_max_len 64 --bf16 --encoded_save_path "$r1/embeddings/train_queries"
  step dr search --query_reps "$r1/embeddings/train_queries.arrow" \
    --passage_reps "$r1/embeddings/corpus.*arrow" --depth 100 --save_ranking_to "$r1/train.run.txt"
fi
mkdir -p "$d"
step dr mine --run "$r1/train.run.txt" --queries "$data/queries.train.tsv" --qrels "$data/qrels.train.trec" \
  --corpus "$data/corpus.jsonl" --output "$d/train.mined.jsonl" --ranks 3 50 --n_negatives 15 --seed 42

# 3. Teacher scores on every (query, passage) of the mined file (resumable; ranks write parts).
score=(-m dr.eval.score_cli --teacher_type "$teacher_type" --model_name_or_path "$teacher" \
  --dataset_name "$d/train.mined.jsonl" --output "$d/train.scored.jsonl" --batch_size 64)
if [[ "$nproc" -gt 1 ]]; then
  step "$py" -m torch.distributed.run --nproc_per_node "$nproc" "${score[@]}"
else
  step "$py" "${score[@]}"
fi

# 4. Round 2 on the scored file: contrastive only (baseline), the 0.5 mix, and KL only; same steps and seeds.
export DR_DISTILL_TRAIN="$d/train.scored.jsonl" DR_DISTIL_TEMPERATURE="$distil_t"
runs=()
for seed in $seeds; do
  step dr pipeline configs/scifact/minilm-round2.yaml --quiet --set "run_dir=$d/contrastive-s$seed" \
    --set "train.dataset_name=$d/train.scored.jsonl" --set "train.seed=$seed"
  runs+=("contrastive-s$seed")
  for w in 0.5 1.0; do
    DR_DISTILL_WEIGHT="$w" step dr pipeline configs/scifact/minilm-distill.yaml --quiet \
      --set "run_dir=$d/kl-w$w-s$seed" --set "train.seed=$seed"
    runs+=("kl-w$w-s$seed")
  done
done

"$py" - "$d" "$teacher_type:$teacher (T=$distil_t)" "$(($(date +%s) - start))" "${runs[@]}" <<'PY' | tee "$d/distill-summary.txt"
import json, sys
folder, teacher, seconds, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
metrics = ["nDCG@10", "MRR@10", "R@100"]
print(f"SciFact test (300 queries); teacher {teacher}")
print(f"{'run':<28}" + "".join(f"{m:>9}" for m in metrics))
for run in ["../fine-tuned", *runs]:
    values = json.load(open(f"{folder}/{run}/metrics.json"))
    label = "round 1 (contrastive)" if run == "../fine-tuned" else run
    print(f"{label:<28}" + "".join(f"{values[m]:>9.4f}" for m in metrics))
print(f"wall time of this invocation: {seconds} s")
PY
