#!/usr/bin/env bash
# SciFact Matryoshka benchmark (issue 25): the plain MiniLM recipe (configs/scifact/minilm.yaml) and the same
# recipe with a Matryoshka loss (configs/scifact/minilm-matryoshka.yaml), two seeds each, then
# `python -m bench.matryoshka`: nDCG@10 at 384 / 256 / 128 / 64 dimensions, exact and binary + rescore,
# a markdown table and a PNG.
# Usage: bash bench/matryoshka_scifact.sh [RUN_ROOT]   (default runs/scifact-minilm; complete stages are reused,
#        so a stopped run continues where it stopped)
# Env: SEEDS (default "42 43"), DR_DATA (default ../shared/data), PYTHON (default python).
# Takes ~30 min per model on 2 CPU cores without AVX-512 (20 min training, 10 min encoding the corpus).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="${1:-runs/scifact-minilm}"
py="${PYTHON:-python}"
seeds="${SEEDS:-42 43}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step() { echo "+ $*" >&2; "$@"; }

plain=() mrl=()
for seed in $seeds; do
  # seed 42's plain model is round 1 of bench/scifact.sh (same folder, reused when it is there)
  p="$root/fine-tuned"; [[ "$seed" == 42 ]] || p="$root/fine-tuned-seed$seed"
  m="$root/matryoshka"; [[ "$seed" == 42 ]] || m="$root/matryoshka-seed$seed"
  step "$py" -m dr.pipeline configs/scifact/minilm.yaml --quiet --set "run_dir=$p" --set "train.seed=$seed"
  step "$py" -m dr.pipeline configs/scifact/minilm-matryoshka.yaml --quiet --set "run_dir=$m" --set "train.seed=$seed"
  plain+=("$p") mrl+=("$m")
done
step "$py" -m bench.matryoshka --plain "${plain[@]}" --matryoshka "${mrl[@]}" --work "$root/matryoshka-bench"
