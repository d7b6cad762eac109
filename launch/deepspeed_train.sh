#!/usr/bin/env bash
# dr train under the DeepSpeed launcher with a ZeRO stage or a DeepSpeed config file.
#
#   bash launch/deepspeed_train.sh STAGE|CONFIG.json [dr train flags...]
#     STAGE 0-3 -> configs/deepspeed/zero<STAGE>.json
#
# NPROC_PER_NODE processes (default: the GPU count, else 1; on CPU DeepSpeed uses gloo).
# Several nodes: HOSTFILE=<DeepSpeed hostfile> (plus NNODES, MASTER_ADDR, MASTER_PORT if needed).
# `bash launch/torchrun.sh train --deepspeed CONFIG ...` is equivalent on one node.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"

if [[ $# -lt 1 ]]; then
  echo "usage: $0 0|1|2|3|CONFIG.json [dr train flags...]" >&2
  exit 2
fi
stage="$1"
shift
if [[ "$stage" =~ ^[0-3]$ ]]; then
  config="$here/../configs/deepspeed/zero$stage.json"
else
  config="$stage"
fi
if [[ ! -f "$config" ]]; then
  echo "$0: DeepSpeed config '$config' not found" >&2
  exit 2
fi

launcher=(deepspeed --num_gpus "${NPROC_PER_NODE:-$(dr_default_nproc)}" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${HOSTFILE:-}" ]]; then
  launcher+=(--hostfile "$HOSTFILE" --num_nodes "${NNODES:-1}")
  if [[ -n "${MASTER_ADDR:-}" ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
fi
dr_run "${launcher[@]}" --module dr.train --deepspeed "$config" "$@"
