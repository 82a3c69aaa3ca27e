"""Where the sampler's time goes: the same batch sampled at temperature 1 (softmax, cumulative sum,
search over the vocabulary per token) and at temperature 0 (argmax), and with one new token (the fixed
cost of a call: prefill and the steps to the first refill through a kept Sampler; a fresh one also
allocates the cache and captures the CUDA graph); with --kernels, the kernels of one
call without the CUDA graph (the graph replays the same kernels, but the profiler cannot see inside it).

    python -m tests.profile_sampling --size 0.5b --batch 256 --batch 1024 [--kernels 25]    # on a GPU
    python -m tests.profile_sampling --size 0.5b --batch 256 --step-kernels 25             # the decode step alone

With --step-kernels, the decode step alone, every slot held: its CUDA-graph replay timed, and its kernels run
eagerly under the profiler, per step (the whole-call table of --kernels mixes in the prefill, at 256 slots of
100-token prompts ~35 ms of a ~150 ms call).

Ours only (tests/bench_sampling.py compares with transformers). Random-initialised exact shapes.
"""
from __future__ import annotations

import time

import click
import torch
from torch.profiler import ProfilerActivity, profile

from src.checkpoint import random_model
from src.constants import SHAPES
from src.model import Qwen2Config
from src.sampler import Sampler, sample
from tests.bench_sampling import _timed


@click.command()
@click.option("--size", default="0.5b", show_default=True)
@click.option("--batch", "batches", type=int, multiple=True, default=(256, 1024), show_default=True)
@click.option("--prompt-len", default=100, show_default=True)
@click.option("--new-tokens", default=100, show_default=True)
@click.option("--repeats", default=2, show_default=True)
@click.option("--kernels", default=0, show_default=True, help="Rows of the kernel table per batch (0: none).")
@click.option("--step-kernels", default=0, show_default=True,
              help="Rows of the decode step's kernel table per batch, every slot held (0: none).")
@click.option("--fixed", default=0, show_default=True,
              help="Rows of the CPU-time table of a one-token call (the fixed cost), per batch (0: none).")
def main(size: str, batches: tuple[int, ...], prompt_len: int, new_tokens: int, repeats: int, kernels: int,
         step_kernels: int, fixed: int) -> None:
    device = torch.device("cuda")
    model = random_model(Qwen2Config.from_dict(SHAPES[size]), dtype=torch.bfloat16, device=device)
    generator = torch.Generator().manual_seed(0)
    click.echo(f"{size}, prompts of {prompt_len}, {new_tokens} new tokens; seconds per call (median of {repeats})")
    click.echo(f"{'batch':>6} {'T=1':>7} {'T=0':>7} {'1 token':>8} {'fresh':>7} {'T=1 ms/step':>12} {'T=0 ms/step':>12} "
               f"{'T=1 tok/s':>10}")
    for batch in batches:
        prompts = torch.randint(0, 151_000, (batch, prompt_len), generator=generator).tolist()

        def run(temperature: float, tokens: int) -> float:
            kept = Sampler(model, max_new_tokens=tokens, temperature=temperature, slots=batch)
            return _timed(lambda: kept(prompts), device, repeats)

        hot, cold, one = run(1.0, new_tokens), run(0.0, new_tokens), run(1.0, 1)
        fresh = _timed(lambda: sample(model, prompts, max_new_tokens=1, slots=batch), device, repeats)
        click.echo(f"{batch:>6} {hot:>7.3f} {cold:>7.3f} {one:>8.3f} {fresh:>7.3f} {(hot - one) / new_tokens * 1e3:>12.2f} "
                   f"{(cold - one) / new_tokens * 1e3:>12.2f} {batch * new_tokens / hot:>10.0f}")
        if kernels:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                sample(model, prompts, max_new_tokens=new_tokens, temperature=1.0, slots=batch, cuda_graph=False)
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            click.echo(f"batch {batch}, eager: {sum(e.count for e in events) / new_tokens:.0f} kernels and "
                       f"{sum(e.self_device_time_total for e in events) / new_tokens / 1e3:.2f} ms of kernel time "
                       f"per new token (prefill included)")
            click.echo(prof.key_averages().table(sort_by="self_device_time_total", row_limit=kernels,
                                                 max_name_column_width=70))
        if step_kernels:
            decode_step(model, prompts, new_tokens, step_kernels)
        if fixed:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                sample(model, prompts, max_new_tokens=1, temperature=1.0, slots=batch)
            click.echo(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=fixed, max_name_column_width=50))


def decode_step(model, prompts: list[list[int]], new_tokens: int, rows: int, steps: int = 20) -> None:
    """One decode step with every slot held (prompts prefilled, as mid-call): the step as the sampler runs it (the
    graph's replay on CUDA), timed over `steps` steps, and the same step run eagerly under the profiler, its
    kernels per step."""
    cuda = model.device.type == "cuda"
    sampler = Sampler(model, max_new_tokens=new_tokens, temperature=1.0, slots=len(prompts))
    sampler(prompts)  # builds the cache, captures the graph
    decoder = sampler._decoder
    decoder.start(list(range(decoder.slots)), prompts[: decoder.slots], 0)
    step = decoder.replay or decoder._decode
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof, torch.no_grad():
        for _ in range(steps):  # without autograd, as the sampler runs it (the k/v cache writes differ)
            decoder._decode()
        sync()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)  # microseconds
    events = sorted((e for e in prof.key_averages() if own(e) > 0), key=lambda e: -own(e))
    click.echo(f"decode step, {decoder.slots} slots held: {'graph replay' if decoder.replay else 'eager'} "
               f"{seconds * 1e3:.3f} ms; eager {sum(e.count for e in events) / steps:.0f} "
               f"{'kernels' if cuda else 'operators'}, {sum(own(e) for e in events) / steps / 1e3:.3f} ms of their time")
    click.echo(f"{'us/step':>9} {'calls':>6} {'us/call':>8}  {'kernel' if cuda else 'operator'}")
    for e in events[:rows]:
        click.echo(f"{own(e) / steps:>9.1f} {e.count / steps:>6.0f} {own(e) / e.count:>8.2f}  {e.key[:100]}")

if __name__ == "__main__":
    main()
