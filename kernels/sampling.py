"""Per-block softmax statistics of a batch of logit rows, in one read of the logits.

The sampler draws a token by inverse CDF over exp(logits / T). Done naively that is a float64
softmax and cumulative sum over the whole vocabulary, several passes over [rows, 152k] in 8-byte
floats: on the H200 it took 54% of a 0.5B decode step at 1,024 slots (tests/profile_sampling.py,
2026-12-01). Split into blocks, the draw needs only each block's mass plus one block's weights:
this kernel reads each logit once and writes, per (row, block), the block's largest scaled logit
and the sum of exp(scaled - that maximum); src/sampler.py does the rest on [rows, blocks] and on
the one chosen block.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _block_stats(logits_ptr, max_ptr, sum_ptr, vocab, row_stride, blocks, temperature, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    x = tl.load(logits_ptr + row * row_stride + offs, mask=mask, other=-float("inf")).to(tl.float32) / temperature
    top = tl.max(x, 0)
    mass = tl.sum(tl.where(mask, tl.exp(x - top), 0.0), 0)
    tl.store(max_ptr + row * blocks + block, top)
    tl.store(sum_ptr + row * blocks + block, mass)


def block_stats(logits: Tensor, temperature: float, block: int) -> tuple[Tensor, Tensor]:
    """For logits [rows, V] (CUDA, any float dtype): per block of `block` columns (a power of two),
    max of logits / T and sum of exp(logits / T - that max), both float32 [rows, ceil(V / block)]."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    blocks = triton.cdiv(vocab, block)
    top = torch.empty(rows, blocks, dtype=torch.float32, device=logits.device)
    mass = torch.empty_like(top)
    if rows:
        _block_stats[(rows, blocks)](logits, top, mass, vocab, logits.stride(0), blocks, float(temperature),
                                     BLOCK=block)
    return top, mass
