#!/usr/bin/env bash
# dr search under torchrun: exact sharded search, shards split across processes, rank 0 writes the run.
#   bash launch/search.sh [dr search flags...]
# Environment as launch/torchrun.sh: NPROC_PER_NODE, and for several nodes NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" search "$@"
