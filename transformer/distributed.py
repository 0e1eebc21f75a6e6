"""torchrun + DistributedDataParallel support for the training loop.

Under ``torchrun --nproc_per_node=N train.py ...`` every process joins one process group (NCCL on CUDA,
gloo on CPU). ``trainer.batch_size`` is the global batch: every rank draws the same global batch from the
same seeded generator and trains on its own slice, and the loss is normalised by the global number of
target tokens, so N processes take the same optimisation steps as one process with the same batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .tasks import Batch


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run: rank, world size and local rank (all 0/1/0 when single-process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group when launched by torchrun; returns the context and this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), device
    ctx = DistributedContext(
        rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def shutdown_distributed(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def local_slice(batch: Batch, ctx: DistributedContext) -> Batch:
    """This rank's contiguous slice of a global batch (the whole batch when single-process)."""
    if not ctx.enabled:
        return batch
    size = batch.src.shape[0]
    if size % ctx.world_size:
        raise ValueError(
            f"trainer.batch_size ({size}) is the global batch and must be divisible by the "
            f"{ctx.world_size} processes"
        )
    per_rank = size // ctx.world_size
    start = ctx.rank * per_rank
    return Batch(*(t[start : start + per_rank] for t in batch.tensors()))


def global_sum(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum of ``values`` over all ranks (``values`` itself when single-process)."""
    if not ctx.enabled:
        return values
    total = values.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total
