"""SwiGLU's gate, silu(g) * u, fused: one elementwise kernel each way instead of four to six.

It reads g and u from the fused gate/up projection's output gu [..., 2I] (gate first), so neither
needs a copy out of it, and its backward writes the gradient of gu as one tensor, the layout the
projection's backward takes. Computed in float32 and rounded once (eager rounds silu(g) before the
product); backward: dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g), du = dy * g * s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048


@triton.jit
def _places(n, width, BLOCK: tl.constexpr):
    """Offsets of a block of outputs y [rows, width] and of their gate and up inputs in gu [rows, 2 width]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = offs // width
    gate = offs + row * width
    return offs, gate, gate + width, offs < n


@triton.jit
def _forward(gu_ptr, y_ptr, n, width, BLOCK: tl.constexpr):
    offs, gate, up, mask = _places(n, width, BLOCK)
    g = tl.load(gu_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + up, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward(dy_ptr, gu_ptr, dgu_ptr, n, width, BLOCK: tl.constexpr):
    offs, gate, up, mask = _places(n, width, BLOCK)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gu_ptr + gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + up, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dgu_ptr + gate, (dy * u * s * (1.0 + g * (1.0 - s))).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + up, (dy * g * s).to(dgu_ptr.dtype.element_ty), mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu: Tensor) -> Tensor:
        gu = gu.contiguous()
        width = gu.shape[-1] // 2
        y = gu.new_empty(*gu.shape[:-1], width)
        n = y.numel()
        if n:
            _forward[(triton.cdiv(n, BLOCK),)](gu, y, n, width, BLOCK=BLOCK)
        ctx.save_for_backward(gu)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        (gu,) = ctx.saved_tensors
        dy = dy.contiguous()
        dgu = torch.empty_like(gu)
        n = dy.numel()
        if n:
            _backward[(triton.cdiv(n, BLOCK),)](dy, gu, dgu, n, gu.shape[-1] // 2, BLOCK=BLOCK)
        return dgu


def swiglu(gu: Tensor) -> Tensor:
    """silu(g) * u [..., I] for a CUDA tensor gu [..., 2I] holding g then u."""
    return _SwiGLU.apply(gu)
