"""Attention for the three layouts the library uses, through one entry point, `attend` (and, for
cached layouts where our kernel applies, `attend_cached`, which starts from the q/k/v projection).

Layouts say how the tokens of a call are arranged, so the model code never branches on them:
- `Padded`: a right-padded batch [B, T] with a key mask (training, evaluation);
- `Packed`: variable-length sequences concatenated into one row [1, N] with `cu_seqlens`
  (training without padding waste; on CUDA in bf16/fp16 our Triton varlen kernel, kernels/attention.py,
  ~2x the flash-attention 2 kernel at these lengths; SUBLIMINAL_VARLEN=flash takes flash-attn's kernel
  where installed, else the one bundled with PyTorch);
- `Shared`: packed sequences whose common opening (the chat template's, ~24 of a student's ~130 tokens)
  is stored once: every row but attention's runs on the stored rows; attention sees each sequence whole,
  the opening's keys and values copied into it (`expand`), and its outputs are taken back (`keep`;
  `_Rows` gives those gathers the backward each allows);
- `Cached`: queries attend over a preallocated KV cache after writing their own keys/values
  (prefill of new prompts into cache slots, decoding one token per slot, the evaluator's few tokens a
  slot; past the prefill, on CUDA without autograd, one Triton kernel rotates q and k, writes k and v
  into the cache and reads each slot only up to the query's position: `attend_cached`).
q, k, v arrive as [B, T, H, D]; the result is [B, T, H * D].
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fused import fused_kernels

try:  # optional fast path
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


# cuDNN's SDPA builds a new execution plan for every new shape (milliseconds of CPU each): it is
# left out where shapes change with every call (training micro-batches, prefills) and kept for
# cached attention without our kernels (SUBLIMINAL_KERNELS=0, no Triton), where its one plan for the
# fixed-shape decode step is the fastest masked SDPA kernel.
_VARYING = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_FIXED = [SDPBackend.CUDNN_ATTENTION, *_VARYING]


@dataclass
class Padded:
    """Right- or left-padded batch; `key_mask` [B, T] is True on real tokens (None: no padding)."""

    key_mask: Tensor | None = None

    @cached_property
    def mask(self) -> Tensor:
        """[B, 1, T, T] causal and key mask, built once for all layers. A padding query with no
        visible key would produce NaN; it sees itself (its output is unused)."""
        t = self.key_mask.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=self.key_mask.device).tril()
        mask = causal[None] & self.key_mask[:, None, :].bool()
        return (mask | torch.eye(t, dtype=torch.bool, device=self.key_mask.device)[None])[:, None]


@dataclass
class Packed:
    """Sequences packed into one row: boundaries `cu_seqlens` [S + 1] (int32), longest `max_seqlen`."""

    cu_seqlens: Tensor
    max_seqlen: int
    _maps: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)

    def maps(self, tokens: int) -> tuple[Tensor, Tensor]:
        """(sequence index, position within it) of each of the row's `tokens` tokens, built once per
        forward and without a device-to-host sync (`tokens` comes from the input's shape): a sync here
        would stall the GPU pipeline at every pass, or at every layer."""
        if self._maps is None:
            cu = self.cu_seqlens.long()
            at = torch.arange(tokens, device=cu.device)
            seq = torch.searchsorted(cu[1:], at, right=True)
            self._maps = seq, at - cu[seq]
        return self._maps


@dataclass
class Shared:
    """Packed sequences that open with the same tokens, stored once: the row [1, N] holds the opening
    (one copy, its first sequence's) and every sequence's own rest. `full` packs every sequence whole
    ([1, M], M >= N: the opening copied into each), which is what attention sees: `expand` [M] is the
    stored row each of its rows reads, `keep` [N] the row of `full` each stored row takes its attention
    output from. Each copy of the opening sees what the stored one sees (the same tokens at the same
    positions), so this is exact; the copies' key and value gradients are summed into the stored rows
    by the gather's backward."""

    full: Packed
    expand: Tensor
    keep: Tensor

    def positions(self) -> Tensor:
        """Each stored row's position within its sequence [1, N]."""
        return self.full.maps(self.expand.shape[0])[1][self.keep][None]


class KVCache:
    """Preallocated keys and values for `slots` sequences of up to `max_len` tokens each.

    Every layer's cache is one tensor [slots, kv_heads, max_len, head_dim]; nothing is
    reallocated while sampling, so decode steps keep static shapes (CUDA-graph friendly).
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


@dataclass
class Cached:
    """Write k/v at (`slots[b]`, `positions[b, t]`) then attend over the first `kv_len` cache rows.

    A query at position p sees cached keys at positions <= p of its own slot; anything beyond
    (stale entries of an earlier occupant, padding) is masked. `fresh` says every row starts at
    position 0 here (a prefill), so the queries need only this call's own keys: plain causal
    attention, no cache read and no mask.
    """

    cache: KVCache
    slots: Tensor | None  # [B] long; None: slots 0 .. B - 1, in order (decoding the whole batch of slots)
    positions: Tensor  # [B, T] long
    kv_len: int
    fresh: bool = False

    @cached_property
    def rows(self) -> Tensor:
        """[B, T]: the cache slot each query's key and value go to (built once for all layers)."""
        slots = self.slots if self.slots is not None else torch.arange(self.positions.shape[0], device=self.positions.device)
        return slots[:, None].expand_as(self.positions)

    @cached_property
    def mask(self) -> Tensor:
        """[B, 1, T, kv_len]: a query at position p sees cache rows <= p; additive (0 or -inf, in the cache's
        dtype), built once for all layers: SDPA would turn a boolean mask into this in every layer."""
        key_pos = torch.arange(self.kv_len, device=self.positions.device)
        seen = (key_pos[None, None, :] <= self.positions[:, :, None])[:, None]
        return torch.zeros(seen.shape, dtype=self.cache.k.dtype, device=seen.device).masked_fill_(~seen, -math.inf)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, fixed_shape: bool = False) -> Tensor:
    """q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H*D] via torch SDPA with grouped KV heads."""
    b, t, h, d = q.shape
    with sdpa_kernel(_FIXED if fixed_shape else _VARYING, set_priority=True):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=causal and mask is None, enable_gqa=k.shape[2] != h,
        )
    return out.transpose(1, 2).reshape(b, t, h * d)


def _attend_padded(q: Tensor, k: Tensor, v: Tensor, layout: Padded) -> Tensor:
    if layout.key_mask is None:
        return _sdpa(q, k, v, None, causal=True)
    return _sdpa(q, k, v, layout.mask, causal=False)


class _FlashVarlen(torch.autograd.Function):
    """PyTorch's bundled flash-attention kernel over packed sequences (the varlen entry point that its
    nested-tensor SDPA calls), for when the flash-attn package is absent: causal within each sequence,
    grouped KV heads native, no padding and no scatter/gather. q [N, H, D], k/v [N, Hkv, D]."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen = max_seqlen
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        m = ctx.max_seqlen
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, m, m, 0.0, True, seed, offset)
        return dq, dk, dv, None, None


class _Rows(torch.autograd.Function):
    """`x[:, rows]` with the backward the caller's layout allows; autograd's own (a sorted, accumulating
    scatter) cost ~10% of a 3B step on the H100 for `Shared`'s four gathers a layer.
    - "sum": rows repeat (keys and values copied into every sequence): each source row's gradient is
      the sum of its copies', accumulated in float32;
    - "place": rows are distinct (the stored rows' outputs taken back): the gradient is scattered into zeros;
    - "pick": rows repeat, but only the copies at `picked` (rows of the result, one per source row) get a
      gradient; the others' is zero (queries whose outputs are dropped), so the gradient is read from those."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, picked: Tensor | None, how: str) -> Tensor:
        ctx.save_for_backward(rows, picked)
        ctx.how, ctx.shape = how, x.shape
        return x.index_select(1, rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        rows, picked = ctx.saved_tensors
        if ctx.how == "pick":
            return grad.index_select(1, picked), None, None, None
        if ctx.how == "place":
            return grad.new_zeros(ctx.shape).index_copy_(1, rows, grad), None, None, None
        summed = grad.new_zeros(ctx.shape, dtype=torch.float32).index_add_(1, rows, grad.float())
        return summed.to(grad.dtype), None, None, None


def _attend_packed(q: Tensor, k: Tensor, v: Tensor, layout: Packed) -> Tensor:
    n, h, d = q.shape[1], q.shape[2], q.shape[3]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        cu, m = layout.cu_seqlens, layout.max_seqlen
        # views, not q[0]: a select's backward would allocate and copy a zero-filled gradient per tensor
        q, k, v = (x.view(x.shape[1:]) for x in (q, k, v))
        kernels = fused_kernels()
        if kernels is not None and os.environ.get("SUBLIMINAL_VARLEN", "triton") != "flash":
            out = kernels.varlen_attention(q, k, v, cu, m)
        elif flash_attn_varlen_func is not None:
            out = flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True)
        else:
            out = _FlashVarlen.apply(q, k, v, cu, m)
        return out.reshape(1, n, h * d)
    return _attend_packed_padded(q, k, v, layout)


def _attend_packed_padded(q: Tensor, k: Tensor, v: Tensor, layout: Packed) -> Tensor:
    """Exact fallback for packed sequences (CPU, float32): scatter into a right-padded batch, attend,
    gather back. Padding sits after every real token, so plain causal attention (no mask) never lets
    a real query see it; the padding rows' outputs are dropped by the gather."""
    seq, pos = layout.maps(q.shape[1])
    shape = (len(layout.cu_seqlens) - 1, layout.max_seqlen)

    def pad(x: Tensor) -> Tensor:
        out = x.new_zeros(*shape, *x.shape[2:])
        out[seq, pos] = x[0]
        return out

    out = _sdpa(pad(q), pad(k), pad(v), None, causal=True)
    return out[seq, pos][None]


def _attend_cached(q: Tensor, k: Tensor, v: Tensor, layout: Cached, layer: int) -> Tensor:
    cache = layout.cache
    cache.k[layer, layout.rows, :, layout.positions] = k
    cache.v[layer, layout.rows, :, layout.positions] = v
    if layout.fresh:
        return _sdpa(q, k, v, None, causal=True)
    if layout.slots is None:  # a view of the first B slots, no gather
        b = q.shape[0]
        keys, values = cache.k[layer, :b, :, : layout.kv_len], cache.v[layer, :b, :, : layout.kv_len]
    else:
        keys, values = cache.k[layer, layout.slots, :, : layout.kv_len], cache.v[layer, layout.slots, :, : layout.kv_len]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    return _sdpa(q, keys, values, layout.mask, causal=False, fixed_shape=True)


def attend_cached(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int, layout: Layout,
                  layer: int) -> Tensor | None:
    """Cached attention straight from the q/k/v projection [B, T, (H + 2 Hkv) D] where one kernel does it all
    (kernels/attention.py: `cached_attention` rotates q and k, writes k and v into the cache and reads each
    slot only up to the query's position): a cached layout that is not a prefill, on CUDA, without autograd.
    None elsewhere: the caller splits the heads and calls `attend`. At 256 slots of 0.5B the RoPE kernel it
    replaces was one launch of ~2.2 us a layer and step."""
    if (not isinstance(layout, Cached) or layout.fresh or not qkv.is_cuda or torch.is_grad_enabled()
            or (kernels := fused_kernels()) is None):
        return None
    cache = layout.cache
    return kernels.cached_attention(qkv, cos, sin, heads, kv_heads, cache.k[layer], cache.v[layer],
                                    layout.rows[:, 0], layout.positions)


Layout = Padded | Packed | Shared | Cached


def attend(q: Tensor, k: Tensor, v: Tensor, layout: Layout, layer: int) -> Tensor:
    """Causal attention of q over k/v arranged as `layout` describes; [B, T, H, D] -> [B, T, H*D]."""
    if isinstance(layout, Padded):
        return _attend_padded(q, k, v, layout)
    if isinstance(layout, Packed):
        return _attend_packed(q, k, v, layout)
    if isinstance(layout, Shared):
        rows, keep = layout.expand, layout.keep
        full = _attend_packed(_Rows.apply(q, rows, keep, "pick"), _Rows.apply(k, rows, None, "sum"),
                              _Rows.apply(v, rows, None, "sum"), layout.full)
        return _Rows.apply(full, keep, None, "place")
    return _attend_cached(q, k, v, layout, layer)


def positions_for(layout: Layout, batch: int, length: int, device: torch.device) -> Tensor:
    """Rotary positions [B, T] implied by a layout (left padding shifts them as transformers does)."""
    if isinstance(layout, Cached):
        return layout.positions
    if isinstance(layout, Packed):
        return layout.maps(length)[1][None]
    if isinstance(layout, Shared):
        return layout.positions()
    if layout.key_mask is None:
        return torch.arange(length, device=device)[None].expand(batch, length)
    return (layout.key_mask.long().cumsum(-1) - 1).clamp(min=0)
