"""Data parallelism over processes started by torchrun: one process per GPU (gloo on CPU), no framework.

The training loop needs only this: join the process group when torchrun launched us, know this
process's rank and the number of ranks, take this rank's share of a batch, sum tensors over ranks,
and wait for the others. Outside torchrun (WORLD_SIZE unset or 1) nothing is started and every
function answers as the only rank of a world of one.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and PyTorch's symmetric-memory multicast disabled,
set before the group exists): on the shared multi-GPU hosts a program using it can put the host's
GPUs out of service for a long time.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
T = TypeVar("T")


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join torchrun's process group for the block (outside torchrun: nothing); yields this rank's
    device: on CUDA each rank takes cuda:LOCAL_RANK and talks NCCL, on CPU gloo."""
    if not launched() or dist.is_initialized():
        yield device
        return
    os.environ.update(NO_MULTICAST)
    if torch.device(device).type == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """The rank that writes files (logs, checkpoints, results)."""
    return rank() == 0


def share(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous part of `items`, the parts as equal in count as can be (some may be empty)."""
    n, r, w = len(items), rank(), world()
    return items[n * r // w: n * (r + 1) // w]


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its sum over ranks, all in one collective (summed in float32 or wider)."""
    if world() == 1 or not tensors:
        return
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def barrier() -> None:
    if world() > 1:
        dist.barrier()
