"""Per-block softmax statistics of a batch of logit rows, in one read of the logits.

The sampler draws a token by inverse CDF over exp(logits / T). Done naively that is a float64
softmax and cumulative sum over the whole vocabulary, several passes over [rows, 152k] in 8-byte
floats: on the H200 it took 54% of a 0.5B decode step at 1,024 slots (tests/profile_sampling.py,
2026-12-01). Split into blocks, the draw needs only each block's mass plus one block's weights:
this kernel reads each logit once and writes, per (row, block), the block's largest scaled logit
and the sum of exp(scaled - that maximum). `pick` then does the rest for each row in one program: the
blocks' masses in float64 and their cumulative sum locate the block where the mass passes the row's
uniform, and that block's own float64 weights locate the token (src/sampler.py: `pick`, whose torch
formula it follows step by step); as torch operations those were ~30 small kernels a decode step.

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
def _pick(logits_ptr, top_ptr, mass_ptr, u_ptr, out_ptr, vocab, row_stride, blocks, temperature,
          BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCKS)
    top = tl.load(top_ptr + row * blocks + b, mask=b < blocks, other=-float("inf"))
    mass = tl.load(mass_ptr + row * blocks + b, mask=b < blocks, other=0.0)
    masses = mass.to(tl.float64) * tl.exp((top - tl.max(top, 0)).to(tl.float64))  # relative to the row's maximum
    cum = tl.cumsum(masses, 0)
    total = tl.sum(tl.where(b == blocks - 1, cum, 0.0), 0)
    u = tl.load(u_ptr + row) * total
    chosen = tl.minimum(tl.sum((cum <= u).to(tl.int32), 0), blocks - 1)  # searchsorted(right=True)
    before = tl.sum(tl.where(b == chosen - 1, cum, 0.0), 0)
    share = tl.sum(tl.where(b == chosen, masses, 0.0), 0)
    peak = tl.sum(tl.where(b == chosen, top, 0.0), 0)
    col = chosen * BLOCK + tl.arange(0, BLOCK)
    x = tl.div_rn(tl.load(logits_ptr + row * row_stride + col, mask=col < vocab, other=0.0).to(tl.float32), temperature)
    weights = tl.cumsum(tl.where(col < vocab, tl.exp((x - peak).to(tl.float64)), 0.0), 0)
    rest = (u - before) / share * tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, weights, 0.0), 0)
    within = tl.minimum(tl.sum((weights <= rest).to(tl.int32), 0), BLOCK - 1)
    tl.store(out_ptr + row, tl.minimum(chosen * BLOCK + within, vocab - 1).to(tl.int64))


def pick(logits: Tensor, top: Tensor, mass: Tensor, u: Tensor, temperature: float, block: int) -> Tensor:
    """The token of each row of `logits` [rows, V] (CUDA) where its cumulative softmax(logits / T) passes
    u * its total, from `block_stats`' top and mass [rows, blocks] and float64 uniforms u [rows]."""
    logits = logits.contiguous()
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows:
        blocks = top.shape[1]
        _pick[(rows,)](logits, top.contiguous(), mass.contiguous(), u.contiguous(), out, vocab, logits.stride(0),
                       blocks, float(temperature), BLOCK=block, BLOCKS=triton.next_power_of_2(blocks), num_warps=8)
    return out


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
