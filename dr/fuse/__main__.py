"""`python -m dr.fuse` = `dr fuse`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("fuse"))
