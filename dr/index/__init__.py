"""Embeddings and search: the shard format (`shards`, torch-free), `dr encode` (`encode`, `encode_cli`),
exact search (`exact`: block scoring and the exact top-k merge), approximate faiss indexes (`ann`) and
`dr search` (`search_cli`).
"""
