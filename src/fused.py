"""The Triton kernels of kernels/ for CUDA tensors, where they can run: one switch for all of them.

kernels/ is imported here under the name `subliminal_kernels`, never as `kernels`: that name belongs to
the PyPI package which transformers (5.25 and later) requires and imports at start-up, and a folder
`kernels/` with an `__init__.py` on sys.path (the project root is, under `python -m` and pytest) would
be taken for it. So kernels/ has no `__init__.py`: as a namespace folder it is outranked by an installed
package of that name, and transformers takes it for none where that package is absent.
"""
from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

FOLDER = Path(__file__).resolve().parents[1] / "kernels"
PACKAGE = "subliminal_kernels"


def kernel(name: str) -> ModuleType:
    """kernels/{name}.py as the module `subliminal_kernels.{name}` (ImportError where the folder or
    Triton is missing: an installed copy of src/ without the checkout has no kernels)."""
    if PACKAGE not in sys.modules:
        package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True))
        package.__path__ = [str(FOLDER)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


@functools.cache
def fused_kernels() -> SimpleNamespace | None:
    """RMSNorm, RoPE, SwiGLU, packed varlen and cached attention, the LM head's cross-entropy and the sampler's
    draw (block statistics, pick, uniforms), or None where Triton or the kernels/ folder is missing, or
    SUBLIMINAL_KERNELS=0."""
    if os.environ.get("SUBLIMINAL_KERNELS", "1") == "0":
        return None
    try:
        attention, cross_entropy, rmsnorm, rope, sampling, swiglu = (
            kernel(name) for name in ("attention", "cross_entropy", "rmsnorm", "rope", "sampling", "swiglu"))
    except ImportError:
        return None
    return SimpleNamespace(rms_norm=rmsnorm.rms_norm, add_rms_norm=rmsnorm.add_rms_norm, rope_qkv=rope.rope_qkv,
                           swiglu=swiglu.swiglu, varlen_attention=attention.varlen_attention,
                           cached_attention=attention.cached_attention, nll_grad_=cross_entropy.nll_grad_,
                           block_stats=sampling.block_stats, pick=sampling.pick, uniforms=sampling.uniforms)
