"""`python -m dr.train` with float16 mixed precision allowed on the CPU -- for tests only.

DeepSpeed's CPU accelerator reports no fp16 support and `dr train` refuses `--fp16` without CUDA (float16
matmuls on the CPU are slow, and accelerate would silently train in float32). The tests still need the
DeepSpeed fp16 code path -- loss-scaled backward, overflow check, skipped step -- which does not depend on
speed or on the device, so this launcher lifts both refusals and runs the unmodified trainer.
"""

from __future__ import annotations

import sys

from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

import dr.train.preflight
from dr.cli import run_command
from dr.distributed import exit_status

if __name__ == "__main__":
    CPU_Accelerator.is_fp16_supported = lambda self: True
    dr.train.preflight.check_precision = lambda args: None
    sys.exit(exit_status(run_command("train", sys.argv[1:])))
