"""`python -m dr.rerank` = `dr rerank`; the command lives in `dr.cli.COMMANDS`."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("rerank"))
