"""`dr mine`: hard negatives from a run of the training queries -> a new training file (`cli`)."""
