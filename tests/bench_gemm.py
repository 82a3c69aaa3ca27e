"""A size's base GEMMs against the rows a training pass holds: TFLOP/s of the forward (x @ W^T) and of the
input gradient (g @ W; the base weights are frozen, so no weight gradient), per projection group as the model
fuses them (q/k/v, o, gate/up, down), and a block's time for both per row. It says which pass capacities
land well on cuBLAS's tiles and waves: a capacity on a tile boundary may pay more than one padded to 64.

    python -m tests.bench_gemm --size 32b                          # on a GPU
    python -m tests.bench_gemm --size tiny --device cpu --rows 64  # smoke check
"""
from __future__ import annotations

import time

import click
import torch

from src.constants import SHAPES
from tests.bench_sampling import TINY


def groups(shape: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection group of a block."""
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape.get("head_dim") or \
        shape["hidden_size"] // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    return {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * i), "down": (i, h)}


def seconds(fn, device: torch.device, repeats: int) -> float:
    """Mean wall time of `fn` over `repeats` calls after three warm-up calls."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@click.command()
@click.option("--size", default="32b", show_default=True, help="A Qwen2.5 size (0.5b ... 32b) or tiny.")
@click.option("--rows", "row_counts", type=int, multiple=True,
              default=tuple(range(384, 1281, 64)) + (1536, 2048), help="Rows of a pass (repeatable).")
@click.option("--repeats", default=20, show_default=True)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
def main(size: str, row_counts: tuple[int, ...], repeats: int, device: str | None) -> None:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = groups(TINY if size == "tiny" else SHAPES[size])
    weights = {name: torch.randn(n, k, device=device, dtype=dtype) * 0.01 for name, (k, n) in shapes.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    click.echo(f"{size} on {name}: TFLOP/s forward (f) and input gradient (b) per group; a block's both, per row")
    click.echo(f"{'rows':>5} " + " ".join(f"{g + ' f':>10} {g + ' b':>10}" for g in shapes) + f" {'block us':>9} {'us/row':>7}")
    for rows in row_counts:
        cells, total = [], 0.0
        for group, (k, n) in shapes.items():
            w = weights[group]
            x = torch.randn(rows, k, device=device, dtype=dtype)
            g = torch.randn(rows, n, device=device, dtype=dtype)
            forward, backward = seconds(lambda: x @ w.t(), device, repeats), seconds(lambda: g @ w, device, repeats)
            cells += [2 * rows * k * n / t / 1e12 for t in (forward, backward)]
            total += forward + backward
        click.echo(f"{rows:>5} " + " ".join(f"{c:>10.1f}" for c in cells) + f" {total * 1e6:>9.0f} {total * 1e6 / rows:>7.3f}")


if __name__ == "__main__":
    main()
