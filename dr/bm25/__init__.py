"""`dr bm25`: a lexical BM25 run over any corpus `dr encode` reads, in dr's run formats and tie rule.

BM25 is the usual first-stage baseline and the usual partner of a dense run in `dr fuse`. The scoring is
`bm25s` (Lucene's BM25 variant, the one pyserini uses); dr adds what a pipeline stage needs around it:
the one input resolver (`dr.io.corpus`), an on-disk index that is reused only for the same corpus and
settings (`index`), and a cut-off at ``depth`` under the one tie rule (`search`, via `dr.ranking`).

Modules: `index` (settings, tokenization, build / save / reuse with a fingerprint), `search` (per-query
top-k under the tie rule, threaded), `cli` (`dr bm25`).
"""
