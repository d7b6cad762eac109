"""Every collective and every rank/world question in `dr` goes through this module.

Works unlaunched (plain `python`: rank 0 of 1), under `torchrun`, under the `deepspeed` launcher and under
SLURM `srun` (the launch scripts set RANK/WORLD_SIZE). torch is imported only when a process group is
needed (a launched multi-process job) or a tensor collective is called: a single-process CPU search never
imports it (see `dr.search`), which keeps `dr search` start-up at a plain faiss script's.

Commands use one context manager, `process_group()`: join the launcher's group, run, then leave it with a
barrier after success and without one after a failure (see there), and `exit_status` at the very end.
Commands whose ranks set up, work, then publish on rank 0 (`dr score`, `dr rerank`) use `run_phases`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dr.errors import PeerFailed

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _torch_dist() -> Any | None:
    """`torch.distributed` if torch is already imported (no group can exist otherwise), else None."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def is_initialized() -> bool:
    dist = _torch_dist()
    return dist is not None and dist.is_initialized()


def get_rank() -> int:
    """Global rank: from the process group if there is one, else from the launcher's environment."""
    if is_initialized():
        return _torch_dist().get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if is_initialized():
        return _torch_dist().get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def get_local_rank() -> int:
    """Rank on this node: picks the device only (file names and data splits use the global rank)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def launched_distributed() -> bool:
    """True when a launcher started several processes (torchrun, deepspeed, srun with our scripts)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_device() -> Any:
    """This process's torch device: its local GPU when CUDA is present, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


TIMEOUT_ENV = "DR_PROCESS_GROUP_TIMEOUT_S"  # seconds a collective may wait for the other ranks


def init_process_group(timeout_minutes: int = 30) -> bool:
    """Join the launcher's process group (NCCL on GPU, gloo on CPU); no-op when not launched distributed.

    The collective timeout is `timeout_minutes`, or `$DR_PROCESS_GROUP_TIMEOUT_S` seconds when set.
    Returns whether a process group is active afterwards.
    """
    if is_initialized():
        return True
    if not launched_distributed():
        return False
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(default_device())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if os.environ.get(TIMEOUT_ENV):
        timeout = datetime.timedelta(seconds=float(os.environ[TIMEOUT_ENV]))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def barrier() -> None:
    if is_initialized():
        _torch_dist().barrier()


@contextlib.contextmanager
def process_group(timeout_minutes: int = 30, join: bool = True) -> Iterator[bool]:
    """Join the launcher's group for the block (yields whether one is active), then leave it.

    `join=False` for code that joins it itself (the Trainer, through accelerate): only the leaving is ours.

    After success: a barrier, then `destroy_process_group` (gloo sometimes hung at interpreter exit
    without an explicit teardown). After a failure: no barrier. A rank that failed alone would wait in
    the barrier forever (its peers sit in their next collective), hiding its own traceback; leaving at
    once lets it exit non-zero, and the launcher stops the other ranks.
    """
    active = init_process_group(timeout_minutes) if join else is_initialized()
    try:
        yield active
    except BaseException:
        leave_process_group()
        raise
    barrier()
    leave_process_group()


def leave_process_group() -> None:
    """Destroy the process group without a barrier (after an error, when peers may never reach one)."""
    global _left_process_group
    if is_initialized():
        _torch_dist().destroy_process_group()
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


def all_ok(ok: bool) -> bool:
    """True when every rank reports `ok` (all-reduce MIN); doubles as a barrier. Without a group: `ok`."""
    if not is_initialized():
        return ok
    import torch

    dist = _torch_dist()
    flag = torch.tensor([1 if ok else 0], device=default_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def raise_if_any_failed(error: BaseException | None) -> None:
    """Collective: re-raise this rank's `error`; on ranks that did not fail while another did, raise
    `PeerFailed`. Every rank must call it, so that no rank is left waiting in a later collective."""
    ok = all_ok(error is None)
    if error is not None:
        raise error
    if not ok:
        raise PeerFailed("another rank failed (see its message); nothing was published")


def agreed(step: Callable[[], T]) -> T:
    """Collective: run `step` on this rank, then agree with every rank (`raise_if_any_failed`: this rank's
    error is re-raised, `PeerFailed` where another rank failed); returns the step's result. The phases
    of a distributed command (set up, work, publish) are each wrapped so no rank runs ahead of a failure."""
    error: Exception | None = None
    result = None
    try:
        result = step()
    except Exception as err:  # noqa: BLE001 - every rank must reach the agreement, then it is raised
        error = err
    raise_if_any_failed(error)
    return result  # type: ignore[return-value]


def run_phases(setup: Callable[[int, int], T], work: Callable[[T], Any], publish: Callable[[T], Any]) -> None:
    """The shape of a command whose ranks share work and whose rank 0 publishes (`dr score`, `dr rerank`).

    Inside `process_group()`: every rank runs ``setup(rank, world)`` (inputs, model, parts folder), then
    ``work(plan)`` on what setup returned, each phase ended by `agreed` (so a failing rank never leaves
    its peers waiting, and nothing is published after a failure); then rank 0 runs ``publish(plan)``.
    """
    with process_group():
        rank, world = get_rank(), get_world_size()
        plan = agreed(lambda: setup(rank, world))
        agreed(lambda: work(plan))
        if rank == 0:
            publish(plan)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Collective: rank 0 gets the list of every rank's `obj` (rank order), the others None."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    dist = _torch_dist()
    gathered = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


@functools.cache
def _all_gather_function() -> Any:
    """The autograd Function behind `all_gather_with_grad` (built on first use: torch stays unimported)."""
    import torch
    import torch.distributed as dist

    class AllGather(torch.autograd.Function):
        """all_gather whose backward returns this rank's slice of the summed upstream gradients.

        Every rank computes a loss that depends on every rank's tensor, so the gradient for rank r's input
        is the sum over all ranks of d(loss_k)/d(x_r): a reduce-scatter of the gathered gradient.
        """

        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
            world = dist.get_world_size()
            ctx.rank, ctx.world = dist.get_rank(), world
            ctx.local_rows = tensor.shape[0]
            sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
            ctx.sizes = [int(s.item()) for s in sizes]
            if len(set(ctx.sizes)) != 1:
                raise ValueError(
                    f"all ranks must contribute the same number of rows to gather, got {ctx.sizes}"
                )
            out = [torch.empty_like(tensor) for _ in range(world)]
            dist.all_gather(out, tensor.contiguous())
            return torch.cat(out, dim=0)

        @staticmethod
        def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
            grad = grad_output.contiguous()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            start = ctx.rank * ctx.local_rows
            return grad[start : start + ctx.local_rows]

    return AllGather


def all_gather_with_grad(tensor: Any) -> Any:
    """Concatenate `tensor` (rows) from every rank in rank order, keeping the autograd graph.

    Without a process group (or with one rank) this returns `tensor` itself.
    """
    if not is_initialized() or get_world_size() == 1:
        return tensor
    return _all_gather_function().apply(tensor)


def all_gather_tensor(tensor: Any) -> Any:
    """Concatenate `tensor` (rows, equal count on every rank) from every rank in rank order; no autograd."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    import torch

    out = [torch.empty_like(tensor) for _ in range(get_world_size())]
    _torch_dist().all_gather(out, tensor.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(tensor: Any) -> Any:
    """Sum `tensor` over all ranks (a copy; the input is unchanged). Without a group: `tensor`."""
    if not is_initialized() or get_world_size() == 1:
        return tensor
    total = tensor.clone()
    _torch_dist().all_reduce(total)
    return total


# ---- launch set-up (what a training run needs before accelerate/DeepSpeed look at the environment) ----


def prepare_launch(*, deepspeed: bool, bf16: bool) -> dict[str, Any]:
    """Put the process in the state `transformers.TrainingArguments` expects, before building them.

    Returns the extra TrainingArguments values that go with it (`accelerator_config`). This mutates the
    process (environment variables, accelerate's singleton state), which is why it is an explicit step of
    `dr train` and not a side effect of constructing an argument object:
    - a DeepSpeed run started with plain `python` gets a one-process rendezvous (DeepSpeed would look
      for MPI otherwise);
    - DeepSpeed without CUDA: accelerate's DeepSpeed state is created with gloo first; asked without a
      backend it silently becomes a one-process run (world size 1 on every rank).
    """
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    extra: dict[str, Any] = {}
    if deepspeed:
        _single_process_rendezvous()
        if not cuda:
            _deepspeed_state_on_cpu()
            extra["accelerator_config"] = {"use_configured_state": True}
    return extra


def _single_process_rendezvous() -> None:
    """torch.distributed variables for a run started without a launcher, on a free local port."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        os.environ.setdefault(key, value)


def _deepspeed_state_on_cpu() -> None:
    """Create accelerate's (singleton) DeepSpeed state with the gloo backend."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
