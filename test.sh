#!/usr/bin/env bash
# Run the test suite: sets up .venv (scripts/setup.sh) and runs pytest on the CPU.
# Extra arguments go to pytest, e.g. `bash test.sh -m "not slow"` or `bash test.sh tests/test_train.py`.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh dev
# shellcheck disable=SC1091
source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dr-torch-extensions}"
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
