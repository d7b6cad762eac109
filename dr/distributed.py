"""The one place that knows about ranks, world size and devices, plus all_gather with autograd.

Everything else asks these helpers instead of reading environment variables or calling
`torch.distributed` directly. Works unlaunched (plain `python`: rank 0 of 1), under `torchrun`,
under the `deepspeed` launcher and under SLURM `srun` (which sets RANK/WORLD_SIZE via the launch scripts).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import sys
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank: from the process group if there is one, else from the launcher's environment."""
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_distributed() -> bool:
    """True when a launcher started several processes (torchrun, deepspeed, srun with our scripts)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_device() -> torch.device:
    """This process's device: its local GPU when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(timeout_minutes: int = 30) -> bool:
    """Join the launcher's process group (NCCL on GPU, gloo on CPU); no-op when not launched distributed.

    Returns whether a process group is active afterwards.
    """
    if is_initialized():
        return True
    if not launched_distributed():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def teardown() -> None:
    """Leave the process group cleanly.

    gloo occasionally hangs in process-group cleanup at interpreter exit (seen about 1 run in 8 on CPU);
    an explicit barrier + destroy before exiting avoids it.
    """
    if is_initialized():
        dist.barrier()
        leave_process_group()


def close_process_group(succeeded: bool) -> None:
    """Leave the process group at the end of a command: with a barrier after success, without one after
    a failure. A rank that failed alone would wait in the barrier forever (its peers sit in their next
    collective), hiding its own traceback; leaving at once lets it exit non-zero, and the launcher stops
    the other ranks."""
    if succeeded:
        teardown()
    else:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group without a barrier (after an error, when peers may never reach one)."""
    global _left_process_group
    if is_initialized():
        dist.destroy_process_group()
        _left_process_group = True


_left_process_group = False


def exit_status(code: int) -> int:
    """Return `code` for `SystemExit`; in a process that has left a process group, exit right here.

    Once a distributed job is done (outputs written, barrier passed, group destroyed), the interpreter's
    own finalization can still abort it: objects that kept a reference to the group (a DDP reducer,
    DeepSpeed's communication backend) are freed late, and gloo's worker threads die with them, which the
    C++ runtime answers with "terminate called without an active exception" and SIGABRT. The launcher
    then reports a failed job whose work was complete (seen once in a CI run of ~50 two-rank launches).
    So such a process does what a normal exit does up to finalization and leaves with `os._exit`.
    """
    if not _left_process_group:
        return code
    # What a normal exit does before finalization: wait for non-daemon threads (e.g. a hub upload), run
    # the exit handlers (multiprocessing's worker cleanup, wandb/tensorboard flushes), flush the logs.
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe must not turn success into a traceback
            pass
    os._exit(code)


def print0(*args: object, **kwargs: object) -> None:
    """print() on global rank 0 only."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


class _AllGather(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed upstream gradients.

    Every rank computes a loss that depends on every rank's tensor, so the gradient for rank r's input is
    the sum over all ranks of d(loss_k)/d(x_r): a reduce-scatter of the gathered gradient.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.world = dist.get_rank(), world
        ctx.local_rows = tensor.shape[0]
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
        ctx.sizes = [int(s.item()) for s in sizes]
        if len(set(ctx.sizes)) != 1:
            raise ValueError(f"all ranks must contribute the same number of rows to gather, got {ctx.sizes}")
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_rows
        return grad[start : start + ctx.local_rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (rows) from every rank in rank order, keeping the autograd graph.

    Without a process group (or with one rank) this returns `tensor` itself.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _AllGather.apply(tensor)


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (rows, equal count on every rank) from every rank in rank order; no autograd."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)
