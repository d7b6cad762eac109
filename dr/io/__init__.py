"""Files in and out: atomic writes, `~` paths, the one input resolver + `TextCorpus`, qrels and run files.

Nothing here imports torch: every command can read and write its files without it.
"""
