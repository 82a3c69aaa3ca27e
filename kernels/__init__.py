"""Triton kernels for the GPU fast paths (RMSNorm, RoPE, SwiGLU, packed varlen attention, the sampler's
per-block softmax statistics), imported lazily by src/ (`src.fused.fused_kernels`).

Not the PyPI package `kernels` that transformers probes for: this package carries no
distribution metadata and no `__version__`, and tests/test_model.py checks that transformers'
`is_kernels_available()` stays False with the project root on sys.path.
"""
