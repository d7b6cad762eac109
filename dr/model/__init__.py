"""The bi-encoder: how text becomes tokens (`text`) and tokens become vectors (`encoder`).

Training and encoding both use these two modules, so a model encodes exactly as it was trained.
"""

POOLINGS = ("cls", "mean", "last")  # how token states become one vector (see encoder.pool)
DR_CONFIG_NAME = "dr_config.json"  # a model folder's dr settings; written last, so it marks a complete model
