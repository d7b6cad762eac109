"""`dr train`: contrastive fine-tuning with in-batch + hard negatives gathered across ranks.

args (flags) -> groups (training data: Tevatron rows or BEIR folders, validated, sampled by seed) ->
collator (tokens + docid keys) -> trainer (a `transformers.Trainer` subclass; `gradcache` for chunked
steps) -> loss (cross-device contrastive loss). `cli` is the command.
"""
