"""`dr search`: which shards a search reads (`shard_set`, `shard_check`), exact scoring and the exact top-k
merge (`exact`), the quantized first pass with exact rescoring (`quantized`), the search of a `dr index`
folder, shard by shard, merged exactly (`ann`), and the command (`cli`)."""
