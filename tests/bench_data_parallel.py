"""Data-parallel training against one process on a random Qwen2.5-shaped model: do the per-step
losses agree (within bf16 rounding), and how do tokens/s scale? (issue 9)

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python -m tests.bench_data_parallel run --size 7b --out runs/dp/7b-1
    torchrun --standalone --nproc-per-node 2 -m tests.bench_data_parallel run --size 7b --out runs/dp/7b-2
    python -m tests.bench_data_parallel compare runs/dp/7b-1 runs/dp/7b-2 --processes 2

Both runs train the same random weights (seed 0 on every rank) on the same synthetic numbers-shaped
pairs (tests.bench_training.synthetic_pairs) with effective batch 60 and the same micro-batch, so they
differ only in which process computes which examples and in summation order. tokens/s is a step's
tokens over rank 0's step time, the median after the warm-up steps. `--out` must be a fresh folder
(an existing adapter there means the run is done). `--size tiny --device cpu` is a smoke run (gloo).
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import click
import torch

from src import distributed
from src.checkpoint import random_model
from src.constants import TRAIN
from src.model import Qwen2Config
from src.train import LOG_FILE, recompute_for, train
from tests.bench_training import shape, synthetic_pairs

WARMUP = 2  # steps left out of the tokens/s median


@click.group()
def main() -> None:
    """Data-parallel agreement and scaling."""


@main.command()
@click.option("--size", default="1.5b", show_default=True, help="A Qwen2.5 size, or tiny.")
@click.option("--steps", default=12, show_default=True, help="Optimizer steps.")
@click.option("--micro-batch", default=10, show_default=True, help="Examples per forward pass, per process.")
@click.option("--checkpointing/--no-checkpointing", default=False, show_default=True)
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Fresh folder for the log and adapter.")
def run(size: str, steps: int, micro_batch: int, checkpointing: bool, device: str, out: str) -> None:
    """Train in this process, or data-parallel in each process torchrun started; log to OUT/train.jsonl."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with distributed.process_group(device) as rank_device:
        model = random_model(Qwen2Config.from_dict(shape(size)), dtype=dtype, device=rank_device)
        model.recompute = recompute_for(checkpointing, model.config.num_hidden_layers)
        pairs = synthetic_pairs(model.config.vocab_size, TRAIN.batch_size * steps)
        train(model, pairs, Path(out) / "adapter", out, max_steps=steps, micro_batch=micro_batch,
              checkpoint_every=10**9)
        if distributed.is_main():
            click.echo(f"{size}: {distributed.world()} process(es), log {Path(out) / LOG_FILE}")


def read_log(folder: str) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / LOG_FILE).read_text().splitlines()]


@main.command()
@click.argument("single", type=click.Path(exists=True, file_okay=False))
@click.argument("parallel", type=click.Path(exists=True, file_okay=False))
@click.option("--processes", default=2, show_default=True, help="Processes of the parallel run.")
def compare(single: str, parallel: str, processes: int) -> None:
    """Per-step losses side by side; the largest relative differences; tokens/s and scaling efficiency."""
    one, many = read_log(single), read_log(parallel)
    if [(r["step"], r["tokens"]) for r in one] != [(r["step"], r["tokens"]) for r in many]:
        raise click.ClickException("the runs did not train the same steps on the same tokens")
    click.echo(f"{'step':>4} {'loss 1':>12} {'loss N':>12} {'rel diff':>9} {'grad norm rel diff':>18}")
    for a, b in zip(one, many):
        click.echo(f"{a['step']:>4} {a['loss']:12.6f} {b['loss']:12.6f} {abs(b['loss'] - a['loss']) / a['loss']:9.2e} "
                   f"{abs(b['grad_norm'] - a['grad_norm']) / a['grad_norm']:18.2e}")
    speed = [statistics.median(r["tokens_per_s"] for r in log[WARMUP:] or log) for log in (one, many)]
    summary = {"max_rel_loss_diff": max(abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(one, many)),
               "max_rel_grad_norm_diff": max(abs(b["grad_norm"] - a["grad_norm"]) / a["grad_norm"]
                                             for a, b in zip(one, many)),
               "tokens_per_s_1": speed[0], "tokens_per_s_n": speed[1], "processes": processes,
               "speedup": speed[1] / speed[0], "scaling_efficiency": speed[1] / speed[0] / processes}
    click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
