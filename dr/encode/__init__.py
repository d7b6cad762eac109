"""`dr encode`: a corpus or query file -> Arrow embedding shards, one per rank / array task (`run`: planning,
batching, resume and the manifest; `cli`: the command)."""
