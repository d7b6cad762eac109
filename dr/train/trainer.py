"""The training loop: a thin `transformers.Trainer` subclass.

Why the Trainer: it already does DDP, DeepSpeed ZeRO 0-3, fp16/bf16, gradient accumulation and
checkpointing, and its resume restores optimizer, scheduler, RNG state and the position in the data.
What we add is small and is the part that must be exactly right:
- the trainer owns the loss (`dr.train.losses`, chosen by `--loss`): `compute_loss` gets the
  representations from the bi-encoder's forward and calls the loss, which gathers passages across ranks
  with autograd; the GradCache step (`dr.train.gradcache`) calls the same loss on cached representations;
- `EpochSampler` makes the data order, and through `(epoch, index)` items the choice of positives and
  negatives, a function of (seed, epoch) only, so all ranks and resumed runs agree;
- `_save` / `_load_from_checkpoint` store the model as Hugging Face folder(s) + dr_config.json.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer

from dr.distributed import all_reduce_sum, get_world_size, is_initialized
from dr.io.atomic import write_json_atomic
from dr.model.encoder import BiEncoder
from dr.train.checkpoints import mark_complete
from dr.train.gradcache import GradCacheMixin
from dr.train.losses import LossOutput, LossSettings, TrainLoss, build_loss

logger = logging.getLogger(__name__)

RESOLVED_CONFIG_NAME = "dr_train_args.json"


class EpochSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` in an order shuffled by (seed, epoch).

    The Trainer (through accelerate) calls `set_epoch` before every epoch, including the resumed one; each
    rank builds the same permutation and accelerate hands rank r every W-th batch of it.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = range(self.length)
        return ((self.epoch, i) for i in order)


class LossLog:
    """What the loss reported since the last log line: sums of its counts, sums and step counts of its terms.

    Kept as tensors: converting on every step would force a device sync; `flush` converts once per line.
    """

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.terms: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, out: LossOutput) -> None:
        for name, value in out.counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        for name, value in out.terms.items():
            self.terms[name] = self.terms.get(name, 0) + value.float()
        self.steps += 1

    def flush(self, device: torch.device) -> dict[str, float]:
        """Counts summed over ranks, terms averaged over steps and ranks; then start over.

        Collective: every rank must call it (the Trainer calls `log` on all ranks), with the same names
        (every rank runs the same loss).
        """
        logs: dict[str, float] = {}
        for name in sorted(self.counts):
            logs[name] = int(all_reduce_sum(torch.as_tensor(self.counts[name], device=device)))
        world = get_world_size() if is_initialized() else 1
        for name in sorted(self.terms):
            total = all_reduce_sum(torch.as_tensor(self.terms[name], device=device) / max(self.steps, 1))
            logs[f"loss_{name}"] = round(float(total) / world, 6)
        self.counts, self.terms, self.steps = {}, {}, 0
        return logs


class BiEncoderTrainer(GradCacheMixin, Trainer):
    """Trainer for `BiEncoder`; see the module docstring for what differs from the base class.

    `loss_fn`: the training loss (`dr.train.losses`); by default `--loss` built from the arguments and the
    model's temperature.
    """

    def __init__(
        self,
        *args: Any,
        loss_fn: TrainLoss | None = None,
        resolved_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.resolved_config = resolved_config or {}
        if loss_fn is None:
            config = self.accelerator.unwrap_model(self.model).encoder_config
            loss_fn = build_loss(
                self.args.loss, LossSettings.from_args(self.args, config.temperature, config.normalize)
            )
        self.loss_fn = loss_fn
        # Our loss is a per-batch mean: let the Trainer divide by the accumulation steps, and never rescale
        # it by the number of processes (the gathered loss needs no world-size factor: losses/contrastive.py).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.loss_log = LossLog()

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return EpochSampler(len(dataset), seed=self.args.seed)

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        if self.args.grad_cache:
            return self.grad_cache_training_step(model, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The base class's device move, except that teacher scores keep float32: under DeepSpeed it
        casts every floating input to the engine's fp16/bf16, which would round the teacher's scores."""
        teacher = inputs.get("teacher_scores")
        prepared = super()._prepare_inputs({k: v for k, v in inputs.items() if k != "teacher_scores"})
        if teacher is not None:
            prepared["teacher_scores"] = teacher.to(self.args.device, dtype=torch.float32)
        return prepared

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The bi-encoder's representations (through the DDP / DeepSpeed wrapper), then the loss."""
        reps = model(query=inputs["query"], passage=inputs["passage"])
        loss = self.call_loss(reps["q_reps"], reps["p_reps"], inputs)
        return (loss, reps) if return_outputs else loss

    def call_loss(self, q_reps: torch.Tensor, p_reps: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
        """`loss_fn` on a batch's representations (plain step and GradCache alike); logs its parts."""
        keys = {}
        if self.args.mask_false_negatives:
            keys = {"passage_keys": inputs["passage_keys"], "positive_keys": inputs["positive_keys"]}
        out = self.loss_fn(
            q_reps,
            p_reps,
            group_size=inputs["passage"]["input_ids"].shape[0] // inputs["query"]["input_ids"].shape[0],
            teacher_scores=inputs.get("teacher_scores"),  # present when the loss needs them (the collator)
            **keys,
        )
        self.loss_log.add(out)
        return out.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add to each training log line what the loss reported since the last line (in-batch false
        negatives masked on all ranks; the terms of a mixed loss) and, on a GPU, this rank's peak allocated
        memory so far (what GradCache chunk sizes trade)."""
        if "loss" in logs:
            # Every rank logs (the Trainer calls log() on all of them after its own collective), so the
            # sums over ranks are safe here: global figures, as one process on the global batch counts.
            logs.update(self.loss_log.flush(self.args.device))
        if "loss" in logs and torch.cuda.is_available() and torch.cuda.is_initialized():
            logs["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model: BiEncoder = self.accelerator.unwrap_model(self.model)
        model.save(output_dir, state_dict=state_dict, tokenizer=self.processing_class)
        write_json_atomic(os.path.join(output_dir, RESOLVED_CONFIG_NAME), self.resolved_config)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, then (every rank done, main process) the completion marker, so that
        `--resume_from_checkpoint latest` never picks a checkpoint cut short by a kill (dr/train/checkpoints.py)."""
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # DeepSpeed: every rank's shards are on disk
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            mark_complete(folder, self.state.global_step)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        # DeepSpeed restores its own engine state; DDP / single-process runs read our saved folders.
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        logger.info("loading model weights from %s", resume_from_checkpoint)
        model.load_weights(resume_from_checkpoint)
