#!/usr/bin/env bash
# GPU checks, one script (bench/gpu_check.py), about 6 minutes on one H100/H200:
#   1. GradCache: peak GPU memory and steps/s of bert-base at 64 queries x 8 passages (p_max_len 128),
#      with and without GradCache, plain and under ZeRO-2, in fp16 (GradScaler / DeepSpeed loss scale);
#   2. training steps of the reference recipe's shapes in fp32, fp16, bf16, fp16 + ZeRO-2, bf16 + ZeRO-3;
#   3. encoding throughput (fp16/bf16, fixed vs length-sorted padding) against the compute peak;
#   4. exact search of 1M x 768 fp16 vectors on the GPU against the CPU and the memory-bandwidth bound.
# The 2-rank equivalence tests need two GPUs for NCCL; on a one-GPU machine they stay CI's (gloo) job.
#
# Two set-ups:
#   - a lent machine without network (this workplace's device tool): run bench/gpu_wheels.sh here first
#     and carry .whl; they are installed over the image's Python (its torch, CUDA and the rest);
#   - any GPU machine with network: scripts/setup.sh builds .venv (DR_TORCH_SPEC=torch: a CUDA build).
# Output: tables on stdout; bench/gpu_results.json, copied to $OUT when that is set. `--smoke` checks the
# script itself on the CPU with a tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dr-site .whl/*.whl
    export PYTHONPATH="/tmp/dr-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    PY=python3
else
    [ -x .venv/bin/python ] || DR_TORCH_SPEC="${DR_TORCH_SPEC:-torch}" scripts/setup.sh dev
    PY=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dr-torch-extensions}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PY" - <<'PYEOF'
import importlib.metadata as m
names = ["torch", "transformers", "accelerate", "deepspeed", "datasets", "pyarrow", "peft", "faiss-cpu"]
print(" ".join(f"{n}={m.version(n)}" for n in names if __import__("importlib.util").util.find_spec(n.replace("-cpu", "")) is not None))
import datasets, deepspeed, dr.train  # fail here, early, if the environment is incomplete
PYEOF
timeout "${DR_GPU_CHECK_SECONDS:-540}" "$PY" -m bench.gpu_check "$@"
