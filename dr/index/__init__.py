"""Search structures built from passage shards: faiss indexes (`ann`) and int8 / binary codes (`quantize`,
`dr quantize` in `quantize_cli`)."""
