"""The bi-encoder: how text becomes tokens (`text`) and tokens become vectors (`encoder`).

Training and encoding both use these two modules, so a model encodes exactly as it was trained.
"""
