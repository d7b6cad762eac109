"""`python -m dr.pipeline CONFIG` = `dr pipeline CONFIG`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("pipeline"))
