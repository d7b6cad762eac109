"""`python -m dr.bm25` = `dr bm25`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("bm25"))
