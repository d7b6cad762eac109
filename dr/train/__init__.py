"""`dr train`: contrastive fine-tuning with in-batch + hard negatives gathered across ranks.

args (flags) -> groups (training data: Tevatron rows or BEIR folders, validated, sampled by seed) ->
collator (tokens + docid keys) -> model (vectors) -> loss (`losses/`, by name: gathered contrastive,
distillation) -> trainer (a `transformers.Trainer` subclass that owns the loss; `gradcache` for chunked
steps). `cli` is the command: `preflight` checks, `build` makes the parts it composes.
"""
