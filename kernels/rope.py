"""Rotary embedding of q or k in one kernel each way (eager: two products, a negation, a concat, a sum).

x [..., H, D] is rotated pairwise (i, i + D/2) by the angles whose cos/sin [..., D] (the two halves
equal, as `rope_tables` builds them) are given per token. The backward pass is the rotation by the
opposite angle, so both directions are one kernel with the sign of sin as a parameter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, SIGN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < heads
    base = row * heads * 2 * HALF + h * 2 * HALF + d
    c = tl.load(cos_ptr + row * 2 * HALF + d).to(tl.float32)
    s = tl.load(sin_ptr + row * 2 * HALF + d).to(tl.float32) * SIGN
    x1 = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + base, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + base + HALF, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def _launch(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    heads, dim = x.shape[-2], x.shape[-1]
    rows = x.numel() // (heads * dim)
    x = x.contiguous()
    y = torch.empty_like(x)
    cos, sin = cos.expand(*x.shape[:-2], 1, dim), sin.expand(*x.shape[:-2], 1, dim)
    cos, sin = cos.reshape(rows, dim).contiguous(), sin.reshape(rows, dim).contiguous()
    if rows:
        _rotate[(rows,)](x, cos, sin, y, heads, HALF=dim // 2, BLOCK_H=triton.next_power_of_2(heads), SIGN=sign)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy: Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, -1.0), None, None


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin for CUDA x [..., H, D] and cos/sin [..., 1, D] (D even, a power of 2)."""
    return _Rope.apply(x, cos, sin)
