"""`python -m dr.score` (so that `torchrun -m dr.score` works) = `dr score`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("score"))
