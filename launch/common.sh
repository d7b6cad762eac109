#!/usr/bin/env bash
# Shared helpers for the launch/ scripts (sourced, not run).
#   PYTHON           interpreter (default: python)
#   NPROC_PER_NODE   processes per node (default: number of GPUs from nvidia-smi, else 1)

# Number of local GPUs, or 1 on a CPU-only machine.
dr_default_nproc() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  fi
  if [[ "${n:-0}" -gt 0 ]]; then echo "$n"; else echo 1; fi
}

# Print the command (shell-quoted, prefixed by "+") on stderr, then replace this shell with it.
dr_run() {
  printf '+' >&2
  printf ' %q' "$@" >&2
  printf '\n' >&2
  exec "$@"
}

# Offline-friendly defaults; callers may override any of them.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
