"""Sampling speed: our sampler against transformers' `generate`, side by side in one run.

    python -m tests.bench_sampling --size 0.5b --batch 64 --batch 256            # on a GPU
    python -m tests.bench_sampling --size tiny --device cpu --batch 4 --new-tokens 8   # smoke check

A random-initialised model of the exact Qwen2.5 shape (speed does not depend on weight values);
transformers' Qwen2ForCausalLM is built from the same config and shares our tensors (no second
copy). Both sides get the same batch of prompts of `--prompt-len` random tokens and generate
exactly `--new-tokens` tokens per sequence at temperature 1 with nothing else (transformers:
do_sample, top_k 0, top_p 1, repetition_penalty 1, min_new_tokens = max_new_tokens; ours: no stop
token). Generated tokens/s = batch x new tokens / wall time of the whole call (prefill included),
median of `--repeats` after one warm-up call per side. "ours" keeps one `Sampler` across the calls,
as teacher generation does over its chunks (the warm-up call allocates the cache and captures the
decode graph); "fresh" calls `sample()`, which builds and captures anew every call. It lives in tests/ because it imports
transformers, which src/ never does.

What 10x `generate` asks of the card: "floor" is the least time any sampler could take for the row's work at the
card's spec-sheet rates (`floor_seconds`; defaults: H100 SXM, 989 dense bf16 TFLOP/s and 3.35 TB/s), "10x needs"
the share of those rates a sampler must hold over the whole call to run 10x `generate`'s time of that row (over
100%: no sampler can on this card), "ours at" the share ours holds.
"""
from __future__ import annotations

import statistics
import time

import click
import torch

from src.checkpoint import random_model
from src.constants import SHAPES
from src.memory import cap_memory
from src.model import Qwen2, Qwen2Config
from src.sampler import Sampler, sample

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
            max_position_embeddings=4096)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_seconds(model: Qwen2, batch: int, prompt_len: int, new_tokens: int, tflops: float, tbps: float) -> float:
    """A lower bound on sampling `new_tokens` tokens for `batch` prompts of `prompt_len` tokens: the prefill's 2
    FLOPs per block weight and prompt token (the LM head once per prompt: its first token), then for each
    further token the longer of the step's FLOPs (2 per weight and slot, LM head included) and one read of
    every weight but the embedding table's unread rows. Attention and the KV cache are left out: a bound, not
    a model of the step."""
    config = model.config
    head = config.vocab_size * config.hidden_size
    outside = ("model.embed_tokens.", "lm_head.")
    body = sum(p.numel() for name, p in model.named_parameters() if not name.startswith(outside))
    prefill = 2 * (body * prompt_len + head) * batch / (tflops * 1e12)
    step = max(2 * (body + head) * batch / (tflops * 1e12), (body + head) * model.dtype.itemsize / (tbps * 1e12))
    return prefill + (new_tokens - 1) * step


def transformers_twin(model: Qwen2, shape: dict):
    """transformers' Qwen2ForCausalLM over the same tensors (assigned, not copied)."""
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM

    config = HFConfig(**shape)
    with torch.device("meta"):
        twin = Qwen2ForCausalLM._from_config(config, dtype=model.dtype, attn_implementation="sdpa")
    twin.load_state_dict(model.state_dict(), assign=True, strict=False)
    if config.tie_word_embeddings:
        twin.lm_head.weight = twin.model.embed_tokens.weight
    with torch.device(model.device):  # rotary tables are buffers computed at construction, not weights
        twin.model.rotary_emb = type(twin.model.rotary_emb)(config)
    return twin.eval()


@click.command()
@click.option("--size", default="0.5b", show_default=True, help="A Qwen2.5 size (0.5b ... 32b) or tiny.")
@click.option("--batch", "batches", type=int, multiple=True, default=(64, 256), show_default=True,
              help="Sequences per call (repeatable).")
@click.option("--prompt-len", default=100, show_default=True)
@click.option("--new-tokens", default=60, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--memory-gib", default=None, type=float,
              help="Cap this process's GPU memory (e.g. 79 on a larger GPU, for the real runs' H100 80 GB).")
@click.option("--spec-tflops", default=989.0, show_default=True, help="The card's dense bf16 peak (H100 PCIe: 756).")
@click.option("--spec-tbps", default=3.35, show_default=True, help="The card's memory bandwidth (H100 PCIe: 2.0).")
def main(size: str, batches: tuple[int, ...], prompt_len: int, new_tokens: int, repeats: int, device: str | None,
         dtype: str, memory_gib: float | None, spec_tflops: float, spec_tbps: float) -> None:
    """Print generated tokens/s of ours and of transformers' generate, their ratio, and the slots ours used."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if memory_gib is not None:
        cap_memory(memory_gib, device)
    shape = TINY if size == "tiny" else SHAPES[size]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = random_model(Qwen2Config.from_dict(shape), dtype=torch_dtype, device=device)
    twin = transformers_twin(model, shape)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, shape["vocab_size"], (2, 16), generator=generator).to(device)
    with torch.no_grad():
        gap = (model(probe).float() - twin(input_ids=probe).logits.float()).abs().max().item()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    click.echo(f"{size} ({dtype}) on {name}: prompts of {prompt_len} tokens, {new_tokens} new tokens each; "
               f"max |logit difference| ours vs transformers {gap:.2e}")
    click.echo(f"{'batch':>6} {'ours s':>8} {'ours tok/s':>11} {'fresh tok/s':>12} {'hf s':>8} {'hf tok/s':>10} "
               f"{'ratio':>6} {'fresh':>6} {'slots':>6} {'floor ms':>9} {'10x needs':>9} {'ours at':>8}")
    for batch in batches:
        ids = torch.randint(0, min(shape["vocab_size"], 151_000), (batch, prompt_len), generator=generator)
        prompts = ids.tolist()
        settings = dict(max_new_tokens=new_tokens, temperature=1.0, seed=0, slots=batch)
        kept = Sampler(model, **settings)
        ours = _timed(lambda: kept(prompts), device, repeats)
        slots = kept._decoder.slots  # fewer than the batch where the GPU's memory holds fewer (fit_slots)
        del kept  # its cache
        fresh = _timed(lambda: sample(model, prompts, **settings), device, repeats)
        inputs = ids.to(device)

        def reference() -> None:
            with torch.no_grad():
                out = twin.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True, temperature=1.0,
                                    top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
            assert out.shape == (batch, prompt_len + new_tokens)

        try:
            theirs = _timed(reference, device, repeats)
        except torch.OutOfMemoryError:
            theirs = float("nan")  # generate's cache for the whole batch does not fit beside the weights
            torch.cuda.empty_cache()
        tokens = batch * new_tokens
        floor = floor_seconds(model, batch, prompt_len, new_tokens, spec_tflops, spec_tbps)
        click.echo(f"{batch:>6} {ours:>8.2f} {tokens / ours:>11.0f} {tokens / fresh:>12.0f} {theirs:>8.2f} "
                   f"{tokens / theirs:>10.0f} {theirs / ours:>5.1f}x {theirs / fresh:>5.1f}x {slots:>6} {floor * 1e3:>9.3g} "
                   f"{10 * floor / theirs:>9.0%} {floor / ours:>8.0%}")


if __name__ == "__main__":
    main()
