"""`python -m dr.train` = `dr train` (launch it under torchrun or deepspeed for several processes)."""

from dr.distributed import exit_status
from dr.train.cli import main

if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
