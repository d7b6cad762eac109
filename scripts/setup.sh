#!/usr/bin/env bash
# Create (or reuse) the project virtual environment in .venv and install dr with the given extras.
#
# torch is installed first and pinned: an unpinned torch (or one pulled in by another package) would
# download a multi-GB CUDA build; 2.13.0 resolves to the CPU wheel on the project machines. On a GPU
# machine set DR_TORCH_SPEC (e.g. "torch==2.13.0") to whatever build fits the CUDA driver.
# DeepSpeed is installed without building its C++/CUDA ops (DS_BUILD_OPS=0); they compile on first use.
#
# Usage: scripts/setup.sh [EXTRAS]      (EXTRAS defaults to "dev"; e.g. "demo")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${DR_VENV:-.venv}"
torch_spec="${DR_TORCH_SPEC:-torch==2.13.0}"
stamp="$venv/.dr-installed-$extras"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Reinstall only when the project definition changed since the last install with these extras.
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$torch_spec"
DS_BUILD_OPS=0 "$venv/bin/python" -m pip install -q -e ".[$extras]"
touch "$stamp"
