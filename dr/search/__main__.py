"""`python -m dr.search` (Tevatron's spelling of the stage) = `dr search`; the command lives in `dr.cli.COMMANDS`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("search"))
