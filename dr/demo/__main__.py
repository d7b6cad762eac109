"""`python -m dr.demo` = `dr demo`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("demo"))
