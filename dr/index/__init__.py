"""Search structures built from passage shards: `dr index` (`build`, `cli`: one faiss index per passage shard,
trained once, built in parallel on the row-range primitive) and `dr quantize` (`quantize`, `quantize_cli`:
int8 / binary codes). Searching them is `dr search`'s (`dr.search.ann`, `dr.search.quantized`)."""
