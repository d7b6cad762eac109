#!/usr/bin/env bash
# Run any dr command under torchrun, on one node or several.
#
#   bash launch/torchrun.sh COMMAND [dr flags...]      COMMAND: train | encode | search
#
# Single node (default): NPROC_PER_NODE processes (default: the GPU count, else 1).
# Multi-node: run the same line on every node with
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0 host> MASTER_PORT=29500 NPROC_PER_NODE=8
# Extra arguments are passed to the dr command unchanged.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

if [[ $# -lt 1 ]]; then
  echo "usage: $0 train|encode|search [flags...]" >&2
  exit 2
fi
command_name="$1"
shift
case "$command_name" in
  train | encode | search) module="dr.$command_name" ;;
  *) echo "$0: unknown command '$command_name' (train, encode or search)" >&2; exit 2 ;;
esac

nnodes="${NNODES:-1}"
nproc="${NPROC_PER_NODE:-$(dr_default_nproc)}"
launcher=("${PYTHON:-python}" -m torch.distributed.run --nproc_per_node "$nproc")
if [[ "$nnodes" -eq 1 && -z "${MASTER_ADDR:-}" ]]; then
  launcher+=(--standalone)  # one node: a local rendezvous on a free port
else
  launcher+=(--nnodes "$nnodes" --node_rank "${NODE_RANK:-0}"
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
fi
dr_run "${launcher[@]}" -m "$module" "$@"
