"""What a process can still take on its GPU: the trainer sizes its micro-batches by it, the sampler its slots."""
from __future__ import annotations

import torch


def free_memory(device: torch.device) -> int:
    """Bytes this process can still take on a CUDA device: the driver's free memory plus the blocks
    its caching allocator holds unused (a study worker keeps those of its earlier jobs), within the
    process's memory fraction where one is set (`torch.cuda.set_per_process_memory_fraction`)."""
    if device.index is None:  # the memory-fraction query needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    fraction = torch.cuda.get_per_process_memory_fraction(device)
    return int(min(free + torch.cuda.memory_reserved(device) - allocated, fraction * total - allocated))
