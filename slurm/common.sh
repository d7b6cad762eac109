#!/usr/bin/env bash
# Shared helpers for the slurm/ job scripts (sourced, not run).
#   PYTHON          interpreter on the compute nodes (default: python; activate your venv in ~/.bashrc
#                   or set PYTHON=/path/to/.venv/bin/python)
#   GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else 1)

dr_gpus_per_node() {
  echo "${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
}

# Print the command (shell-quoted, prefixed by "+") on stderr, then replace this shell with it.
dr_run() {
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  exec "$@"
}

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
