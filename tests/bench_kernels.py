"""Our Triton kernels (kernels/) against the eager PyTorch they replace, per call, in one run.

    python -m tests.bench_kernels                 # on a GPU

At a few rows a call costs what launching it costs on the CPU (the GPU finishes first), so the
small shape measures the launch path; at many rows it measures the kernels themselves. Each figure
is the wall time of `--calls` back-to-back calls (forward, and forward + backward) divided by their
number, without the profiler (which hooks Triton's launches and would count its own cost).
"""
from __future__ import annotations

import time

import click
import torch

from src.fused import kernel
from src.model import rope_tables
from tests.test_kernels import eager_rms_norm, eager_rope_qkv, eager_swiglu


rmsnorm, rope, swiglu = kernel("rmsnorm"), kernel("rope"), kernel("swiglu")


def per_call(fn, calls: int) -> float:
    """Microseconds per call of `fn`, after warm-up calls."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def joined(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """q, k, v as one tensor (the timed call includes the join for both sides)."""
    return torch.cat([t.flatten(-2) for t in outputs], -1)


@click.command()
@click.option("--rows", "row_counts", type=int, multiple=True, default=(8, 8192), show_default=True)
@click.option("--calls", default=2000, show_default=True)
def main(row_counts: tuple[int, ...], calls: int) -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    hidden, inter, heads, kv_heads, dim = 896, 4864, 14, 2, 64  # Qwen2.5-0.5B
    click.echo(f"{'kernel':>8} {'rows':>6} {'pass':>9} {'ours us':>8} {'eager us':>9} {'eager/ours':>10}")
    for rows in row_counts:
        x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(hidden, device=device, dtype=dtype)
        gu = torch.randn(rows, 2 * inter, device=device, dtype=dtype, requires_grad=True)
        qkv = torch.randn(1, rows, (heads + 2 * kv_heads) * dim, device=device, dtype=dtype, requires_grad=True)
        cos, sin = rope_tables(torch.arange(rows, device=device)[None], dim, 1e6, dtype)
        cases = {
            "rmsnorm": (lambda: rmsnorm.rms_norm(x, w, 1e-6), lambda: eager_rms_norm(x, w, 1e-6), x),
            "swiglu": (lambda: swiglu.swiglu(gu), lambda: eager_swiglu(gu), gu),
            "rope": (lambda: joined(rope.rope_qkv(qkv, cos, sin, heads, kv_heads)),
                     lambda: joined(eager_rope_qkv(qkv, cos, sin, heads, kv_heads)), qkv),
        }
        for name, (ours, eager, leaf) in cases.items():
            want = eager().float()
            gap = (ours().float() - want).abs().max().item()
            assert gap <= 0.02 * want.abs().max().item(), (name, gap)  # the same function, bf16 rounding apart
            for label, wrap in (("forward", lambda f: f),
                                ("fwd+bwd", lambda f: lambda: torch.autograd.grad(f().sum(), leaf))):
                with torch.set_grad_enabled(label != "forward"):
                    mine, theirs = per_call(wrap(ours), calls), per_call(wrap(eager), calls)
                click.echo(f"{name:>8} {rows:>6} {label:>9} {mine:>8.1f} {theirs:>9.1f} {theirs / mine:>9.2f}x")


if __name__ == "__main__":
    main()
