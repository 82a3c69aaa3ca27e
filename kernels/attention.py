"""Causal attention over packed variable-length sequences (training passes), forward and backward.

Why our own: a training pass holds ~60 sequences of 110-180 tokens, where the flash-attention kernel
bundled with PyTorch reaches ~45 TFLOP/s (0.44 ms a 3B layer, forward + backward, for ~60 us of memory
traffic): its 128-row tiles are mostly masked at these lengths, and its backward spends a third of its
time outside the main kernel (dO.O per row, and the float32 dQ accumulator padded by 128 rows a
sequence, converted at the end). Here every program handles one (sequence, head, block of rows):
- forward: online softmax over the key blocks up to the diagonal; writes O and the row's log-sum-exp
  (base 2) as float32 [H, N];
- backward: delta = rowsum(dO * O) [H, N] first; then one program per key block and KV head sums dK and
  dV over the query heads that share it (GQA), and one per query block and head computes dQ: every
  gradient written once, no atomics, deterministic.
Layouts: q [N, H, D], k and v [N, Hkv, D] (made contiguous; the RoPE kernel writes them so),
`cu_seqlens` [S + 1] int32 covering all N rows, no sequence longer than `max_seqlen` (zero-length
sequences allowed, as the graphed passes pad them; rows outside every sequence would be left unwritten);
the result [N, H, D]. Arithmetic as flash attention's: products in bf16/fp16 with float32
accumulation, P and dS rounded to the input dtype before their products.

`cached_attention` is the sampler's and evaluator's side (no backward): queries at known positions attend
over their slot of a preallocated KV cache, keys at positions <= their own. It starts from the q/k/v
projection: a program per (row, KV head) first rotates the row's new keys and writes them and their
values into the cache (what a RoPE kernel before it did, one launch of ~2.2 us a layer and step at 256
slots of 0.5B), then, for each query, takes the GROUP query heads that share the KV head as one tile,
rotated in registers, and reads the slot's keys only up to the query's position, where SDPA (cuDNN at
decode) read the whole cache length through an additive mask and sized its tiles for many query rows:
14.8 us a 0.5B layer at 256 slots on the H200 for ~6 us of traffic. q and k are taken in halves (the
rotation pairs column i with i + D/2), so a head's score is two products of D/2 columns.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


@triton.jit
def _place(start, offs, n, stride_t, D: tl.constexpr, DP: tl.constexpr):
    """Offsets and mask of a block of rows [len(offs), DP] of one head of a sequence starting at `start`:
    rows >= n and columns >= D (a head dimension padded to DP, a power of two >= 16 for tl.dot) masked."""
    d = tl.arange(0, DP)
    mask = offs[:, None] < n
    if DP != D:
        mask = mask & (d[None, :] < D)
    return (start + offs).to(tl.int64)[:, None] * stride_t + d[None, :], mask


@triton.jit
def _rows(ptr, start, offs, n, stride_t, D: tl.constexpr, DP: tl.constexpr):
    at, mask = _place(start, offs, n, stride_t, D, DP)
    return tl.load(ptr + at, mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, start, offs, n, stride_t, D: tl.constexpr, DP: tl.constexpr):
    at, mask = _place(start, offs, n, stride_t, D, DP)
    tl.store(ptr + at, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sequence(cu_ptr):
    """(first row, length) of this program's sequence, the grid's third axis."""
    start = tl.load(cu_ptr + tl.program_id(2))
    return start, tl.load(cu_ptr + tl.program_id(2) + 1) - start


@triton.jit
def _query_block(cu_ptr, BM: tl.constexpr):
    """A query-block program's (first row in its sequence, head, sequence start, length, rows)."""
    m0 = tl.program_id(0) * BM
    start, n = _sequence(cu_ptr)
    return m0, tl.program_id(1), start, n, m0 + tl.arange(0, BM)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, h, total, start, rows, n):
    """The saved log-sum-exp and delta of head h's rows [H, N] (0 past the sequence)."""
    at = h.to(tl.int64) * total + start + rows
    return tl.load(lse_ptr + at, mask=rows < n, other=0.0), tl.load(delta_ptr + at, mask=rows < n, other=0.0)


@triton.jit
def _forward(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, scale, total, HEADS: tl.constexpr, GROUP: tl.constexpr,
             D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             PRECISION: tl.constexpr):
    m0, h, start, n, rows = _query_block(cu_ptr, BM)
    if m0 < n:
        kh = h // GROUP
        q = _rows(q_ptr + h * D, start, rows, n, HEADS * D, D, DP)
        peak = tl.full([BM], -float("inf"), tl.float32)
        mass = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        for n0 in range(0, tl.minimum(n, m0 + BM), BN):
            cols = n0 + tl.arange(0, BN)
            k = _rows(k_ptr + kh * D, start, cols, n, HEADS // GROUP * D, D, DP)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where((cols[None, :] <= rows[:, None]) & (cols[None, :] < n), s, -float("inf"))
            top = tl.maximum(peak, tl.max(s, 1))
            p = tl.exp2(s - top[:, None])
            shrink = tl.exp2(peak - top)
            mass = mass * shrink + tl.sum(p, 1)
            v = _rows(v_ptr + kh * D, start, cols, n, HEADS // GROUP * D, D, DP)
            acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            peak = top
        _store_rows(o_ptr + h * D, acc / mass[:, None], start, rows, n, HEADS * D, D, DP)
        tl.store(lse_ptr + h.to(tl.int64) * total + start + rows, peak + tl.log2(mass), mask=rows < n)


@triton.jit
def _delta(o_ptr, do_ptr, delta_ptr, total, HEADS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    h = tl.program_id(1)
    o = _rows(o_ptr + h * D, 0, rows, total, HEADS * D, D, DP).to(tl.float32)
    do = _rows(do_ptr + h * D, 0, rows, total, HEADS * D, D, DP).to(tl.float32)
    tl.store(delta_ptr + h.to(tl.int64) * total + rows, tl.sum(o * do, 1), mask=rows < total)


@triton.jit
def _backward_kv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_ptr, scale, total,
                 HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, PRECISION: tl.constexpr):
    n0 = tl.program_id(0) * BN
    kh = tl.program_id(1)
    start, n = _sequence(cu_ptr)
    if n0 < n:
        cols = n0 + tl.arange(0, BN)
        k = _rows(k_ptr + kh * D, start, cols, n, HEADS // GROUP * D, D, DP)
        v = _rows(v_ptr + kh * D, start, cols, n, HEADS // GROUP * D, D, DP)
        dk = tl.zeros([BN, DP], tl.float32)
        dv = tl.zeros([BN, DP], tl.float32)
        for g in range(GROUP):
            h = kh * GROUP + g
            for m0 in range(n0, n, BM):
                rows = m0 + tl.arange(0, BM)
                q = _rows(q_ptr + h * D, start, rows, n, HEADS * D, D, DP)
                do = _rows(do_ptr + h * D, start, rows, n, HEADS * D, D, DP)
                lse, delta = _row_stats(lse_ptr, delta_ptr, h, total, start, rows, n)
                st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale  # [BN, BM]: keys by queries
                seen = (cols[:, None] <= rows[None, :]) & (rows[None, :] < n)
                pt = tl.where(seen, tl.exp2(st - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        _store_rows(dk_ptr + kh * D, dk * (scale / 1.4426950408889634), start, cols, n, HEADS // GROUP * D, D, DP)
        _store_rows(dv_ptr + kh * D, dv, start, cols, n, HEADS // GROUP * D, D, DP)


@triton.jit
def _backward_q(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, scale, total, HEADS: tl.constexpr,
                GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                PRECISION: tl.constexpr):
    m0, h, start, n, rows = _query_block(cu_ptr, BM)
    if m0 < n:
        kh = h // GROUP
        q = _rows(q_ptr + h * D, start, rows, n, HEADS * D, D, DP)
        do = _rows(do_ptr + h * D, start, rows, n, HEADS * D, D, DP)
        lse, delta = _row_stats(lse_ptr, delta_ptr, h, total, start, rows, n)
        dq = tl.zeros([BM, DP], tl.float32)
        for n0 in range(0, tl.minimum(n, m0 + BM), BN):
            cols = n0 + tl.arange(0, BN)
            k = _rows(k_ptr + kh * D, start, cols, n, HEADS // GROUP * D, D, DP)
            v = _rows(v_ptr + kh * D, start, cols, n, HEADS // GROUP * D, D, DP)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            seen = (cols[None, :] <= rows[:, None]) & (cols[None, :] < n)
            p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        _store_rows(dq_ptr + h * D, dq * (scale / 1.4426950408889634), start, rows, n, HEADS * D, D, DP)


# (rows, keys, warps, stages) per kernel, measured on an H200 at the numbers task's lengths (speed notes)
FORWARD = (64, 32, 4, 3)
BACKWARD_KV = (32, 64, 4, 3)
BACKWARD_Q = (64, 32, 4, 2)
DELTA_ROWS = 64


def _shape(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> dict:
    """The kernels' compile-time shape; float32 products exact (IEEE), not TF32."""
    return dict(HEADS=heads, GROUP=heads // kv_heads, D=dim, DP=_padded(dim),
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        q, k, v = (x.contiguous() for x in (q, k, v))
        total, heads, dim = q.shape
        shape = _shape(heads, k.shape[1], dim, q.dtype)
        out = torch.empty_like(q)
        lse = torch.empty(heads, total, dtype=torch.float32, device=q.device)
        bm, bn, warps, stages = FORWARD
        _forward[(triton.cdiv(max_seqlen, bm), heads, cu_seqlens.numel() - 1)](
            q, k, v, out, lse, cu_seqlens, LOG2E / math.sqrt(dim), total, **shape, BM=bm, BN=bn, num_warps=warps,
            num_stages=stages)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse, cu = ctx.saved_tensors
        grad = grad.contiguous()
        total, heads, dim = q.shape
        kv_heads = k.shape[1]
        shape = _shape(heads, kv_heads, dim, q.dtype)
        delta = torch.empty_like(lse)
        _delta[(triton.cdiv(total, DELTA_ROWS), heads)](out, grad, delta, total, HEADS=heads, D=dim, DP=_padded(dim),
                                                        BM=DELTA_ROWS)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (cu, LOG2E / math.sqrt(dim), total)
        bm, bn, warps, stages = BACKWARD_KV
        _backward_kv[(triton.cdiv(ctx.max_seqlen, bn), kv_heads, cu.numel() - 1)](
            q, k, v, grad, lse, delta, dk, dv, *common, **shape, BM=bm, BN=bn, num_warps=warps, num_stages=stages)
        bm, bn, warps, stages = BACKWARD_Q
        _backward_q[(triton.cdiv(ctx.max_seqlen, bm), heads, cu.numel() - 1)](
            q, k, v, grad, lse, delta, dq, *common, **shape, BM=bm, BN=bn, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    """Causal attention within each packed sequence: q [N, H, D], k/v [N, Hkv, D] -> [N, H, D]."""
    return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen)


@triton.jit
def _rotated(x_ptr, at, c, s, mask, HALF: tl.constexpr):
    """The two halves of heads at offsets `at` of the projection rotated by angles (c, s), float32."""
    x1 = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + at + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _cached(x_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, o_ptr, slot_ptr, pos_ptr, scale, T, stride_kb, stride_kh,
            HEADS: tl.constexpr, GROUP: tl.constexpr, GP: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr,
            DP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    b, kh = tl.program_id(0), tl.program_id(1)  # row (cache slot), KV head
    D: tl.constexpr = 2 * HALF
    KV: tl.constexpr = HEADS // GROUP
    g, h, d = tl.arange(0, GP), tl.arange(0, HP), tl.arange(0, DP)
    dt = o_ptr.dtype.element_ty
    kv = tl.load(slot_ptr + b).to(tl.int64) * stride_kb + kh * stride_kh
    for t in range(T):  # the row's keys and values into the cache, k rotated
        i = b.to(tl.int64) * T + t
        c, s = tl.load(cos_ptr + i * D + h, mask=h < HALF), tl.load(sin_ptr + i * D + h, mask=h < HALF)
        at = i * (HEADS + 2 * KV) * D + (HEADS + kh) * D + h
        k1, k2 = _rotated(x_ptr, at, c.to(tl.float32), s.to(tl.float32), h < HALF, HALF)
        to = kv + tl.load(pos_ptr + i) * D + h
        tl.store(k_ptr + to, k1.to(dt), mask=h < HALF)
        tl.store(k_ptr + to + HALF, k2.to(dt), mask=h < HALF)
        tl.store(v_ptr + to, tl.load(x_ptr + at + KV * D, mask=h < HALF), mask=h < HALF)
        tl.store(v_ptr + to + HALF, tl.load(x_ptr + at + KV * D + HALF, mask=h < HALF), mask=h < HALF)
    tl.debug_barrier()  # a query reads the keys the row's earlier queries (and itself) just wrote
    for t in range(T):
        i = b.to(tl.int64) * T + t
        n = tl.load(pos_ptr + i) + 1  # keys seen: cache positions 0 .. the query's own
        c, s = tl.load(cos_ptr + i * D + h, mask=h < HALF), tl.load(sin_ptr + i * D + h, mask=h < HALF)
        live = (g[:, None] < GROUP) & (h[None, :] < HALF)
        at = i * (HEADS + 2 * KV) * D + (kh * GROUP + g)[:, None] * D + h[None, :]
        q1, q2 = _rotated(x_ptr, at, c.to(tl.float32)[None, :], s.to(tl.float32)[None, :], live, HALF)
        q1, q2 = q1.to(dt), q2.to(dt)  # rounded as the projection's dtype, as a rotated q tensor would be
        peak = tl.full([GP], -float("inf"), tl.float32)
        mass = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for n0 in range(0, n, BN):
            cols = n0 + tl.arange(0, BN)
            key = kv + cols[:, None] * D
            half = (cols[:, None] < n) & (h[None, :] < HALF)
            k1 = tl.load(k_ptr + key + h[None, :], mask=half, other=0.0)
            k2 = tl.load(k_ptr + key + HALF + h[None, :], mask=half, other=0.0)
            sc = (tl.dot(q1, tl.trans(k1), input_precision=PRECISION)
                  + tl.dot(q2, tl.trans(k2), input_precision=PRECISION)) * scale
            sc = tl.where(cols[None, :] < n, sc, -float("inf"))
            top = tl.maximum(peak, tl.max(sc, 1))
            p = tl.exp2(sc - top[:, None])
            shrink = tl.exp2(peak - top)
            mass = mass * shrink + tl.sum(p, 1)
            v = tl.load(v_ptr + key + d[None, :], mask=(cols[:, None] < n) & (d[None, :] < D), other=0.0)
            acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            peak = top
        o_at = i * HEADS * D + (kh * GROUP + g)[:, None] * D + d[None, :]
        tl.store(o_ptr + o_at, (acc / mass[:, None]).to(dt), mask=(g[:, None] < GROUP) & (d[None, :] < D))


def _cached_launch(programs: int, device: torch.device) -> dict:
    """Keys per block, warps and pipeline stages of `cached_attention` for `programs` (row, KV head) programs.
    Where they are many to an SM (256 slots of 0.5B: 512 on 132 SMs) one-warp programs over 32 keys at a time
    keep more loads in flight: 5.8 against 8.2 us a layer for 4 warps over 64 keys with the cache hot in L2,
    3 stages 12% faster than 2 (28 heads over 4, 2 stages: 23.2 against 29.8; H200, 2026-12-07); at 64 slots
    (128 programs) the two launches are within 2%."""
    if programs >= 2 * _multiprocessors(device):
        return dict(BN=32, num_warps=1, num_stages=3)
    return dict(BN=64, num_warps=4, num_stages=3)


def _multiprocessors(device: torch.device) -> int:
    """The GPU's SM count; 1 elsewhere (Triton's interpreter, where only the key block size matters)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def cached_attention(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int, k_cache: Tensor,
                     v_cache: Tensor, slots: Tensor, positions: Tensor) -> Tensor:
    """Attention of rows of queries over their cache slots, from the q/k/v projection qkv [B, T, (H + 2 Hkv) D]
    at `positions` [B, T] of cache slots `slots` [B] (distinct), with their rotary tables cos/sin [B, T, 1, D]:
    q and k rotated, each token's k and v written into k/v_cache [slots, Hkv, L, D] at its position, then each
    query attends over its slot's rows 0 .. its position -> [B, T, H * D]. No autograd."""
    b, t, _ = qkv.shape
    dim = cos.shape[-1]
    qkv, cos, sin = qkv.contiguous(), cos.reshape(b * t, dim).contiguous(), sin.reshape(b * t, dim).contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()  # one layer's views of the cache: no copy
    out = torch.empty(b, t, heads * dim, dtype=qkv.dtype, device=qkv.device)
    shape = _shape(heads, kv_heads, dim, qkv.dtype)
    _cached[(b, kv_heads)](
        qkv, cos, sin, k_cache, v_cache, out, slots.contiguous(), positions.contiguous(), LOG2E / math.sqrt(dim), t,
        k_cache.stride(0), k_cache.stride(1), HEADS=heads, GROUP=shape["GROUP"],
        GP=max(16, triton.next_power_of_2(shape["GROUP"])), HALF=dim // 2, HP=_padded(dim // 2), DP=shape["DP"],
        PRECISION=shape["PRECISION"], **_cached_launch(b * kv_heads, qkv.device))
    return out
