"""Qwen2 (the Qwen2.5 architecture) in plain PyTorch.

RMSNorm, rotary embeddings, grouped-query attention with q/k/v biases, SwiGLU MLP, tied or
untied LM head. Module names equal transformers' so checkpoints and PEFT adapters map 1:1
(`model.layers.3.self_attn.q_proj.weight`). The arrangement of tokens (padded, packed, cached)
is an `attention` layout passed through; the math here does not change with it.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, Layout, Padded, attend, positions_for
from .errors import UserError


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


@functools.cache
def fused_kernels() -> SimpleNamespace | None:
    """The Triton kernels of kernels/ (RMSNorm, RoPE, SwiGLU, the sampler's block statistics) for CUDA
    tensors, or None where Triton or the kernels/ package (importable from the project root) is
    missing, or SUBLIMINAL_KERNELS=0."""
    if os.environ.get("SUBLIMINAL_KERNELS", "1") == "0":
        return None
    try:
        from kernels import rmsnorm, rope, sampling, swiglu
    except ImportError:
        return None
    return SimpleNamespace(rms_norm=rmsnorm.rms_norm, rope=rope.rope, swiglu=swiglu.swiglu,
                           block_stats=sampling.block_stats)


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


def rope_tables(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, T, 1, D] for integer positions [B, T], computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    if x.is_cuda and half & (half - 1) == 0 and (fused := fused_kernels()):
        return fused.rope(x, cos, sin)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int) -> None:
        super().__init__()
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], layout: Layout) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o_proj(attend(q, k, v, layout, self.layer))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if x.is_cuda and (fused := fused_kernels()):
            return self.down_proj(fused.swiglu(gate, up))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], layout: Layout) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def hidden(self, input_ids: Tensor, layout: Layout | None = None) -> Tensor:
        """Final-norm hidden states [B, T, hidden] of token ids [B, T] arranged as `layout`."""
        layout = layout if layout is not None else Padded()
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        positions = positions_for(layout, b, t, input_ids.device)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.model.layers):
            if i < (self.recompute or 0) and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, layout, use_reentrant=False)
            else:
                x = block(x, rope, layout)
        return self.model.norm(x)

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
