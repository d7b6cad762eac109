"""`python -m dr.mine` = `dr mine`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("mine"))
