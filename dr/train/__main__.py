"""`python -m dr.train` = `dr train` (launch it under torchrun or deepspeed for several processes)."""

from dr.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("train"))
