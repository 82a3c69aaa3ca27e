"""Qwen2 (the Qwen2.5 architecture) in plain PyTorch.

RMSNorm, rotary embeddings, grouped-query attention with q/k/v biases, SwiGLU MLP, tied or
untied LM head. Module names equal transformers' so checkpoints and PEFT adapters map 1:1
(`model.layers.3.self_attn.q_proj.weight`). The q/k/v and gate/up weights of a block are views
of one buffer each (`fuse`), so each group runs as one GEMM (`project`) and one LoRA update (with
adapters, gate/up's buffer also holds their B factors in extra columns: the update runs inside that
GEMM, src/lora.py). The arrangement of tokens (padded, packed, cached) is an `attention` layout passed
through; the math here does not change with it.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, Layout, Padded, attend, attend_cached, positions_for
from .errors import UserError
from .fused import fused_kernels
from .lora import LoraLinear


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @classmethod
    def from_dict(cls, raw: dict) -> "Qwen2Config":
        """Read either config.json dialect: the Hub's (top-level rope_theta) or transformers 5's
        (rope_parameters); head_dim defaults to hidden/heads when absent."""
        cfg = dict(raw)
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
            raise UserError(f"unsupported rope scaling in config: {rope or cfg.get('rope_scaling')}")
        if cfg.get("head_dim") is None:
            cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in cfg.items() if k in names})
        except TypeError as exc:
            raise UserError(f"config.json is not a Qwen2 config: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2Config":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read model config {path}: {exc}") from None
        return cls.from_dict(raw)


def fuse(layers: Sequence[nn.Module], extra: int = 0) -> None:
    """Move the weights (and biases) of linear layers that read the same input into one buffer, each
    layer's parameter a view of its rows, so that `project` runs them as one GEMM. Values are kept,
    names too (`q_proj.weight` stays a parameter of its own for checkpoints and PEFT). `extra` zero
    columns after the weights' own: where LoRA keeps its B factors, so that one GEMM over the wider rows
    computes base output and low-rank update together (`LoraLinear.extra_columns`)."""
    for name in ("weight", "bias"):
        params = [getattr(layer, name) for layer in layers]
        if any(p is None for p in params):
            continue
        with torch.no_grad():
            buffer = torch.cat([p.detach() for p in params])
            if name == "weight" and extra:
                buffer = torch.cat([buffer, buffer.new_zeros(buffer.shape[0], extra)], 1)
        start = 0
        for layer, p in zip(layers, params):
            view = buffer[start: start + p.shape[0]]
            setattr(layer, name, nn.Parameter(view[:, :p.shape[1]] if p.dim() == 2 else view, requires_grad=p.requires_grad))
            start += p.shape[0]


def _buffer_row(tensors: Sequence[Tensor]) -> int | None:
    """The length of a row of the buffer the tensors lie in one after another, as `fuse` leaves them (a
    weight's columns plus any extra ones; 1 for biases), or None where they do not."""
    first = tensors[0]
    storage, row = first.untyped_storage().data_ptr(), first.stride(0)
    offset = first.storage_offset()
    for t in tensors:
        if (t.untyped_storage().data_ptr() != storage or t.stride() != first.stride() or t.stride(-1) != 1
                or t.storage_offset() != offset or (t.dim() == 2 and row < t.shape[1])):
            return None
        offset += t.shape[0] * row
    return row


def fused_weights(layers: Sequence[nn.Module]) -> tuple[Tensor, Tensor | None] | None:
    """(weight [sum of outputs, in + extra columns], bias or None) of `layers` as one GEMM's operands, views
    of the buffer `fuse` put them in; None where they are not (moved since), or are trainable (a view
    across them would not pass gradients back to each)."""
    operands = []
    for tensors in ([layer.weight for layer in layers], [layer.bias for layer in layers]):
        if all(t is None for t in tensors):
            operands.append(None)
            continue
        if any(t is None or t.requires_grad for t in tensors) or (row := _buffer_row(tensors)) is None:
            return None
        rows = sum(t.shape[0] for t in tensors)
        shape, stride = ((rows, row), (row, 1)) if tensors[0].dim() == 2 else ((rows,), (1,))
        operands.append(tensors[0].as_strided(shape, stride))
    return operands[0], operands[1]


def project(layers: Sequence[nn.Module], x: Tensor) -> Tensor:
    """The outputs of linear layers (plain or LoRA) that read the same input x, side by side [..., sum of
    outputs]: one GEMM over their fused weights (and for LoRA layers one grouped low-rank update);
    layer by layer, then joined, where the weights are not fused or the layers are of mixed kinds."""
    fused = fused_weights(layers)
    if fused is not None:
        weight, bias = fused
        if all(type(layer) is nn.Linear for layer in layers):
            return F.linear(x, weight[:, :x.shape[-1]], bias)
        if all(isinstance(layer, LoraLinear) for layer in layers):
            out = LoraLinear.grouped(layers, x, weight, bias)
            if out is not None:
                return out
    return torch.cat([layer(x) for layer in layers], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and (fused := fused_kernels()):
            return fused.rms_norm(x, self.weight, self.eps)
        # Normalise in float32, scale in the input dtype (as the reference does, for bf16 parity).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add(self, x: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor]:
        """(x + delta, its norm): a residual add and the norm after it, one kernel on CUDA; delta None
        adds nothing."""
        if delta is None:
            return x, self(x)
        if x.is_cuda and (fused := fused_kernels()):
            return fused.add_rms_norm(x, delta, self.weight, self.eps)
        x = x + delta
        return x, self(x)


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, T, 1, D] for integer positions [B, T], computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def split_heads(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q [..., H, D], k and v [..., Hkv, D] from the q/k/v projections side by side, q and k rotated."""
    half = cos.shape[-1] // 2
    if qkv.is_cuda and half & (half - 1) == 0 and (fused := fused_kernels()):
        return fused.rope_qkv(qkv, cos, sin, heads, kv_heads)
    q, k, v = qkv.unflatten(-1, (heads + 2 * kv_heads, 2 * half)).split([heads, kv_heads, kv_heads], -2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class Attention(nn.Module):
    shared_input = (("q_proj", "k_proj", "v_proj"),)  # run as one projection (`fuse`, `project`)

    def __init__(self, cfg: Qwen2Config, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], layout: Layout) -> Tensor:
        qkv = project((self.q_proj, self.k_proj, self.v_proj), x)
        out = attend_cached(qkv, *rope, self.heads, self.kv_heads, layout, self.layer)  # decoding: one kernel
        if out is None:
            out = attend(*split_heads(qkv, *rope, self.heads, self.kv_heads), layout, self.layer)
        return self.o_proj(out)


class MLP(nn.Module):
    shared_input = (("gate_proj", "up_proj"),)

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = project((self.gate_proj, self.up_proj), x)
        if x.is_cuda and (fused := fused_kernels()):
            return self.down_proj(fused.swiglu(gate_up))
        gate, up = gate_up.chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, delta: Tensor | None, rope: tuple[Tensor, Tensor], layout: Layout) -> tuple[Tensor, Tensor]:
        """The block over its input x + delta; returns the residual stream and the MLP's output, still to be
        added: each residual add runs inside the next norm (`RMSNorm.add`), the last one in the final norm."""
        x, h = self.input_layernorm.add(x, delta)
        x, h = self.post_attention_layernorm.add(x, self.self_attn(h, rope, layout))
        return x, self.mlp(h)


class Backbone(nn.Module):
    """transformers' `Qwen2Model`: embeddings, blocks, final norm."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2(nn.Module):
    """Causal LM. `model(ids)` -> logits [B, T, V]; `hidden` + `logits` let callers compute the
    LM head only where needed (completion tokens, last prompt token)."""

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Activation checkpointing (memory for compute): the first `recompute` blocks keep only their
        # input and recompute the rest in backward; None lets training decide (src/train.py: memory_plan).
        self.recompute: int | None = 0
        self.fuse_projections()

    def fuse_projections(self) -> None:
        """Give each group of projections that read the same input (`shared_input`: q/k/v, gate/up) one
        weight buffer (`fuse`), with the extra columns its LoRA adapters ask for, where it has none: after
        construction, loading, a move (`_apply`), or adding or removing adapters (`apply_lora`)."""
        for module in self.modules():
            for names in getattr(module, "shared_input", ()):
                layers = [getattr(module, n) for n in names]
                extra = LoraLinear.extra_columns(layers)
                weights, biases = ([getattr(layer, name) for layer in layers] for name in ("weight", "bias"))
                if (_buffer_row(weights) != weights[0].shape[1] + extra
                        or (biases[0] is not None and _buffer_row(biases) != 1)):
                    fuse(layers, extra)

    def _apply(self, fn, recurse: bool = True):
        """A move or cast (`.to`, `.cuda`, ...) converts each parameter on its own; fuse them again."""
        super()._apply(fn, recurse)
        self.fuse_projections()
        return self

    def hidden(self, input_ids: Tensor, layout: Layout | None = None) -> Tensor:
        """Final-norm hidden states [B, T, hidden] of token ids [B, T] arranged as `layout`."""
        layout = layout if layout is not None else Padded()
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        positions = positions_for(layout, b, t, input_ids.device)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        delta = None
        for i, block in enumerate(self.model.layers):
            if i < (self.recompute or 0) and torch.is_grad_enabled():
                # no RNG in a block; saving the RNG state is not allowed inside a CUDA graph capture
                x, delta = torch.utils.checkpoint.checkpoint(block, x, delta, rope, layout, use_reentrant=False,
                                                             preserve_rng_state=False)
            else:
                x, delta = block(x, delta, rope, layout)
        return self.model.norm.add(x, delta)[1]

    def logits(self, hidden: Tensor) -> Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, layout: Layout | None = None) -> Tensor:
        if layout is None and attention_mask is not None:
            layout = Padded(attention_mask.bool())
        return self.logits(self.hidden(input_ids, layout))

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        c = self.config
        return KVCache(c.num_hidden_layers, slots, c.num_key_value_heads, max_len, c.head_dim, p.dtype, p.device)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype
