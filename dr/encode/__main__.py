"""`python -m dr.encode` (Tevatron's spelling of the stage) = `dr encode`; the command lives in `dr.cli.COMMANDS`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("encode"))
