#!/usr/bin/env bash
# Shared helpers for the slurm/ job scripts (sourced, not run).
#   PYTHON          interpreter on the compute nodes (default: python; activate your venv in ~/.bashrc
#                   or set PYTHON=/path/to/.venv/bin/python)
#   GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else 1)

dr_gpus_per_node() {
  echo "${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
}

# dr_run and the environment defaults are the launchers' own (this file is sourced by its real path,
# from the submit directory, so the repository's launch/ sits next to it).
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"
