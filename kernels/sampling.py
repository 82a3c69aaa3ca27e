"""Per-block softmax statistics of a batch of logit rows, in one read of the logits.

The sampler draws a token by inverse CDF over exp(logits / T). Done naively that is a float64
softmax and cumulative sum over the whole vocabulary, several passes over [rows, 152k] in 8-byte
floats: on the H200 it took 54% of a 0.5B decode step at 1,024 slots (tests/profile_sampling.py,
2026-12-01). Split into blocks, the draw needs only each block's mass plus one block's weights:
this kernel reads each logit once and writes, per (row, block), the block's largest scaled logit
and the sum of exp(scaled - that maximum); src/sampler.py does the rest on [rows, blocks] and on
the one chosen block.

`uniforms` computes the draw's counter-based random numbers (src/sampler.py: `uniforms`, a 32-bit
hash of seed, prompt index and token index) in one kernel: as torch operations on int64 they are ~40
one-microsecond launches per decode step.
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


@triton.jit
def _mix(x):
    """src/sampler.py `_mix`: xorshift-multiply rounds on 32-bit values held in int64 (no overflow)."""
    x = x & 0xFFFFFFFF
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & 0xFFFFFFFF
    x = ((x ^ (x >> 13)) * 0x2C1B3C6D) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _uniforms(index_ptr, step_ptr, out_ptr, mixed_seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int64)
    step = tl.load(step_ptr + offs, mask=mask, other=0).to(tl.int64)
    x = _mix(_mix(mixed_seed ^ index) ^ _mix(step + 0x51ED27))
    tl.store(out_ptr + offs, x.to(tl.float64) / 4294967296.0, mask=mask)


def uniforms(mixed_seed: int, index: Tensor, step: Tensor) -> Tensor:
    """U[0, 1) float64 per element of `index`/`step` (CUDA int64 tensors of one shape, contiguous);
    `mixed_seed` is the seed through one `_mix` already (a host integer)."""
    out = torch.empty(index.shape, dtype=torch.float64, device=index.device)
    n = index.numel()
    if n:
        _uniforms[(triton.cdiv(n, 1024),)](index, step, out, mixed_seed, n, BLOCK=1024)
    return out
