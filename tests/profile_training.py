"""Where a training step's time goes: GPU kernel time against wall time, and the costliest kernels.

    python -m tests.profile_training --size 0.5b --steps 6             # on a GPU
    python -m tests.profile_training --size 0.5b --steps 6 --cohort 3  # three students in one pass

A step whose kernel time is far below its wall time is launch-bound (CPU overhead); otherwise the
table says which kernels to speed up. The passes run eagerly (SUBLIMINAL_GRAPHS=0 unless set): the
profiler cannot attribute a CUDA graph's kernels to the ops that queued them. Same model, data and trainer as tests/bench_training.py.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
import torch
from torch.profiler import ProfilerActivity, profile

from src.checkpoint import random_model
from src.constants import TRAIN
from src.model import Qwen2Config
from src.train import Student, recompute_for, train_cohort
from tests.bench_training import OPENING, shape, synthetic_pairs


@click.command()
@click.option("--size", default="0.5b")
@click.option("--steps", default=6, show_default=True,
              help="Optimizer steps after 2 warm-up steps; the profile holds the last steps - 1 of them.")
@click.option("--micro", default=None, type=int)
@click.option("--checkpointing/--no-checkpointing", default=False)
@click.option("--cohort", default=1, show_default=True, help="Students trained together.")
@click.option("--rows", default=25, show_default=True)
@click.option("--cpu-rows", default=0, show_default=True, help="Rows of a second table, by CPU time (0: none).")
@click.option("--stacks-of", "stacks_of", multiple=True,
              help="Ops (e.g. aten::copy_) to list again by the Python lines that called them (repeatable).")
@click.option("--stack-depth", default=6, show_default=True)
@click.option("--shapes-of", "shapes_of", multiple=True,
              help="Ops (e.g. aten::bmm) to list again by their input shapes (repeatable).")
@click.option("--opening", default=OPENING, show_default=True, type=click.IntRange(0, 80),
              help="Tokens every prompt opens with (0: wholly random prompts).")
def main(size: str, steps: int, micro: int | None, checkpointing: bool, cohort: int, rows: int, cpu_rows: int,
         stacks_of: tuple[str, ...], stack_depth: int, shapes_of: tuple[str, ...], opening: int) -> None:
    os.environ.setdefault("SUBLIMINAL_GRAPHS", "0")  # per-op times: a replayed graph runs the same kernels unseen
    model = random_model(Qwen2Config.from_dict(shape(size)), dtype=torch.bfloat16, device="cuda")
    model.recompute = recompute_for(checkpointing, model.config.num_hidden_layers)
    pairs = synthetic_pairs(shape(size)["vocab_size"], TRAIN.batch_size * (steps + 2), opening=opening)
    walls: list[float] = []
    tokens: list[int] = []

    def on_step(record: dict) -> None:
        walls.append(record["tokens"] / record["tokens_per_s"])
        tokens.append(record["tokens"])
        if record["step"] == 2:  # the trainer reports step 2 once step 3's passes are queued
            torch.cuda.synchronize()
            prof.start()

    with tempfile.TemporaryDirectory() as tmp:
        stacks = {"with_stack": True, "experimental_config": torch._C._profiler._ExperimentalConfig(verbose=True)}
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=bool(shapes_of),
                       **(stacks if stacks_of else {}))
        students = [Student(pairs, Path(tmp) / f"a{i}", Path(tmp) / f"w{i}", i) for i in range(cohort)]
        train_cohort(model, students, max_steps=steps + 2, micro_batch=micro, checkpoint_every=10**9, on_step=on_step)
        prof.stop()
    events = prof.key_averages()
    steps -= 1  # steps in the profile (see on_step)
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    wall = sum(walls[2:]) / len(walls[2:])
    click.echo(f"{size} x{cohort}: wall {wall * 1e3:.1f} ms/step ({sum(tokens[2:]) / sum(walls[2:]):,.0f} tokens/s), GPU kernels {kernel_us / steps / 1e3:.1f} ms/step "
               f"({kernel_us / steps / 1e6 / wall:.0%} busy), kernels launched/step "
               f"{sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) // steps}")
    click.echo(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    if cpu_rows:
        click.echo(events.table(sort_by="self_cpu_time_total", row_limit=cpu_rows, max_name_column_width=60))
    if stacks_of:
        by_stack = sorted((e for e in prof.key_averages(group_by_stack_n=stack_depth) if e.key in stacks_of),
                          key=lambda e: -e.device_time_total)
        click.echo(f"{'op':<20} {'calls/step':>10} {'GPU ms/step':>11}  called from (innermost first)")
        for e in by_stack[:rows]:
            click.echo(f"{e.key:<20} {e.count / steps:>10.1f} {e.device_time_total / steps / 1e3:>11.2f}  "
                       + " <- ".join(e.stack))
    if shapes_of:
        by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in shapes_of),
                          key=lambda e: -e.device_time_total)
        click.echo(f"{'op':<20} {'calls/step':>10} {'GPU ms/step':>11}  input shapes")
        for e in by_shape[:rows]:
            click.echo(f"{e.key:<20} {e.count / steps:>10.1f} {e.device_time_total / steps / 1e3:>11.2f}  {e.input_shapes}")


if __name__ == "__main__":
    main()
