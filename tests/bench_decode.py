"""The decode step's Triton kernels against the paths they replaced, side by side in one run.

    python -m tests.bench_decode --size 0.5b --batch 64 --batch 256 --batch 1024     # on a GPU
    python -m tests.bench_decode --size tiny --device cpu --batch 4 --new-tokens 8     # smoke check

A kept `Sampler` (decode step replayed from a CUDA graph) samples the same prompts with our kernels
(kernels/attention.py: `cached_attention`, each query reading its cache slot only up to its position;
kernels/sampling.py: `pick`, the draw's second stage) and with what they replaced (SDPA over the whole
cache through an additive mask, cuDNN's kernel at decode; the torch formula `src.sampler.pick`).
Generated tokens/s over the whole call (prefill included), median of `--repeats` after a warm-up call
that also captures the graphs, and the share of sequences that came out identical: bf16 rounding of the
attention can move a draw that falls near a token's edge, after which that sequence goes its own way.
On the CPU both sides run the same torch code.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import click
import torch

from src import attention, sampler
from src.checkpoint import random_model
from src.constants import SHAPES
from src.fused import fused_kernels
from src.model import Qwen2Config
from tests.bench_sampling import TINY, _timed


@contextmanager
def replaced_paths() -> Iterator[None]:
    """The decode step as it ran before our kernels: SDPA over the cache, the torch pick."""
    kernels, keep_attention = fused_kernels(), attention.fused_kernels
    keep_pick = kernels.pick if kernels is not None else None
    attention.fused_kernels = lambda: None
    if kernels is not None:
        kernels.pick = sampler.pick
    try:
        yield
    finally:
        attention.fused_kernels = keep_attention
        if kernels is not None:
            kernels.pick = keep_pick


@click.command()
@click.option("--size", default="0.5b", show_default=True, help="A Qwen2.5 size (0.5b ... 32b) or tiny.")
@click.option("--batch", "batches", type=int, multiple=True, default=(64, 256, 1024), show_default=True)
@click.option("--prompt-len", default=100, show_default=True)
@click.option("--new-tokens", default=100, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
def main(size: str, batches: tuple[int, ...], prompt_len: int, new_tokens: int, repeats: int,
         device: str | None) -> None:
    """Print generated tokens/s with our decode kernels and with the replaced paths, and their ratio."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = TINY if size == "tiny" else SHAPES[size]
    model = random_model(Qwen2Config.from_dict(shape), dtype=torch.bfloat16, device=device)
    generator = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    click.echo(f"{size} on {name}: prompts of {prompt_len} tokens, {new_tokens} new tokens, temperature 1")
    click.echo(f"{'batch':>6} {'ours tok/s':>11} {'before tok/s':>13} {'ratio':>6} {'same':>5} {'slots':>6}")
    for batch in batches:
        prompts = torch.randint(0, min(shape["vocab_size"], 151_000), (batch, prompt_len), generator=generator).tolist()
        rates, samples = [], []
        for paths in (nullcontext, replaced_paths):
            with paths():
                kept = sampler.Sampler(model, max_new_tokens=new_tokens, temperature=1.0, seed=0, slots=batch)
                samples.append(kept(prompts))
                rates.append(batch * new_tokens / _timed(lambda: kept(prompts), device, repeats))
                slots = kept._decoder.slots
                del kept  # its cache and graphs
        same = sum(a == b for a, b in zip(*samples)) / batch
        click.echo(f"{batch:>6} {rates[0]:>11.0f} {rates[1]:>13.0f} {rates[0] / rates[1]:>5.2f}x {same:>5.2f} {slots:>6}")


if __name__ == "__main__":
    main()
