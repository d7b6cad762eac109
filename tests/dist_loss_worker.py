"""Run under torchrun: one DDP forward/backward of the bi-encoder + contrastive loss on this rank's slice of a
global batch.

Rank 0 writes the all-reduced loss and the (DDP-averaged) parameter gradients to a safetensors file so
the test can compare them with one process on the whole batch.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from dr.distributed import exit_status, process_group
from dr.model.encoder import BiEncoder
from dr.model.text import load_tokenizer
from dr.train.losses.contrastive import ContrastiveLoss
from tests.train.test_loss import make_global_batch, make_global_keys


def main(model_dir: str, out_path: str, gather: str, matryoshka_dims: str = "") -> None:
    with process_group():
        _step(model_dir, out_path, gather, matryoshka_dims)


def _step(model_dir: str, out_path: str, gather: str, matryoshka_dims: str = "") -> None:
    """`matryoshka_dims` ('16,8,4'): the contrastive loss summed over renormalised prefixes of a
    normalising model (tests/train/test_matryoshka.py), else the plain loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = load_tokenizer(model_dir)
    settings = {"pooling": "mean", "temperature": 0.5, **({"normalize": True} if matryoshka_dims else {})}
    model = BiEncoder.from_pretrained(model_dir, settings)
    loss_fn = ContrastiveLoss(temperature=0.5, gather_across_devices=gather == "gather")
    if matryoshka_dims:
        from dr.train.losses.matryoshka import MatryoshkaLoss, parse_dims

        dims = parse_dims(matryoshka_dims)
        loss_fn = MatryoshkaLoss(loss_fn, dims, [1.0 / (i + 1) for i in range(len(dims))], normalize=True)
    queries, passages, group = make_global_batch()
    per_rank = len(queries) // world
    local_q = queries[rank * per_rank : (rank + 1) * per_rank]
    local_p = passages[rank * per_rank * group : (rank + 1) * per_rank * group]
    ddp = DistributedDataParallel(model, find_unused_parameters=True)  # BERT's pooler gets no gradient
    q = dict(tokenizer(local_q, padding="max_length", max_length=16, return_tensors="pt"))
    p = dict(tokenizer(local_p, padding="max_length", max_length=16, return_tensors="pt"))
    passage_keys, positive_keys = make_global_keys()
    reps = ddp(query=q, passage=p)  # the trainer's order: representations through DDP, then the loss
    loss = loss_fn(
        reps["q_reps"],
        reps["p_reps"],
        group_size=group,
        passage_keys=passage_keys[rank * per_rank * group : (rank + 1) * per_rank * group],
        positive_keys=positive_keys[rank * per_rank : (rank + 1) * per_rank],
    ).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    if rank == 0:
        tensors = {"loss": mean_loss.reshape(1)}
        tensors.update(
            {
                f"grad.{n}": prm.grad.contiguous()
                for n, prm in model.named_parameters()
                if prm.grad is not None
            }
        )
        save_file(tensors, out_path)
    del ddp, model


if __name__ == "__main__":
    main(*sys.argv[1:5])
    # Leave as the dr commands do (`dr.distributed.exit_status`): once the group is gone, interpreter
    # finalization can still free DDP's reducer late and gloo's threads with it, which aborts the process
    # ("terminate called without an active exception", SIGABRT) after its work was done (seen once in CI).
    raise SystemExit(exit_status(0))
