"""How the memory plan cuts a real dataset's steps into passes at each size, on the CPU: passes a step and rows
(tokens, padded as the CUDA graphs pad them) a step, cut by tokens (`token_passes`, what training does) against
cut into a fixed count of examples a pass (the largest even share of the batch whose every pass in the run fits
the same memory: the plan before 2026-12-07, fourth session). No GPU: free memory is the card's less the weights.

    python -m tests.plan_passes --data runs/datasets/0.5b/owl-numbers.parquet --tokenizer 0.5b

Rows are what a pass's GEMMs compute and passes what a step pays per pass (launch gaps, LoRA's small GEMMs),
so fewer of both is a faster step (tests/bench_training.py measures it). "once": the chat template's opening
stored once a pass (what training does, src/passes.py), against "whole" (stored in every example).
"""
from __future__ import annotations

import dataclasses

import click
import numpy as np

from src.constants import SHAPES, TRAIN
from src.data import read_pairs
from src.model import Qwen2Config
from src.passes import graph_padding, pass_shape, token_passes
from src.tokenizer import load_tokenizer
from src.train import epoch_order, fit_tokens, memory_plan, opening_copies, prepare, tokenize_pairs

WEIGHTS = {"0.5b": 0.99e9, "1.5b": 3.09e9, "3b": 6.17e9, "7b": 15.2e9, "14b": 29.5e9, "32b": 65.5e9}  # bf16 bytes


@click.command()
@click.option("--data", required=True, help="A numbers dataset (parquet of prompt/completion pairs).")
@click.option("--tokenizer", "tokenizer_name", default="0.5b", show_default=True, help="A size, folder or Hub id.")
@click.option("--sizes", default="7b,14b,32b", show_default=True)
@click.option("--memory-gib", default=79.18, show_default=True, help="The card's memory (H100 80GB: 79.18).")
@click.option("--epochs", default=2, show_default=True, help="Epochs of steps to cut (each its own order).")
def main(data: str, tokenizer_name: str, sizes: str, memory_gib: float, epochs: int) -> None:
    seqs = prepare(tokenize_pairs(load_tokenizer(tokenizer_name), read_pairs(data)), TRAIN.max_length)
    batch = TRAIN.batch_size
    steps = [[seqs[i] for i in order[k: k + batch]] for epoch in range(epochs)
             for order in [epoch_order(len(seqs), 0, epoch)] for k in range(0, len(seqs), batch)]
    lengths = np.array([len(e.ids) for e in seqs])
    longest = int(lengths.max())
    padding = graph_padding(longest)
    whole = [[dataclasses.replace(e, shared=0) for e in s] for s in steps]
    click.echo(f"{len(seqs)} pairs, {lengths.mean():.1f} tokens on average (longest {longest}), an opening of "
               f"{seqs[0].shared} shared; {len(steps)} steps")
    click.echo(f"{'size':>5} {'fixed':>6} {'passes':>7} {'rows':>7} | {'capacity':>8} {'by tokens, whole':>16} "
               f"{'rows':>7} | {'capacity':>8} {'by tokens, once':>15} {'rows':>7}")
    for size in sizes.split(","):
        config = Qwen2Config.from_dict(SHAPES[size])
        free = memory_gib * 2**30 - WEIGHTS[size] - 1e9  # the adapters, Adam's moments, CUDA's own

        def plan(copies: float) -> tuple[int, int]:
            return memory_plan(config, 2, free, -(-longest // 64) * 64, lengths.mean() * batch, 1, 0, True,
                               padding.tokens, per_logit=2, copies=copies)  # the fused loss's bf16 logits

        (capacity, recompute), (once, _) = plan(0.0), plan(opening_copies(seqs[0].shared, lengths.mean()))
        budget = fit_tokens(config, 2, free, recompute, 2)
        shares = sorted({-(-batch // p) for p in range(1, batch + 1)}, reverse=True)
        fixed = next((m for m in shares if all(pass_shape([s[k: k + m]], padding)[0] <= budget
                                               for s in whole for k in range(0, len(s), m))), 1)
        cuts = {"fixed": [[[s[k: k + fixed]] for k in range(0, len(s), fixed)] for s in whole],
                "whole": [token_passes([s], capacity) for s in whole],
                "once": [token_passes([s], once) for s in steps]}
        passes = {k: np.mean([len(c) for c in v]) for k, v in cuts.items()}
        rows = {k: np.mean([sum(pass_shape(g, padding)[0] for g in c) for c in v]) for k, v in cuts.items()}
        click.echo(f"{size:>5} {fixed:>6} {passes['fixed']:>7.2f} {rows['fixed']:>7.0f} | {capacity:>8} "
                   f"{passes['whole']:>16.2f} {rows['whole']:>7.0f} | {once:>8} {passes['once']:>15.2f} "
                   f"{rows['once']:>7.0f}")


if __name__ == "__main__":
    main()
