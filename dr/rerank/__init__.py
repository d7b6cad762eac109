"""`dr rerank`: a run's top-K candidates of each query rescored by a cross-encoder -> a new run.

Modules: `run` (inputs and their checks, the reranker, a rank's queries -> an atomic part, resume,
publishing the run), `cli` (`dr rerank`: flags, the process group). See docs/rerank.md.
"""
