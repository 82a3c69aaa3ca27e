"""Rotary embedding of q and k, fused with the split of the q/k/v projection: one kernel each way.

The fused projection's output x [..., (H + 2 Hkv) * D] holds the q, k and v heads side by side. The
forward kernel rotates every q and k head pairwise (i, i + D/2) by its token's angles (cos/sin [..., D],
the two halves equal, as `rope_tables` builds them) and writes q [..., H, D], k and v [..., Hkv, D] as
three tensors; eager code would split, rotate q and k (two products, a negation, a concat and a sum
each) and leave v a strided view. A v head is rotated by angle 0 (cos 1, sin 0), so all heads take
one formula. The backward kernel is the rotation by the opposite angle, reading the three gradients
and writing the gradient of x as one tensor, the layout the projection's backward takes.

Decoding does not come here: kernels/attention.py's `cached_attention` rotates q and k itself and writes
k and v into the KV cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _offsets(row, HEADS: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per head h of a token: offsets into x and into q, k, v, which of them holds h, and whether it rotates."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    is_q = h < HEADS
    is_k = (h >= HEADS) & (h < HEADS + KV)
    is_v = (h >= HEADS + KV) & (h < HEADS + 2 * KV)
    x_off = row * (HEADS + 2 * KV) * 2 * HALF + h * 2 * HALF + d
    q_off = row * HEADS * 2 * HALF + tl.where(is_q, h, 0) * 2 * HALF + d
    k_off = row * KV * 2 * HALF + tl.where(is_k, h - HEADS, 0) * 2 * HALF + d
    v_off = row * KV * 2 * HALF + tl.where(is_v, h - HEADS - KV, 0) * 2 * HALF + d
    return x_off, q_off, k_off, v_off, is_q, is_k, is_v, d


@triton.jit
def _angles(cos_ptr, sin_ptr, row, d, rotated, HALF: tl.constexpr, SIGN: tl.constexpr):
    c = tl.load(cos_ptr + row * 2 * HALF + d).to(tl.float32)
    s = tl.load(sin_ptr + row * 2 * HALF + d).to(tl.float32) * SIGN
    return tl.where(rotated, c, 1.0), tl.where(rotated, s, 0.0)


@triton.jit
def _forward(x_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, HEADS: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr,
             BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_off, q_off, k_off, v_off, is_q, is_k, is_v, d = _offsets(row, HEADS, KV, HALF, BLOCK_H)
    c, s = _angles(cos_ptr, sin_ptr, row, d, is_q | is_k, HALF, 1.0)
    live = is_q | is_k | is_v
    x1 = tl.load(x_ptr + x_off, mask=live, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=live, other=0.0).to(tl.float32)
    y1, y2 = (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), (x2 * c + x1 * s).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + q_off, y1, mask=is_q)
    tl.store(q_ptr + q_off + HALF, y2, mask=is_q)
    tl.store(k_ptr + k_off, y1, mask=is_k)
    tl.store(k_ptr + k_off + HALF, y2, mask=is_k)
    tl.store(v_ptr + v_off, y1, mask=is_v)
    tl.store(v_ptr + v_off + HALF, y2, mask=is_v)


@triton.jit
def _backward(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dx_ptr, HEADS: tl.constexpr, KV: tl.constexpr,
              HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_off, q_off, k_off, v_off, is_q, is_k, is_v, d = _offsets(row, HEADS, KV, HALF, BLOCK_H)
    c, s = _angles(cos_ptr, sin_ptr, row, d, is_q | is_k, HALF, -1.0)
    y1 = (tl.load(dq_ptr + q_off, mask=is_q, other=0.0).to(tl.float32)
          + tl.load(dk_ptr + k_off, mask=is_k, other=0.0).to(tl.float32)
          + tl.load(dv_ptr + v_off, mask=is_v, other=0.0).to(tl.float32))
    y2 = (tl.load(dq_ptr + q_off + HALF, mask=is_q, other=0.0).to(tl.float32)
          + tl.load(dk_ptr + k_off + HALF, mask=is_k, other=0.0).to(tl.float32)
          + tl.load(dv_ptr + v_off + HALF, mask=is_v, other=0.0).to(tl.float32))
    live = is_q | is_k | is_v
    tl.store(dx_ptr + x_off, (y1 * c - y2 * s).to(dx_ptr.dtype.element_ty), mask=live)
    tl.store(dx_ptr + x_off + HALF, (y2 * c + y1 * s).to(dx_ptr.dtype.element_ty), mask=live)


def _tables(cos: Tensor, sin: Tensor, lead: torch.Size, rows: int) -> tuple[Tensor, Tensor]:
    dim = cos.shape[-1]
    return tuple(t.expand(*lead, 1, dim).reshape(rows, dim).contiguous() for t in (cos, sin))


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
        x = x.contiguous()
        lead, dim = x.shape[:-1], cos.shape[-1]
        rows = x.numel() // x.shape[-1]
        cos, sin = _tables(cos, sin, lead, rows)
        q = x.new_empty(*lead, heads, dim)
        k, v = x.new_empty(*lead, kv_heads, dim), x.new_empty(*lead, kv_heads, dim)
        if rows:
            _forward[(rows,)](x, cos, sin, q, k, v, HEADS=heads, KV=kv_heads, HALF=dim // 2,
                              BLOCK_H=triton.next_power_of_2(heads + 2 * kv_heads))
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.kv_heads = heads, kv_heads
        return q, k, v

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
        cos, sin = ctx.saved_tensors
        heads, kv_heads, dim = ctx.heads, ctx.kv_heads, cos.shape[-1]
        dq, dk, dv = (g.contiguous() for g in (dq, dk, dv))
        dx = dq.new_empty(*dq.shape[:-2], (heads + 2 * kv_heads) * dim)
        rows = cos.shape[0]
        if rows:
            _backward[(rows,)](dq, dk, dv, cos, sin, dx, HEADS=heads, KV=kv_heads, HALF=dim // 2,
                               BLOCK_H=triton.next_power_of_2(heads + 2 * kv_heads))
        return dx, None, None, None, None


def rope_qkv(x: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q [..., H, D] rotated, k [..., Hkv, D] rotated, v [..., Hkv, D]) from the fused q/k/v projection
    x [..., (H + 2 Hkv) D] for CUDA tensors, cos/sin [..., 1, D] (D even, D/2 a power of 2)."""
    return _RopeQKV.apply(x, cos, sin, heads, kv_heads)

