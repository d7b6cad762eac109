"""GradCache: the contrastive loss of a large batch with the activation memory of a small chunk.

Idea (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): the
loss depends on the encoder parameters only through the representations. So

1. encode the queries and passages chunk by chunk *without* an autograd graph;
2. compute the loss on all of them (gathered across ranks exactly like the plain path, by calling the
   trainer's own loss, `call_loss`) and its gradient with respect to the representations only, in float32;
3. re-encode each chunk *with* a graph and back-propagate the surrogate `(reps * cached_grad).sum()`,
   whose parameter gradient is that chunk's share of d(loss)/d(theta). The chunks' gradients add up to
   the plain gradient.

Peak activation memory is that of one chunk (under ZeRO-3, one query plus one passage chunk in the first
backward, see `backward_units`); the price is a second forward pass of every chunk.

What must match the plain `Trainer.training_step` exactly, and how:
- Dropout: step 3 replays, per chunk, the RNG state captured before that chunk's step-1 forward, so both
  forwards draw the same masks (otherwise the cached gradient belongs to different representations).
- DDP: every chunk backward but the last runs under `no_sync`; the last one's all-reduce carries the
  accumulated gradients. Chunks are run through the wrapper (`model(...)`), so DDP's forward prepares the
  reducer (and finds unused parameters) as in the plain path.
- DeepSpeed: every backward goes through the engine (loss scaling, ZeRO gradient partitioning). Chunk
  backwards before the last are marked as *not* at the gradient-accumulation boundary, so ZeRO 0/1 reduce
  once at the last chunk and ZeRO 2/3 accumulate their (per-backward) reduced partitions; only the last
  chunk's backward may end the accumulation window and step, exactly as the Trainer's own backward.
  Under ZeRO-3 the engine's module hooks gather the partitioned parameters for every chunk forward.
- Gradient accumulation / mixed precision: the loss is divided by the accumulation steps like the plain
  path; chunk forwards run under the Trainer's loss context and the accelerator's autocast (which the plain
  path gets from accelerate's wrapped `forward`, bypassed here), and the surrogate is built in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import nn

Batch = dict[str, torch.Tensor]


class RngState:
    """The CPU (and, for a CUDA chunk, that device's) RNG state at one moment, for replaying dropout."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_devices: list[int] = []
        self.cuda: list[torch.Tensor] = []
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.cuda_devices = [index]
            self.cuda = [torch.cuda.get_rng_state(index)]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block from the captured state; the global RNG streams continue afterwards as before."""
        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu)
            for index, state in zip(self.cuda_devices, self.cuda):
                torch.cuda.set_rng_state(state, index)
            yield


def split_batch(batch: Batch, chunk_size: int) -> list[Batch]:
    """Cut every tensor of a tokenised batch into row chunks of at most `chunk_size` (the last may be smaller).

    Chunks keep the batch's padded length, so each row is encoded exactly as in the full batch.
    """
    if chunk_size < 1:
        raise ValueError(f"GradCache chunk size must be >= 1, got {chunk_size}")
    rows = next(iter(batch.values())).shape[0]
    return [
        {k: v[start : start + chunk_size] for k, v in batch.items()} for start in range(0, rows, chunk_size)
    ]


@contextlib.contextmanager
def forward_as(module: nn.Module, fn: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Make `module(...)` call `fn` for the duration of the block.

    The DDP / DeepSpeed wrappers only ever call `module(...)`, whose forward encodes both sides of a batch. To
    run one encoder on one chunk *through* the wrapper (DDP's reducer bookkeeping, the engine's backward hooks and
    ZeRO-3 parameter gathering), the instance attribute `forward` is swapped and restored afterwards,
    including a forward that accelerate may itself have set on the instance.
    """
    saved = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def _encoder_call(encode: Callable[[Batch], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Adapt `encode_query` / `encode_passage` to the keyword call `model(batch=chunk)`."""

    def call(batch: Batch) -> torch.Tensor:
        return encode(batch)

    return call


def backward_units(n_query_chunks: int, n_passage_chunks: int, pair_first: bool) -> list[list[int]]:
    """Which chunks (indices into queries-then-passages) each backward of step 3 covers: one each, except
    that with `pair_first` the first backward takes the first query chunk *and* the first passage chunk.

    Pairing is for DeepSpeed ZeRO-3, which overwrites a parameter's gradient partition in the first backward
    of an optimizer step and adds to it in later ones, keyed on its micro-step counter rather than on which
    parameters a backward reached. With untied encoders a first backward over queries alone would leave the
    passage encoder's partitions holding the previous step's gradients, and the passage chunks would add to
    those. DDP must not pair: its reducer expects one forward per backward (with find_unused_parameters,
    each forward marks the parameters it did not use as ready, and a second forward would mark them again).
    """
    first = [0, n_query_chunks] if pair_first else [0]
    rest = [i for i in range(n_query_chunks + n_passage_chunks) if i not in first]
    return [first] + [[i] for i in rest]


class GradCacheMixin:
    """Gives a `transformers.Trainer` subclass the GradCache training step (`BiEncoderTrainer` mixes it in).

    The step needs the Trainer's own machinery (its accelerator, loss context, input preparation, and its
    loss with the loss log: `call_loss`), so it is a method of the trainer that owns that state, not a free
    function.
    """

    def grad_cache_training_step(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """One GradCache forward/backward of a training batch; returns the detached (GA-scaled) loss.

        Drop-in replacement for `Trainer.training_step` (see the module docstring); `model` is what the Trainer
        passes: the bare `BiEncoder`, its DDP wrapper or the DeepSpeed engine.
        """
        args = self.args
        accelerator = self.accelerator
        if isinstance(model, nn.DataParallel):
            raise TypeError(
                "--grad_cache does not support nn.DataParallel; launch one process per GPU (torchrun)"
            )
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        module = accelerator.unwrap_model(model)  # the BiEncoder
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        # accelerate puts autocast in the wrapped forward that `forward_as` bypasses; under DeepSpeed the engine
        # handles precision itself and accelerate's autocast is a no-op.
        autocast = contextlib.nullcontext if deepspeed else accelerator.autocast

        ga_steps = 1
        if not getattr(self, "loss_is_scaled_for_ga", False):
            ga_steps = getattr(self, "current_gradient_accumulation_steps", args.gradient_accumulation_steps)

        query_chunks = split_batch(inputs["query"], args.gc_q_chunk_size)
        passage_chunks = split_batch(inputs["passage"], args.gc_p_chunk_size)
        jobs = [(_encoder_call(module.encode_query), c) for c in query_chunks]
        jobs += [(_encoder_call(module.encode_passage), c) for c in passage_chunks]
        device = inputs["query"]["input_ids"].device

        def encode(job: tuple[Callable[..., torch.Tensor], Batch]) -> torch.Tensor:
            fn, chunk = job
            with forward_as(module, fn), self.compute_loss_context_manager(), autocast():
                return model(batch=chunk)  # (chunk rows, d)

        # 1. Representations without a graph, remembering each chunk's RNG state for the replay.
        rng_states: list[RngState] = []
        reps: list[torch.Tensor] = []
        with torch.no_grad():
            for job in jobs:
                rng_states.append(RngState(device))
                reps.append(encode(job))
        n_q = len(query_chunks)
        q_reps = torch.cat(reps[:n_q]).float().requires_grad_()  # (B, d) leaf
        p_reps = torch.cat(reps[n_q:]).float().requires_grad_()  # (B*n, d) leaf
        del reps

        # 2. The loss on the whole (gathered) batch and its gradient w.r.t. the representations, in float32.
        # Only the leaves get gradients; the all_gather's backward runs the same collective as the plain path.
        with torch.autocast(device_type=device.type, enabled=False):
            loss = self.call_loss(q_reps, p_reps, inputs)
            (loss / ga_steps).backward()
        cached = list(q_reps.grad.split(args.gc_q_chunk_size)) + list(p_reps.grad.split(args.gc_p_chunk_size))
        del q_reps, p_reps

        # 3. Chunk by chunk: recompute with a graph (same dropout masks) and back-propagate the cached gradient.
        engine = accelerator.deepspeed_engine_wrapped.engine if deepspeed else None
        zero3 = engine is not None and engine.zero_optimization_stage() == 3
        units = backward_units(n_q, len(passage_chunks), pair_first=zero3)
        for u, unit in enumerate(units):
            last = u == len(units) - 1
            # DDP: only the last backward all-reduces. accelerate's no_sync is a no-op outside DDP.
            sync = contextlib.nullcontext() if (last or deepspeed) else accelerator.no_sync(model)
            with sync:
                surrogate = torch.zeros((), device=device)
                for i in unit:
                    with rng_states[i].replay():
                        chunk_reps = encode(jobs[i])  # (chunk rows, d)
                    surrogate = (
                        surrogate + (chunk_reps.float() * cached[i]).sum()
                    )  # d/d(chunk_reps) = cached[i]
                if engine is not None and not last:
                    # Accumulate without ending the window: ZeRO 0/1 reduce nothing yet, ZeRO 2/3 add this
                    # backward's reduced partition to the accumulated one; no optimizer step.
                    engine.set_gradient_accumulation_boundary(False)
                    engine.backward(surrogate, scale_wrt_gas=False)
                elif deepspeed:
                    # The Trainer's own backward: boundary = accelerate's sync_gradients, then step if it is set.
                    accelerator.backward(surrogate, scale_wrt_gas=False)
                else:
                    accelerator.backward(surrogate)
            del chunk_reps, surrogate
        return (loss / ga_steps).detach()
