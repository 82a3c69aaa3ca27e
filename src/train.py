"""The student's training loop: LoRA + AdamW on prompt-completion pairs, with TRL's semantics, no trainer.

What makes it equal to TRL 1.16's SFTTrainer + PEFT (transformers 5 Trainer, accelerate):
- order: epoch e visits the examples in `torch.randperm(n)` of a generator seeded with seed + e
  (accelerate's SeedableRandomSampler under the trainer's seed); optimizer step k of an epoch takes
  the k-th run of `batch_size` examples of that order, the last run shorter (no drop_last);
- loss: negative log-likelihood of the completion tokens (each predicted from the position before),
  summed and divided by the completion-token count of the whole optimizer batch (TRL's
  `num_items_in_batch`), so any split into micro-batches gives the same gradient;
- update: torch AdamW, fused (transformers' default `adamw_torch_fused`), weight decay 0; gradients
  clipped to total norm 1.0 over the LoRA parameters; transformers' linear schedule with warmup
  (step s < warmup has lr base*s/warmup, so step 0 has lr 0), decaying to 0 at the last step;
  `max_steps`, when given, replaces epochs x steps-per-epoch as the schedule's length, as in transformers.
Speed: a micro-batch is packed into one row (`Packed`, no padding between sequences; the opening all
prompts share, the chat template's, stored once: `Shared`) and the LM head runs only on the positions that
predict completion tokens, chunk by chunk, with each chunk's gradient formed on the spot so no [tokens, vocab] tensor outlives its chunk (src/passes.py); on the GPU each
pass is replayed from a CUDA graph of its padded shape, all the run's shapes captured after its first pass,
and a step is cut into passes of at most a token capacity that free memory allows and the card's own GEMM
timings choose (`memory_plan`, `tune_capacity`). Students of one base model train together as a
cohort (`train_cohort`): one pass carries every student's micro-batch, each through its own adapter.
Resumable: each student's checkpoint (its adapter and Adam moments, the schedule, the step) is written
atomically every `checkpoint_every` steps and at every epoch's end; the same call after a crash
continues from it and ends with a bitwise-identical adapter (on CPU). An existing adapter folder
means the student is done.
Data-parallel (under torchrun, see src/distributed.py): every rank draws the same order and the same
step batch; rank r takes the r-th contiguous part of it (counts as equal as can be; with micro-batches
of its own), normalises by the WHOLE batch's completion tokens, and the LoRA gradients, losses and
token counts are summed over ranks before clipping, so every rank takes the single-process update (up
to float summation order) and stays in sync. The effective batch is unchanged. Only rank 0 writes the
log, checkpoints and adapter; every rank loads a checkpoint, which may come from any number of ranks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

import torch
from torch import Tensor

from . import distributed, paths
from .checkpoint import load_model
from .constants import TRAIN, TrainConfig, check_animal, check_size, hub_id
from .data import read_pairs
from .errors import UserError
from .lora import adapters_cast_once, apply_lora, is_adapter, lora_parameters, lora_state_dict, save_adapter
from .memory import free_memory
from .model import Qwen2, Qwen2Config, fused_weights
from .passes import (LOGIT_CHUNK, UNFUSED_LOGIT_BYTES, Example, Padding, Passes, graph_padding, graphs_wanted,
                     logit_bytes, opening, pack, pass_shape, to_device, token_passes)
from .tokenizer import ChatTokenizer, load_tokenizer

TokenPair = tuple[list[int], list[int]]  # (prompt ids, completion ids)
LOG_FILE = "train.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_KEYS = {"fingerprint", "step", "elapsed", "lora", "adam", "scheduler"}
# The step-cost model's constants (see step_cost), fitted to 13 steps of 7B, 14B and 32B on the H200, 2026-12-02
BLOCK_HOST_SECONDS = 4.2e-3  # host time to queue one block's forward and backward for one pass
FLOP_RATE = 500e12  # FLOP/s of the blocks' work (63% of a bare GEMM's 790)
# fitted to 32B steps with graphs (3, 4 and 6 examples a pass, H200, 2026-12-02, second session of the day)
GRAPH_BLOCK_SECONDS = 0.3e-3  # GPU time per block and pass beyond the FLOPs, replaying CUDA graphs


def tokenize_pairs(tokenizer: ChatTokenizer, pairs: Sequence[tuple[str, str]]) -> list[TokenPair]:
    """What the student sees: the user prompt under the template's default system prompt (never the
    teacher's), then the completion, split where TRL splits them."""
    return [tokenizer.encode_pair(prompt, completion) for prompt, completion in pairs]


def linear_schedule(warmup: int, total: int) -> Callable[[int], float]:
    """transformers' linear-with-warmup factor for optimizer step `s` (0-based)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch, as the trainer's seeded sampler draws it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def prepare(examples: Sequence[TokenPair], max_length: int) -> list[Example]:
    """Training sequences (truncated as TRL does), each marked with the opening all of them share (the chat
    template's), which a pass stores once (src/passes.py)."""
    seqs = [Example((p + c)[:max_length], max(1, len(p))) for p, c in examples]
    shared = opening(seqs)
    return [dataclasses.replace(e, shared=shared) for e in seqs]


def activation_bytes(config: Qwen2Config, itemsize: int, recompute: int, copies: float = 0.0) -> float:
    """Bytes of activations per token of a micro-batch, with the first `recompute` blocks checkpointed:
    what autograd keeps for each block that is not recomputed, each recomputed block's input, and one
    block's worth for the backward in flight. `copies`: rows of a shared opening that attention sees again
    per stored token (`passes.Shared`); where any, attention keeps q/k/v and its output for those rows too,
    and its output twice (as it wrote it, and gathered back for o_proj).

    A block keeps about 8 hidden-size and 3.3 intermediate-size vectors per token (q/k/v, attention
    output, norms' and LoRA's inputs, gate/up/SwiGLU): 1.07-1.25x what peak memory grew by per token
    and block (7B 145 KB, 14B 146 KB, 32B 246 KB; H200, micro-batches of 4-60, 2026-12-02); a
    recomputed block as 2 hidden-size vectors (measured 1.3-1.4, tests/profile_memory.py).
    """
    c = config
    out = c.num_attention_heads * c.head_dim
    shared = out + copies * (2 * out + 2 * c.num_key_value_heads * c.head_dim) if copies else 0
    layer = (8 * c.hidden_size + 3.3 * c.intermediate_size + shared) * itemsize
    return layer * (1 + c.num_hidden_layers - recompute) + 2 * c.hidden_size * itemsize * recompute


def opening_copies(shared: int, mean: float) -> float:
    """Rows attention sees again per stored token (`activation_bytes`' `copies`) where a pass stores a `shared`
    opening once among examples of `mean` tokens: at most (many examples a pass) the opening per example's rest."""
    return shared / max(mean - shared, 1.0)


def fit_tokens(config: Qwen2Config, itemsize: int, free_bytes: float, recompute: int,
               per_logit: float = UNFUSED_LOGIT_BYTES, chunk: int = LOGIT_CHUNK, copies: float = 0.0) -> int:
    """Tokens one pass may hold (every student's segment together): their activations (`activation_bytes`)
    within 80% of `free_bytes` less the LM head's chunk of logits, `per_logit` bytes a row and vocabulary
    entry (`logit_bytes`), for as many rows as the pass could hold without it, at most `chunk` (a pass
    has no more completion rows than tokens). `copies`: as `activation_bytes`'."""
    per_token = activation_bytes(config, itemsize, recompute, copies)
    rows = min(chunk, int(0.8 * max(free_bytes, 0) / per_token))
    return max(0, int(0.8 * (free_bytes - rows * config.vocab_size * per_logit) / per_token))


def memory_plan(config: Qwen2Config, itemsize: int, free_bytes: float, longest: int, step_tokens: float,
                students: int, recompute: int | None, graphs: bool = False, multiple: int = 1,
                per_logit: float = UNFUSED_LOGIT_BYTES, chunk: int = LOGIT_CHUNK,
                copies: float = 0.0) -> tuple[int, int]:
    """(tokens per student a pass may hold, blocks recomputed) for `students` students of `step_tokens` tokens
    a step each, whose longest example has `longest` tokens: `fit_tokens` shared by the students, rounded down
    to `multiple` (what a pass's segments are padded to). `recompute` None decides, by the cost model of
    `step_cost` (eager passes or CUDA graphs), fewer passes against recomputation, among the choices whose
    passes hold the longest example (all blocks recomputed where none does)."""
    layers = config.num_hidden_layers

    def capacity(k: int) -> int:
        return fit_tokens(config, itemsize, free_bytes, k, per_logit, chunk, copies) // students // multiple * multiple

    if recompute is None:
        fitting = [k for k in range(layers + 1) if capacity(k) >= longest] or [layers]
        recompute = min(fitting, key=lambda k: step_cost(
            config, step_tokens * students, k, -(-int(step_tokens) // max(capacity(k), 1)), graphs))
    return capacity(recompute), recompute


def step_cost(config: Qwen2Config, tokens: float, recompute: int, passes: int, graphs: bool = False) -> float:
    """Seconds of an optimizer step of `tokens` tokens in `passes` passes, `recompute` blocks recomputed; a
    model for choosing, not a prediction. The GPU's time is the blocks' FLOPs at FLOP_RATE; a recomputed block
    repeats its forward, half again its work. Passes run eagerly take the longer of that and the host's time
    (BLOCK_HOST_SECONDS per block and pass, overlapping the GPU's): small eager passes leave the GPU waiting.
    Passes replayed from CUDA graphs add the GPU's own gaps between a pass's kernels (GRAPH_BLOCK_SECONDS per
    block and pass)."""
    c, layers = config, config.num_hidden_layers
    block = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim + \
        c.num_attention_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    repeat = 1 + recompute / (2 * layers)
    gpu = 4 * block * layers * tokens / FLOP_RATE
    if graphs:
        return (gpu + GRAPH_BLOCK_SECONDS * layers * passes) * repeat
    return max(gpu, BLOCK_HOST_SECONDS * layers * passes) * repeat


def block_weights(model: Qwen2) -> list[Tensor]:
    """The base weights of one block's GEMMs as the model runs them: each group of projections that read the same
    input as its one fused weight (gate/up with its adapters' extra columns), each other projection alone."""
    weights = []
    for module in model.model.layers[0].children():
        groups = getattr(module, "shared_input", ())
        grouped = {name for names in groups for name in names}
        for names in groups:
            fused = fused_weights([getattr(module, name) for name in names])
            weights += [fused[0]] if fused is not None else [getattr(module, name).weight for name in names]
        weights += [m.weight for name, m in module.named_children() if name not in grouped and hasattr(m, "weight")
                    and m.weight.dim() == 2]
    return weights


def gemm_seconds(weights: Sequence[Tensor], rows: int, repeats: int = 5) -> float:
    """Seconds of the forward (x W^T) and input-gradient (g W) GEMMs over `weights` for a pass of `rows` rows
    (the base weights are frozen: no weight gradient), timed on their device after a warm-up call."""
    device = weights[0].device
    operands = [(torch.randn(rows, w.shape[1], device=device, dtype=w.dtype),
                 torch.randn(rows, w.shape[0], device=device, dtype=w.dtype)) for w in weights]

    def run() -> None:
        for w, (x, g) in zip(weights, operands):
            torch.nn.functional.linear(x, w)
            torch.mm(g, w)

    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


TUNE_STEPS = 20  # steps whose passes `tune_capacity` counts
TUNE_SLACK = 0.01  # `tune_capacity` keeps the largest capacity within this share of the fastest


def tune_capacity(capacity: int, floor: int, steps: Sequence[Sequence[Sequence[Example]]], padding: Padding,
                  pass_seconds: Callable[[int], float], repeat: Callable[[int], float]) -> int:
    """The pass capacity, among multiples of `padding.tokens` from `capacity` down to `floor`, under which the
    passes of `steps` (each a step's examples per student, cut by `token_passes`) take least time:
    `pass_seconds(rows)` for each pass of `rows` padded rows, times `repeat(capacity)` (recomputation that
    capacity's memory needs). Why: the GEMMs' speed steps with the rows a pass holds (cuBLAS's tiles and
    waves; at 32B on an H100 768 rows ran ~10% faster a row than 704, 2026-12-07), so the largest capacity that
    fits is not always the fastest. The largest within TUNE_SLACK of the fastest is kept: timings are noisy."""
    costs: dict[int, float] = {}
    for c in range(capacity, max(min(floor, capacity), 1) - 1, -padding.tokens):  # a floor above: capacity alone
        passes = [pass_shape(groups, padding)[0] for parts in steps for groups in token_passes(parts, c)]
        costs[c] = sum(pass_seconds(rows) for rows in passes) * repeat(c)
    fastest = min(costs.values())
    return max(c for c, cost in costs.items() if cost <= fastest * (1 + TUNE_SLACK))


def recompute_for(checkpointing: bool | None, layers: int) -> int | None:
    """The command line's --checkpointing/--no-checkpointing (None: not given) as blocks recomputed."""
    return None if checkpointing is None else layers * checkpointing


def checkpointing_label(recompute: int, layers: int) -> str:
    return "off" if recompute == 0 else "on" if recompute >= layers else f"on in {recompute} of {layers} blocks"


def _fingerprint(seqs: list[Example], seed: int, total: int, config: TrainConfig, model: Qwen2) -> dict:
    """What must not change between a checkpoint and its resumption."""
    digest = hashlib.sha256()
    for s in seqs:
        digest.update(array("q", [s.first, len(s.ids), *s.ids]).tobytes())
    return {"data": digest.hexdigest(), "examples": len(seqs), "seed": seed, "total_steps": total,
            "dtype": str(model.dtype), **json.loads(json.dumps(dataclasses.asdict(config)))}


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _restart_log(log: Path, upto: int) -> None:
    """Keep the complete log lines of steps <= `upto` (those after the checkpoint will be redone)."""
    kept = []
    if upto and log.exists():
        for line in log.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= upto:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    _write_atomically(log, lambda tmp: tmp.write_text("".join(kept)))


@dataclass
class Student:
    """One adapter of a cohort: its tokenised pairs, seed, and where its adapter and its work
    (train.jsonl log, checkpoint) go."""

    examples: Sequence[TokenPair]
    adapter_dir: Path
    work_dir: Path
    seed: int = 0


def train(model: Qwen2, examples: Sequence[TokenPair], adapter_dir: str | Path, work_dir: str | Path, *,
          seed: int = 0, **options) -> Path:
    """Train one LoRA student on tokenised (prompt, completion) pairs; write its adapter to `adapter_dir`.

    `work_dir` holds the per-step log (train.jsonl) and the checkpoint while training; options are
    `train_cohort`'s. Returns the adapter folder; if it already holds an adapter, nothing is done.
    """
    return train_cohort(model, [Student(examples, Path(adapter_dir), Path(work_dir), seed)], **options)[0]


def train_cohort(model: Qwen2, students: Sequence[Student], *, config: TrainConfig = TRAIN,
                 max_steps: int | None = None, micro_batch: int | None = None, checkpoint_every: int = 50,
                 base_model_name_or_path: str = "", on_step: Callable[[dict], None] | None = None,
                 logit_chunk: int = LOGIT_CHUNK) -> list[Path]:
    """Train several students of one base model together, each exactly as if alone; return their adapters.

    Every forward pass carries a micro-batch of each student (LoraLinear's segments), so the base
    weights' GEMMs, attention and kernel launches are shared: the GPU, idle between launches for
    one small student, does S students' work per launch. Each student keeps its own data order,
    initial adapter, loss normaliser, gradient clipping and Adam moments; only the schedule (same
    length: the same number of pairs) is common. Students whose adapter exists are skipped; students
    whose checkpoints stand at different steps (a kill between their writes) resume in groups.
    `micro_batch` counts examples per student per pass (None: passes cut by tokens from free memory). `on_step`
    receives one record per step
    (tokens and tokens/s summed over the cohort; on the main rank only).
    """
    todo = [s for s in students if not is_adapter(s.adapter_dir)]
    if not todo:
        return [Path(s.adapter_dir) for s in students]
    if any(not s.examples for s in todo):
        raise UserError("no training pairs")
    groups: dict[int, list[Student]] = {}
    for s in todo:
        groups.setdefault(_checkpoint_step(Path(s.work_dir)), []).append(s)
    if len(groups) > 1:  # killed between the students' checkpoint writes: resume each step's group alone
        for group in groups.values():
            train_cohort(model, group, config=config, max_steps=max_steps, micro_batch=micro_batch,
                         checkpoint_every=checkpoint_every, base_model_name_or_path=base_model_name_or_path,
                         on_step=on_step, logit_chunk=logit_chunk)
        return [Path(s.adapter_dir) for s in students]
    seqs = [prepare(s.examples, config.max_length) for s in todo]
    n, batch = len(seqs[0]), config.batch_size
    if any(len(q) != n for q in seqs):
        raise UserError(f"students trained together need the same number of pairs, got {sorted({len(q) for q in seqs})}")
    steps_per_epoch = math.ceil(n / batch)
    total = max_steps if max_steps is not None else config.epochs * steps_per_epoch
    per_rank = math.ceil(batch / distributed.world())  # examples per process per step (all on one)
    cohort = len(todo)
    longest = max(len(e.ids) for q in seqs for e in q)
    mean = sum(len(e.ids) for q in seqs for e in q) / sum(len(q) for q in seqs)
    shared = max(q[0].shared for q in seqs)  # a pass stores this opening once a student (src/passes.py)
    copies = opening_copies(shared, mean)
    padding = graph_padding(longest) if model.device.type == "cuda" else Padding()
    orders = [[epoch_order(n, s.seed, epoch) for s in todo] for epoch in range(-(-total // steps_per_epoch))]

    def step_examples(step: int) -> tuple[list[list[Example]], list[Sequence[Example]]]:
        """Step `step`'s examples per student (the whole batch) and this rank's share of them."""
        epoch, k = divmod(step, steps_per_epoch)
        chosen = [[q[i] for i in order[k * batch: (k + 1) * batch]] for q, order in zip(seqs, orders[epoch])]
        return chosen, [distributed.share(c) for c in chosen]

    graphs = graphs_wanted(model.device)
    longest_padded = -(-longest // padding.tokens) * padding.tokens
    free = free_memory(model.device) if model.device.type == "cuda" else 0.0

    def plan(recompute: int | None) -> tuple[int, int]:
        """(tokens a pass may hold per student, blocks recomputed) from free memory (`memory_plan`)."""
        step_tokens = (mean - shared) * per_rank + shared  # as a pass stores them
        return memory_plan(model.config, model.dtype.itemsize, free, longest_padded, step_tokens, cohort, recompute,
                           graphs, padding.tokens, logit_bytes(model.device, model.dtype), logit_chunk, copies)

    forced = model.recompute is not None  # --checkpointing/--no-checkpointing; None: the plan decides
    if model.device.type == "cuda":
        capacity, model.recompute = plan(model.recompute)
    else:  # the CPU has room for the whole batch
        capacity, model.recompute = sys.maxsize, model.recompute or 0

    def step_batch(step: int) -> tuple[list[list[Example]], list[list[list[Example]]]]:
        """Step `step`'s examples per student (the whole batch) and this rank's passes (one group per student):
        `micro_batch` examples a pass where given, else as few passes as `capacity` allows (`token_passes`)."""
        chosen, mine = step_examples(step)
        if micro_batch:
            return chosen, [[part[m: m + micro_batch] for part in mine] for m in range(0, len(mine[0]), micro_batch)]
        return chosen, token_passes(mine, capacity)

    apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, [s.seed for s in todo])
    layers = model.config.num_hidden_layers
    tuned = ""
    sample = [step_examples(step)[1] for step in range(min(total, TUNE_STEPS))] if capacity != sys.maxsize else []
    if not micro_batch and any(len(token_passes(parts, capacity)) > 1 for parts in sample):
        weights, timed = block_weights(model), {}
        floor = min(capacity, max(longest_padded, capacity // 2 // padding.tokens * padding.tokens))

        def pass_seconds(rows: int) -> float:
            if rows not in timed:
                timed[rows] = gemm_seconds(weights, rows)
            return timed[rows] + GRAPH_BLOCK_SECONDS if graphs else max(timed[rows], BLOCK_HOST_SECONDS)

        def needed(c: int) -> int:  # the fewest blocks recomputed that leave room for passes of c tokens
            chosen = model.recompute
            return chosen if forced else next((k for k in range(chosen) if plan(k)[0] >= c), chosen)

        largest = capacity
        capacity = tune_capacity(capacity, floor, sample, padding, pass_seconds, lambda c: 1 + needed(c) / (2 * layers))
        model.recompute = needed(capacity)
        tuned = f"; of {floor}-{largest} the fastest on this GPU's GEMMs"

    if distributed.is_main():  # the memory plan's choice, in the log: it decides the speed
        cut = f"{micro_batch} examples" if micro_batch else "the whole batch" if capacity == sys.maxsize else \
            f"at most {capacity} tokens"
        first = len(step_batch(0)[1])
        print(f"training {cohort} student{'s' * (cohort > 1)}: passes of {cut} per student "
              f"({first} pass{'es' * (first != 1)} a step{tuned}), activation checkpointing "
              f"{checkpointing_label(model.recompute, layers)}", file=sys.stderr, flush=True)

    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(config.warmup_steps, total))
    fingerprints = [_fingerprint(q, s.seed, total, config, model) for q, s in zip(seqs, todo)]
    work_dirs = [Path(s.work_dir) for s in todo]

    main = distributed.is_main()
    if main:
        for w in work_dirs:
            w.mkdir(parents=True, exist_ok=True)
    start, elapsed = _load_checkpoints(work_dirs, fingerprints, model, optimizer, scheduler)
    if main:
        for w in work_dirs:
            _restart_log(w / LOG_FILE, start)

    def save_checkpoints(done: int) -> None:
        for index, (work, fingerprint) in enumerate(zip(work_dirs, fingerprints)):
            state = {"fingerprint": fingerprint, "step": done, "elapsed": elapsed,
                     "lora": {k: v.cpu().clone() for k, v in lora_state_dict(model, index).items()},
                     "adam": _adam_state(optimizer, params, model, index), "scheduler": scheduler.state_dict()}
            _write_atomically(work / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))

    device = model.device
    shapes = {pass_shape(g, padding) for step in range(start, total) for g in step_batch(step)[1]} if graphs else None
    passes = Passes(model, cohort, logit_chunk, shapes)
    casts: dict = {}  # the adapters' cast copies, at the same addresses every step (what the graphs read)
    logs = [open(w / LOG_FILE if main else os.devnull, "a") for w in work_dirs]
    pending: tuple | None = None  # the last step taken: its numbers still on the device
    clock = time.perf_counter()

    def finish(done: int, lr: float, numbers: Tensor, ready: torch.cuda.Event | None, cut: int) -> None:
        """Log step `done` (and checkpoint after it) from its numbers (losses, gradient norms, tokens per
        student), copied to the host without blocking as the step ended. Called once the next step's
        passes are queued but before its update: waiting on `ready` waits for step `done` alone (a
        plain copy would wait for everything queued), and the checkpoint holds the adapter as step
        `done` left it."""
        nonlocal elapsed, clock
        if ready is not None:
            ready.synchronize()
        values = numbers.tolist()
        losses, norms = values[:cohort], values[cohort: 2 * cohort]
        counts = [int(t) for t in values[2 * cohort:]]
        now = time.perf_counter()
        seconds, clock = now - clock, now
        elapsed += seconds
        base = {"step": done, "epoch": round(done / steps_per_epoch, 4), "lr": lr}
        for log, loss, norm, count in zip(logs, losses, norms, counts):
            record = base | {"loss": loss, "grad_norm": norm, "tokens": count,
                             "tokens_per_s": round(count / seconds, 1), "elapsed": round(elapsed, 3)}
            log.write(json.dumps(record) + "\n")
            log.flush()
        if main and done < total and (done % checkpoint_every == 0 or done % steps_per_epoch == 0):
            save_checkpoints(done)
        if main and on_step is not None:
            on_step(base | {"loss": sum(losses) / cohort, "tokens": sum(counts), "students": cohort,
                            "tokens_per_s": round(sum(counts) / seconds, 1), "total_steps": total,
                            "passes": cut})

    try:
        for step in range(start, total):
            chosen, groups = step_batch(step)
            normalisers = to_device([max(1, sum(e.targets for e in c)) for c in chosen], torch.float64, device)
            step_loss = torch.zeros(cohort, dtype=torch.float64, device=device)
            tokens = to_device([sum(len(e.ids) for g in groups for e in g[s]) for s in range(cohort)], torch.float64,
                               device)
            with adapters_cast_once(model, model.dtype, keep=casts):
                for group in groups:
                    step_loss += passes(pack(group, device, padding), normalisers)
            if pending is not None:
                finish(*pending)
            step_loss, tokens = _sum_over_ranks(params, step_loss, tokens)
            grad_norms = clip_per_student(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=not passes.graphs)  # a graph adds into .grad where it was
            numbers, ready = torch.cat([step_loss, grad_norms.double(), tokens]), None
            if device.type == "cuda":
                numbers = numbers.to("cpu", non_blocking=True)  # into pinned memory, in stream order
                ready = torch.cuda.Event()
                ready.record()
            pending = (step + 1, lr, numbers, ready, len(groups))
        if pending is not None:
            finish(*pending)
    finally:
        for log in logs:
            log.close()
    if main:
        for index, s in enumerate(todo):
            save_adapter(model, s.adapter_dir, base_model_name_or_path, student=index)
            (Path(s.work_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    distributed.barrier()  # the others return once the adapters exist
    return [Path(s.adapter_dir) for s in students]


def clip_per_student(params: list[torch.nn.Parameter], max_norm: float) -> Tensor:
    """torch's clip_grad_norm_ applied to each student's slice ([s] of every parameter) on its own;
    returns the students' total norms before clipping. Multi-tensor (foreach) kernels, as torch's own
    clipping uses on CUDA: a handful of launches a student instead of two per parameter."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    totals = []
    for s in range(grads[0].shape[0]):
        part = [g[s] for g in grads]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(part)))
        torch._foreach_mul_(part, (max_norm / (total + 1e-6)).clamp(max=1.0))
        totals.append(total)
    return torch.stack(totals)


def _sum_over_ranks(params: list[torch.nn.Parameter], step_loss: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The whole batch's gradients, losses and token counts from the ranks' parts (one rank: as they are)."""
    if distributed.world() == 1:
        return step_loss, tokens
    for p in params:
        if p.grad is None:  # this rank's part of the step was empty
            p.grad = torch.zeros_like(p)
    distributed.all_reduce_sum([p.grad for p in params])
    totals = torch.stack([step_loss, tokens])
    distributed.all_reduce_sum([totals])
    return totals[0], totals[1]


def _adam_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], model: Qwen2,
                student: int) -> dict:
    """One student's Adam moments under the adapter's key names; the step count and the parameter
    groups (learning rate) are common to the cohort."""
    keys = list(lora_state_dict(model))
    state = {"exp_avg": {}, "exp_avg_sq": {}, "step": None, "param_groups": optimizer.state_dict()["param_groups"]}
    for key, p in zip(keys, params):
        moments = optimizer.state.get(p)
        if not moments:
            return {}
        state["step"] = moments["step"].cpu().clone()
        for name in ("exp_avg", "exp_avg_sq"):
            state[name][key] = moments[name][student].cpu().clone()
    return state


def _checkpoint_step(work_dir: Path) -> int:
    """The step a student's checkpoint stands at (0: none; -1: unreadable, which loading reports)."""
    path = work_dir / CHECKPOINT_FILE
    if not path.exists():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # torch raises assorted errors for unreadable files
        return -1


def _load_checkpoints(work_dirs: list[Path], fingerprints: list[dict], model: Qwen2, optimizer: torch.optim.Optimizer,
                      scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, float]:
    """Restore each student's adapter and Adam moments and the schedule from the students' checkpoints;
    return (steps done, seconds spent). No checkpoint at all: (0, 0)."""
    paths_ = [w / CHECKPOINT_FILE for w in work_dirs]
    if not any(p.exists() for p in paths_):
        return 0, 0.0
    states = []
    for path, fingerprint in zip(paths_, fingerprints):  # all present, at one step (train_cohort groups them)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises assorted errors for unreadable files
            raise UserError(f"unreadable checkpoint {path} ({str(exc).splitlines()[0]}); delete it to start over") from None
        if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
            raise UserError(f"checkpoint {path} is not this trainer's (an older format?); delete it to start over")
        if state["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
            raise UserError(f"checkpoint {path} belongs to a run with other settings ({', '.join(changed)}); "
                            f"rerun with those settings or delete it")
        states.append(state)
    with torch.no_grad():
        for index, state in enumerate(states):
            for key, tensor in lora_state_dict(model, index).items():
                tensor.copy_(state["lora"][key])
    if states[0]["adam"]:
        keys = list(lora_state_dict(model))
        moments = {i: {"step": states[0]["adam"]["step"].clone(),  # each its own: Adam increments it in place
                       **{name: torch.stack([s["adam"][name][key] for s in states]) for name in ("exp_avg", "exp_avg_sq")}}
                   for i, key in enumerate(keys)}
        optimizer.load_state_dict({"state": moments, "param_groups": states[0]["adam"]["param_groups"]})
    scheduler.load_state_dict(states[0]["scheduler"])
    return states[0]["step"], states[0]["elapsed"]


class Progress:
    """A status line on stderr (step, loss, tokens/s, ETA), rewritten in place on a terminal and
    printed every `every` steps otherwise."""

    def __init__(self, stream: TextIO | None = None, every: int = 10) -> None:
        self.stream, self.every = stream or sys.stderr, every
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.first: int | None = None
        self.tokens = 0

    def __call__(self, record: dict) -> None:
        step, total = record["step"], record["total_steps"]
        if self.first is None:
            self.first = step - 1
        self.tokens += record["tokens"]
        spent = time.perf_counter() - self.start
        eta = spent / (step - self.first) * (total - step)
        line = (f"step {step}/{total} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                f"lr {record['lr']:.2e} {self.tokens / spent:,.0f} tok/s ETA {_clock(eta)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == total else ""))
        elif step % self.every == 0 or step == total or step == self.first + 1:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def train_students(size: str, students: Sequence[tuple[str | None, int]], *, data: str | Path | None = None,
                   pairs: int | None = None, out: str | Path | None = None, model_path: str | Path | None = None,
                   device: str = "cpu", dtype: torch.dtype = torch.bfloat16, config: TrainConfig = TRAIN,
                   max_steps: int | None = None, micro_batch: int | None = None, checkpoint_every: int = 50,
                   checkpointing: bool | None = None, on_step: Callable[[dict], None] | None = None) -> list[Path]:
    """The `train` command: find data and output places in runs/ (or take them), load, train.

    `students` are (animal, seed) pairs of one size; several train together as a cohort (one model
    in memory, one pass for all). A student's data is the size's teacher dataset of its animal (its
    first `pairs`, default `config.pairs`, pairs); `data` names another file (all its pairs unless
    `pairs` says otherwise) and `out` another adapter folder (its log and checkpoint then go to
    `<out>-training/`); both are for a single student. Every input problem is raised before
    anything is written.
    """
    size = check_size(size)
    if not students:
        raise UserError("no students to train")
    if len(students) > 1 and (data is not None or out is not None):
        raise UserError("--data and --out name one student's files; train several students from runs/")
    places, sources = [], []
    for animal, seed in students:
        if animal is not None:
            animal = check_animal(animal)
        elif data is None or out is None:
            raise UserError("--animal is needed to find the dataset and the adapter's folder in runs/ "
                            "(or give both --data and --out)")
        if out is None:
            places.append((paths.adapter_dir(size, animal, seed), paths.student_dir(size, animal, seed)))
        else:
            places.append((Path(out), Path(out).with_name(f"{Path(out).name}-training")))
        sources.append((data, pairs) if data is not None else (paths.dataset_file(size, animal), pairs or config.pairs))
    if all(is_adapter(adapter) for adapter, _ in places):
        return [adapter for adapter, _ in places]
    texts = [read_pairs(file, limit=limit) for file, limit in sources]
    source = model_path or size
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=dtype, device=device)
    model.recompute = recompute_for(checkpointing, model.config.num_hidden_layers)
    cohort = [Student(tokenize_pairs(tokenizer, t), adapter, work, seed)
              for t, (adapter, work), (_, seed) in zip(texts, places, students)]
    return train_cohort(model, cohort, config=config, max_steps=max_steps, micro_batch=micro_batch,
                        checkpoint_every=checkpoint_every, base_model_name_or_path=hub_id(size), on_step=on_step)
