"""Triton kernels for the GPU fast paths (RMSNorm, RoPE, SwiGLU, LoRA), imported lazily by src/.

Not the PyPI package `kernels` that transformers probes for: this package carries no
distribution metadata and no `__version__`, and tests/test_layout.py checks that transformers'
`is_kernels_available()` stays False with the project root on sys.path.
"""
