"""RMSNorm over the last dimension in one pass each way (the model's norms are frozen: no weight grad).

Forward per row: float32 x * rsqrt(mean(x^2) + eps), rounded to the input dtype, times the weight,
as the eager reference rounds; backward: dx = rstd * (w*dy - x_hat * mean(w*dy * x_hat)) with
x_hat = x * rstd, all in float32. Eager PyTorch runs ~8 kernels with float32 temporaries of the
whole activation each way; this is one kernel per direction.

`add_rms_norm` also does the residual add before a norm: s = x + delta rounded to the input dtype (as
eager rounds it), then the norm of s; backward adds the residual's own gradient into the norm's, so
the add, its read-back and autograd's gradient sum are gone (one kernel each way instead of three).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _forward(x_ptr, delta_ptr, sum_ptr, w_ptr, y_ptr, rstd_ptr, width, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0)
    if ADD:  # the residual sum, rounded to the input dtype as eager code leaves it, is what gets normalised
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * width + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    normed = (x * rstd).to(w.dtype)
    tl.store(y_ptr + row * width + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _backward(dy_ptr, dy_row, ds_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, width, BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * dy_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    x_hat = x * rstd
    g = dy * w
    dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / width))
    if ADD:  # the sum's gradient: through the norm plus along the residual stream
        dx += tl.load(ds_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row * width + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_forward(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(normalised y, the sum s = x + delta or x itself, rstd) of rows of x [rows, width]."""
    rows, width = x.shape
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    s = x if delta is None else torch.empty_like(x)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(width)
    if rows:
        _forward[(rows,)](x, x if delta is None else delta, s, weight, y, rstd, width, eps, BLOCK=block,
                          ADD=delta is not None, num_warps=_warps(block))
    return y, s, rstd


def _launch_backward(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """dx of rows s [rows, width]; dy's rows may lie further apart than `width` (`_row_view`)."""
    dx = torch.empty_like(s)
    block = triton.next_power_of_2(s.shape[1])
    if s.shape[0]:
        _backward[(s.shape[0],)](dy, dy.stride(0), dy if ds is None else ds, s, weight, rstd, dx, s.shape[1], BLOCK=block,
                                 ADD=ds is not None, num_warps=_warps(block))
    return dx


def _warps(block: int) -> int:
    return min(16, max(1, block // 256))


def _rows(t: Tensor, width: int) -> Tensor:
    return t.reshape(-1, width).contiguous()


def _row_view(t: Tensor, width: int) -> Tensor:
    """t as rows [rows, width] without a copy where its rows are contiguous but spaced further apart (an
    upstream gradient that is a view of a wider one, as LoRA's wide GEMM returns, src/lora.py)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(1) == 1 else rows.contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, s, rstd = _launch_forward(_rows(x, x.shape[-1]), None, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        s, weight, rstd = ctx.saved_tensors
        return _launch_backward(_row_view(dy, s.shape[1]), None, s, weight, rstd).view(ctx.shape), None, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        width = x.shape[-1]
        y, s, rstd = _launch_forward(_rows(x, width), _rows(delta, width), weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape = x.shape
        return s.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, ds: Tensor | None, dy: Tensor | None):
        s, weight, rstd = ctx.saved_tensors
        width = s.shape[1]
        if dy is None:
            dx = _rows(ds, width)
        else:
            dx = _launch_backward(_row_view(dy, width), None if ds is None else _rows(ds, width), s, weight, rstd)
        dx = dx.view(ctx.shape)
        return dx, dx, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)) on a CUDA tensor; no gradient for `weight`."""
    return _RMSNorm.apply(x, weight, eps)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s = x + delta, rms_norm(s)) on CUDA tensors in one kernel each way; no gradient for `weight`."""
    return _AddRMSNorm.apply(x, delta, weight, eps)
