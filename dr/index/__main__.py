"""`python -m dr.index` (so that `torchrun -m dr.index` works) = `dr index`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("index"))
