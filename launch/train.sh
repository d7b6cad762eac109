#!/usr/bin/env bash
# dr train under torchrun: fine-tune (DDP; gathered negatives across all processes).
#   bash launch/train.sh [dr train flags...]
# Environment as launch/torchrun.sh: NPROC_PER_NODE, and for several nodes NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" train "$@"
