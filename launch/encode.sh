#!/usr/bin/env bash
# dr encode under torchrun: encode a corpus or queries, one contiguous part per process.
#   bash launch/encode.sh [dr encode flags...]
# Environment as launch/torchrun.sh: NPROC_PER_NODE, and for several nodes NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" encode "$@"
