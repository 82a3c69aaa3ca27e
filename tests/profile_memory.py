"""What training keeps in memory per token and block, measured, against the memory plan's estimate.

    python -m tests.profile_memory --sizes 0.5b,7b,14b,32b        # on a GPU

For each size: models of its exact block shape but 4 and 8 blocks, one optimizer step of one
student at a fixed micro-batch, peak memory above what was allocated before the step. The
difference between 8 and 4 blocks, per token of the micro-batch and per block, is what one block
keeps for backward (no recomputation) or what a recomputed block keeps (its input); the rest (LM
head chunks, LoRA state, the backward in flight) is the same at both depths. `src/train.py:
activation_bytes` (what `fit_tokens` divides free memory by) must not estimate less than this.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import click
import torch

from src.checkpoint import random_model
from src.constants import SHAPES, TRAIN
from src.model import Qwen2Config
from src.train import Student, activation_bytes, train_cohort
from tests.bench_training import synthetic_pairs


def step_peak(config: Qwen2Config, pairs, micro: int, recompute_all: bool) -> float:
    """Peak bytes above the allocation before one optimizer step."""
    model = random_model(config, dtype=torch.bfloat16, device="cuda")
    model.recompute = config.num_hidden_layers if recompute_all else 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with tempfile.TemporaryDirectory() as tmp:
        train_cohort(model, [Student(pairs, Path(tmp) / "a", Path(tmp) / "w", 0)], max_steps=1, micro_batch=micro,
                     checkpoint_every=10**9)
    peak = torch.cuda.max_memory_allocated() - before
    del model
    torch.cuda.empty_cache()
    return peak


@click.command()
@click.option("--sizes", default="0.5b,7b,14b,32b", show_default=True)
@click.option("--micro", default=8, show_default=True, help="Examples per forward pass.")
def main(sizes: str, micro: int) -> None:
    click.echo(f"{'size':>5} {'recompute':>9} {'KB/token/block measured':>24} {'estimated':>10} {'ratio':>6} "
               f"{'fixed MB':>9}")
    for size in sizes.split(","):
        full = Qwen2Config.from_dict(SHAPES[size])
        pairs = synthetic_pairs(full.vocab_size, TRAIN.batch_size)
        tokens = sum(len(p) + len(c) for p, c in pairs[:micro])
        longest = max(len(p) + len(c) for p, c in pairs)
        for recompute_all in (False, True):
            peaks = {n: step_peak(dataclasses.replace(full, num_hidden_layers=n), pairs, micro, recompute_all)
                     for n in (4, 8)}
            per_block = (peaks[8] - peaks[4]) / 4 / tokens
            k = 8 if recompute_all else 0
            estimate = (activation_bytes(dataclasses.replace(full, num_hidden_layers=8), 2, k)
                        - activation_bytes(dataclasses.replace(full, num_hidden_layers=4), 2, k // 2)) / 4
            click.echo(f"{size:>5} {'all' if recompute_all else 'none':>9} {per_block / 1e3:>24.1f} "
                       f"{estimate / 1e3:>10.1f} {estimate / per_block:>5.2f}x "
                       f"{(peaks[4] - 4 * per_block * tokens) / 1e6:>9.0f}")


if __name__ == "__main__":
    main()
