"""Training throughput, ours against TRL SFTTrainer + PEFT, side by side in one run.

    python -m tests.bench_training --sizes 0.5b,7b --steps 12          # on a GPU
    python -m tests.bench_training --sizes tiny --steps 4 --device cpu  # smoke check

Random-initialised models of the exact Qwen2.5 shapes (throughput does not depend on weight
values), synthetic pairs shaped like the numbers task (prompt 80-120 + completion 30-60 tokens,
completion-only loss; every prompt opening with the same `--opening` tokens, as the chat template's
default system prompt and user header open every real student prompt: 24 tokens with Qwen2.5's
tokenizer), effective batch 60, the protocol's LoRA and optimizer. Tokens/s counts
real (unpadded) tokens per optimizer step over the step time after warm-up (ours: synchronised wall
time over steps 4..N, see run_ours; TRL: its median step after 2); MFU uses
4*N FLOPs per token (N = parameters in the blocks) plus 4*V*h per completion token for the LM
head, against the GPU's measured dense bf16 peak (`--peak-tflops`, 790 on an H100 SXM).
It lives in tests/ because its reference side imports transformers, peft and trl, which src/ never
does.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass

import click
import numpy as np
import torch

from src.constants import SHAPES, TRAIN
from src.memory import cap_memory
from src.model import Qwen2Config

OPENING = 24  # tokens the chat template opens every student prompt with (Qwen2.5's tokenizer, src/passes.py)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
            max_position_embeddings=4096)


def shape(size: str) -> dict:
    return TINY if size == "tiny" else SHAPES[size]


def synthetic_pairs(vocab: int, count: int, seed: int = 0, opening: int = 0) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) with the numbers task's lengths, every prompt's first `opening` tokens the
    same."""
    rng = np.random.default_rng(seed)
    top = min(vocab, 151_000)
    head = rng.integers(0, top, opening).tolist()
    return [(head + rng.integers(0, top, rng.integers(80, 121) - opening).tolist(),
             rng.integers(0, top, rng.integers(30, 61)).tolist()) for _ in range(count)]


@dataclass
class Result:
    impl: str
    size: str
    micro: int
    accum: int
    checkpointing: str  # blocks recomputed: "off", "on", "on in k of L blocks"
    step_s: float
    tokens_per_s: float
    mfu: float
    peak_gib: float


def useful_flops(cfg: dict, tokens: int, completion_tokens: int) -> float:
    c = Qwen2Config.from_dict(cfg)
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    block = layers * (h * (q + 2 * kv) + q * h + 3 * h * i)
    return 4.0 * block * tokens + 4.0 * c.vocab_size * h * completion_tokens


def summarise(impl: str, size: str, micro: int, accum: int, ckpt: str, step_times: list[float],
              batch: list[tuple[list[int], list[int]]], peak_tflops: float, device: str, students: int = 1) -> Result:
    step = statistics.median(step_times)
    tokens = students * sum(len(p) + len(c) for p, c in batch)
    completion = students * sum(len(c) for _, c in batch)
    flops = useful_flops(shape(size), tokens, completion)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return Result(impl, size, micro, accum, ckpt, step, tokens / step, flops / step / (peak_tflops * 1e12), peak)


def placeholder_tokenizer():
    """A stand-in tokenizer for TRL: the data is pre-tokenised, TRL only needs pad/eos ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocab), pad_token="<pad>", eos_token="<pad>")


def run_reference(size: str, pairs, steps: int, micro: int, accum: int, ckpt: bool, device: str,
                  peak_tflops: float) -> Result:
    """TRL SFTTrainer + PEFT LoRA on transformers' Qwen2 (sdpa, bf16), pre-tokenised data."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(HFConfig(**shape(size)), dtype=dtype, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=TRAIN.lora_rank, lora_alpha=TRAIN.lora_alpha, lora_dropout=0.0,
                                             target_modules=list(TRAIN.lora_targets), task_type="CAUSAL_LM"))
    data = Dataset.from_dict({"input_ids": [p + c for p, c in pairs],
                              "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in pairs]})
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    args = SFTConfig(output_dir="/tmp/bench_trl", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                     learning_rate=TRAIN.lr, max_steps=steps, warmup_steps=TRAIN.warmup_steps, lr_scheduler_type="linear",
                     bf16=dtype == torch.bfloat16, logging_steps=1000, save_strategy="no", report_to=[],
                     gradient_checkpointing=ckpt, completion_only_loss=True, max_length=None,
                     use_cpu=not device.startswith("cuda"), dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, callbacks=[Clock()],
                         processing_class=placeholder_tokenizer())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    batch = pairs[: micro * accum]
    result = summarise("trl+peft", size, micro, accum, "on" if ckpt else "off", times[2:] or times, batch,
                       peak_tflops, device)
    del trainer, model
    return result


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_ours(size: str, pairs, steps: int, micro: int | None, ckpt: bool | None, device: str, peak_tflops: float,
             cohort: int = 1) -> Result:
    """Our trainer (packed micro-batches, completion-only LM head) on a random model of the shape;
    `cohort` students (seeds 0..n-1, the same pairs) trained together, tokens counted over all;
    `micro` and `ckpt` None: the memory plan chooses, as in training."""
    import tempfile
    from pathlib import Path

    from src.checkpoint import random_model
    from src.train import Student, checkpointing_label, recompute_for, train_cohort

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = random_model(Qwen2Config.from_dict(shape(size)), dtype=dtype, device=device)
    model.recompute = recompute_for(ckpt, model.config.num_hidden_layers)
    records: list[dict] = []
    marks: list[float] = []

    def on_step(record: dict) -> None:
        records.append(record)
        if record["step"] in (2, steps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        students = [Student(pairs, Path(tmp) / f"adapter{i}", Path(tmp) / f"work{i}", i) for i in range(cohort)]
        train_cohort(model, students, max_steps=steps, micro_batch=micro, checkpoint_every=10**9, on_step=on_step)
    # The trainer reports step k once step k+1's passes are queued, so its own per-step times can shift
    # work between neighbouring steps (after a slow warm-up step, a short window can even read faster
    # than the GPU can run). Timed here instead: from the report of step 2, synchronised (step 3's
    # passes done), to the report of the last step, synchronised: steps 4..N whole plus step 3's update.
    times = [(marks[1] - marks[0]) / (steps - 3)]
    batch = pairs[:TRAIN.batch_size]
    passes = records[-1]["passes"]  # where the plan cuts passes by tokens: examples a pass on average
    name = "ours" if cohort == 1 else f"ours x{cohort}"
    result = summarise(name, size, micro or round(TRAIN.batch_size / passes), passes,
                       checkpointing_label(model.recompute, model.config.num_hidden_layers), times,
                       batch, peak_tflops, device, students=cohort)
    del model
    return result


REFERENCE_SETUP = {"0.5b": (60, 1, False), "1.5b": (60, 1, False), "3b": (60, 1, False), "7b": (20, 3, False),
                   "14b": (20, 3, True), "32b": (10, 6, True), "tiny": (20, 3, False)}  # anchors.md


@click.command()
@click.option("--sizes", default="0.5b", help="Comma-separated sizes (or 'tiny').")
@click.option("--steps", default=12, show_default=True, type=click.IntRange(min=4),
              help="Optimizer steps per run (ours: the first 3 are warm-up; TRL: the first 2).")
@click.option("--micro", "micros", type=int, multiple=True,
              help="Our micro-batch, repeatable to compare several in one run; 0 or none given: the memory plan's.")
@click.option("--checkpointing/--no-checkpointing", default=None,
              help="Ours: activation checkpointing in every block or none (default: the memory plan decides).")
@click.option("--memory-gib", default=None, type=float,
              help="Cap this process's GPU memory (e.g. 80 on a larger GPU, for the real runs' H100 80 GB).")
@click.option("--reference/--no-reference", default=True, help="Also run TRL+PEFT.")
@click.option("--cohort", "cohorts", default="1", show_default=True,
              help="Comma-separated cohort sizes for ours: students trained together (tokens/s summed over them).")
@click.option("--opening", default=OPENING, show_default=True, type=click.IntRange(0, 80),
              help="Leading prompt tokens every pair shares (the chat template's; 0: prompts wholly random).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu")
@click.option("--peak-tflops", default=790.0, show_default=True)
@click.option("--json-out", default=None, type=click.Path(dir_okay=False))
def main(sizes: str, steps: int, micros: tuple[int, ...], checkpointing: bool | None, memory_gib: float | None,
         reference: bool, cohorts: str, opening: int, device: str, peak_tflops: float, json_out: str | None) -> None:
    if memory_gib is not None:
        cap_memory(memory_gib, torch.device("cuda"))
    rows: list[Result] = []
    for size in sizes.split(","):
        pairs = synthetic_pairs(shape(size)["vocab_size"], TRAIN.batch_size * steps, opening=opening)
        ref_micro, ref_accum, ref_ckpt = REFERENCE_SETUP[size]
        runs = [(int(c), m or None) for c in cohorts.split(",") for m in micros or (0,)]
        for impl, micro in runs + ([("trl+peft", None)] if reference else []):
            try:
                if impl != "trl+peft":
                    rows.append(run_ours(size, pairs, steps, micro, checkpointing, device, peak_tflops, cohort=impl))
                else:
                    rows.append(run_reference(size, pairs, steps, ref_micro, ref_accum, ref_ckpt, device, peak_tflops))
            except torch.OutOfMemoryError:
                click.echo(f"{size} {impl}: out of memory", err=True)
            release(device)
            click.echo(rows[-1] if rows else "", err=True)
    click.echo(f"{'size':>5} {'impl':>9} {'micro x accum':>13} {'ckpt':>18} {'step s':>7} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'ours/ref':>8}")
    for r in rows:
        ref = next((x for x in rows if x.size == r.size and x.impl == "trl+peft"), None)
        ratio = f"{r.tokens_per_s / ref.tokens_per_s:.2f}x" if ref and r.impl.startswith("ours") else ""
        click.echo(f"{r.size:>5} {r.impl:>9} {f'{r.micro}x{r.accum}':>13} {r.checkpointing:>18} {r.step_s:7.3f} "
                   f"{r.tokens_per_s:10.0f} {r.mfu:6.1%} {r.peak_gib:8.1f} {ratio:>8}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
