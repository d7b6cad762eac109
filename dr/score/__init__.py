"""`dr score`: teacher scores (cross- or bi-encoder) on every passage of a training file, for distillation
(`run`: teachers, row ranges, resume; `cli`: the command)."""
