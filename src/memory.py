"""What a process can still take on its GPU: the trainer sizes its micro-batches by it, the sampler its slots."""
from __future__ import annotations

import torch


def _indexed(device: torch.device) -> torch.device:
    """The device with its index: the memory-fraction calls take no bare "cuda"."""
    return torch.device("cuda", torch.cuda.current_device()) if device.index is None else device


def cap_memory(gib: float, device: torch.device) -> None:
    """Let this process take at most `gib` GiB of the GPU (e.g. the real runs' 80 GB on a larger card)."""
    device = _indexed(device)
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.mem_get_info(device)[1], device)


def free_memory(device: torch.device) -> int:
    """Bytes this process can still take on a CUDA device: the driver's free memory plus the blocks
    its caching allocator holds unused (a study worker keeps those of its earlier jobs), within the
    process's memory fraction where one is set (`torch.cuda.set_per_process_memory_fraction`)."""
    device = _indexed(device)
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return int(min(free + torch.cuda.memory_reserved(device) - allocated, fraction * total - allocated))
