"""`dr fuse`: several runs of the same queries (dense, BM25, other models) fused into one run.

Modules: `fusion` (reciprocal rank fusion and weighted linear fusion of normalized scores, query by
query, ranked by the one tie rule), `cli` (`dr fuse`: reading the runs in any dr format, writing the
fused run and its config sidecar). See docs/fusion.md.
"""
