#!/usr/bin/env bash
# The offline demo on a fresh machine (no GPU, no model hub): create/reuse .venv, install dr, run `dr demo`.
#   bash demo.sh            # default setting, a few minutes on 2 CPU cores
#   bash demo.sh --small    # the CI setting (also DR_DEMO_SMALL=1)
# Extra arguments go to `dr demo` (see `dr demo --help`). VENV=path picks another environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

venv="${VENV:-.venv}"
# Creates the venv if needed; installs torch==2.13.0 first (an unpinned torch pulls a multi-GB CUDA build),
# then dr with the demo extra; a no-op when nothing changed since the last install.
DR_VENV="$venv" scripts/setup.sh demo
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ dr demo $*"
exec "$venv/bin/dr" demo "$@"
