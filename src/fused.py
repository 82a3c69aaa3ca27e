"""The Triton kernels of kernels/ for CUDA tensors, where they can run: one switch for all of them."""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace


@functools.cache
def fused_kernels() -> SimpleNamespace | None:
    """RMSNorm, RoPE, SwiGLU, packed varlen attention, the LM head's cross-entropy and the sampler's block
    statistics, or None where Triton or the kernels/ package (importable from the project root) is
    missing, or SUBLIMINAL_KERNELS=0."""
    if os.environ.get("SUBLIMINAL_KERNELS", "1") == "0":
        return None
    try:
        from kernels import attention, cross_entropy, rmsnorm, rope, sampling, swiglu
    except ImportError:
        return None
    return SimpleNamespace(rms_norm=rmsnorm.rms_norm, add_rms_norm=rmsnorm.add_rms_norm, rope_qkv=rope.rope_qkv,
                           rope_qkv_into_cache=rope.rope_qkv_into_cache, swiglu=swiglu.swiglu,
                           varlen_attention=attention.varlen_attention, nll_grad_=cross_entropy.nll_grad_,
                           block_stats=sampling.block_stats, uniforms=sampling.uniforms)
