#!/usr/bin/env bash
# GPU checks, one script, meant to finish in under 8 minutes on one GPU (run it when a GPU is lent):
#   1. the gathered-loss equivalence tests (NCCL when >= 2 GPUs, else gloo on the CPU as in CI);
#   2. a few fp16 and bf16 training steps of a bert-base-size model (loss finite, steps/s);
#   3. ZeRO-2 and ZeRO-3 steps under DeepSpeed;
#   4. encoding throughput (bert-base, fp16/bf16) vs the compute bound, and vs fixed padding;
#   5. exact search on the GPU (faiss-gpu if installed, else torch matmul + top-k) vs memory bandwidth.
# Output: a table per check on stdout, and bench/gpu_results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    DR_TORCH_SPEC="${DR_TORCH_SPEC:-torch}" scripts/setup.sh dev
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dr-torch-extensions}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_loss.py tests/test_train_distributed.py -k "ddp or gathered or zero2" || echo "equivalence tests FAILED"
timeout 330 python bench/gpu_check.py "$@"
