#!/usr/bin/env bash
# Run the tests on the CPU: sets up .venv (scripts/setup.sh dev), then pytest.
#
#   bash test.sh            the fast tier: unit and small in-process tests (`-m "not slow"`, a few minutes)
#   bash test.sh --all      the full tier: also multi-process (gloo), DeepSpeed, SLURM and the demo (CI's)
#   bash test.sh --lint     ruff check + ruff format --check only
#
# Other arguments go to pytest, e.g. `bash test.sh tests/search/test_exact.py -k ties` or `bash test.sh --lf`
# (pytest's cache is on, so --lf reruns the last failures).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh dev
# shellcheck disable=SC1091
source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dr-torch-extensions}"

lint() {
    ruff check dr tests bench
    ruff format --check dr tests bench
}

tier=(-m "not slow")
args=()
for arg in "$@"; do
    case "$arg" in
        --all) tier=() ;;
        --lint) lint; exit 0 ;;
        *) args+=("$arg") ;;
    esac
done
# A path or -m/-k given explicitly selects tests itself: then no tier filter is added.
for arg in "${args[@]+"${args[@]}"}"; do
    case "$arg" in
        -m|tests*|*.py*) tier=() ;;
    esac
done
python -m pytest -q --durations=15 "${tier[@]+"${tier[@]}"}" "${args[@]+"${args[@]}"}"
