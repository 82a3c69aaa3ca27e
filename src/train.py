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
Speed: a micro-batch is packed into one row (`Packed`, no padding) and the LM head runs only on the
positions that predict completion tokens, chunk by chunk, with each chunk's gradient formed on the
spot so no [tokens, vocab] tensor outlives its chunk.
Resumable: a checkpoint (adapter, optimizer, schedule, step, RNG) is written atomically every
`checkpoint_every` steps and at every epoch's end; the same call after a crash continues from it and
ends with a bitwise-identical adapter (on CPU). An existing adapter folder means the run is done.
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
import torch.nn.functional as F
from torch import Tensor

from . import distributed, paths
from .attention import Packed
from .checkpoint import load_model
from .constants import TRAIN, TrainConfig, check_animal, check_size, hub_id
from .data import read_pairs
from .errors import UserError
from .lora import apply_lora, is_adapter, lora_parameters, lora_state_dict, save_adapter
from .model import Qwen2
from .tokenizer import ChatTokenizer, load_tokenizer

TokenPair = tuple[list[int], list[int]]  # (prompt ids, completion ids)
LOG_FILE = "train.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
LOGIT_CHUNK = 2048  # LM-head rows per chunk: bounds the float32 [rows, vocab] buffers (~1.2 GB each at 152k)


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


@dataclass
class Example:
    """One training sequence: prompt + completion ids (truncated as TRL does) and where predicting starts."""

    ids: list[int]
    first: int  # first position whose token is a loss target (the first completion token, at least 1)

    @property
    def targets(self) -> int:
        return max(0, len(self.ids) - self.first)


def prepare(examples: Sequence[TokenPair], max_length: int) -> list[Example]:
    return [Example((p + c)[:max_length], max(1, len(p))) for p, c in examples]


@dataclass
class MicroBatch:
    ids: Tensor  # [1, N] the sequences back to back
    layout: Packed
    select: Tensor  # [S] positions whose next token is a completion token
    targets: Tensor  # [S] those next tokens
    tokens: int


def pack(seqs: list[Example], device: torch.device) -> MicroBatch:
    """Concatenate sequences into one packed row; list the positions that predict completion tokens."""
    ids: list[int] = []
    select: list[int] = []
    cu = [0]
    for s in seqs:
        start = cu[-1]
        select.extend(range(start + s.first - 1, start + len(s.ids) - 1))
        ids.extend(s.ids)
        cu.append(start + len(s.ids))
    row = torch.tensor(ids, device=device)
    sel = torch.tensor(select, dtype=torch.long, device=device)
    layout = Packed(torch.tensor(cu, dtype=torch.int32, device=device), max(len(s.ids) for s in seqs))
    return MicroBatch(row[None], layout, sel, row[sel + 1], len(ids))


class _HeadNLL(torch.autograd.Function):
    """sum(-log p(target)) / normaliser through the (frozen) LM head `head`, chunk by chunk.

    The gradient w.r.t. the hidden rows is computed in the forward pass, one chunk at a time, and
    kept ([rows, hidden], small); backward only scales it. Casts follow the reference: logits in
    the model dtype, softmax in float32 (or wider).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, targets: Tensor, normaliser: float, head: Callable, chunk: int) -> Tensor:
        wide = torch.promote_types(hidden.dtype, torch.float32)
        total = torch.zeros((), dtype=wide, device=hidden.device)
        grad = torch.empty_like(hidden)
        with torch.enable_grad():
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s: s + chunk].detach().requires_grad_()
                nll = F.cross_entropy(head(h).to(wide), targets[s: s + chunk], reduction="sum")
                (grad[s: s + chunk],) = torch.autograd.grad(nll / normaliser, h)
                total += nll.detach()
        ctx.save_for_backward(grad)
        return total / normaliser

    @staticmethod
    def backward(ctx, upstream: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None, None


def completion_loss(model: Qwen2, hidden: Tensor, targets: Tensor, normaliser: float, chunk: int = LOGIT_CHUNK) -> Tensor:
    """Summed completion NLL of hidden rows [S, h] predicting `targets` [S], divided by `normaliser`."""
    return _HeadNLL.apply(hidden, targets, float(normaliser), model.logits, chunk)


def auto_micro_batch(model: Qwen2, longest: int, batch: int) -> int:
    """Examples per forward pass: the whole batch on CPU; on GPU a rough fit of activations to free memory.

    The per-token estimate counts what autograd keeps per layer (float32 copies of LoRA inputs, q/k/v,
    attention and MLP intermediates) without activation checkpointing, one layer's worth with it.
    """
    if model.device.type != "cuda":
        return batch
    c = model.config
    layer = (44 * c.hidden_size + 14 * c.intermediate_size) * model.dtype.itemsize / 2
    per_token = layer + (2 * c.hidden_size * model.dtype.itemsize * c.num_hidden_layers if model.checkpointing
                         else layer * (c.num_hidden_layers - 1))
    free = torch.cuda.mem_get_info(model.device)[0] - 4 * LOGIT_CHUNK * c.vocab_size * 4
    return max(1, min(batch, int(0.7 * free / (per_token * longest))))


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


def train(model: Qwen2, examples: Sequence[TokenPair], adapter_dir: str | Path, work_dir: str | Path, *,
          seed: int = 0, config: TrainConfig = TRAIN, max_steps: int | None = None, micro_batch: int | None = None,
          checkpoint_every: int = 50, base_model_name_or_path: str = "",
          on_step: Callable[[dict], None] | None = None, logit_chunk: int = LOGIT_CHUNK) -> Path:
    """Train a LoRA student on tokenised (prompt, completion) pairs; write its adapter to `adapter_dir`.

    `work_dir` holds the per-step log (train.jsonl) and the checkpoint while training. `on_step`
    receives each step's log record (progress display; on the main rank only). Returns the adapter
    folder; if it already holds an adapter, nothing is done. Data-parallel when a process group exists.
    """
    adapter_dir, work_dir = Path(adapter_dir), Path(work_dir)
    if is_adapter(adapter_dir):
        return adapter_dir
    if not examples:
        raise UserError("no training pairs")
    seqs = prepare(examples, config.max_length)
    n, batch = len(seqs), config.batch_size
    steps_per_epoch = math.ceil(n / batch)
    total = max_steps if max_steps is not None else config.epochs * steps_per_epoch
    per_rank = math.ceil(batch / distributed.world())  # examples per process per step (all on one)
    micro = micro_batch or auto_micro_batch(model, max(len(s.ids) for s in seqs), per_rank)

    apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets, seed)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(config.warmup_steps, total))
    fingerprint = _fingerprint(seqs, seed, total, config, model)

    main = distributed.is_main()
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, log_path = work_dir / CHECKPOINT_FILE, work_dir / LOG_FILE
    start, elapsed = 0, 0.0
    if checkpoint.exists():
        start, elapsed = _load_checkpoint(checkpoint, fingerprint, model, optimizer, scheduler)
    if main:
        _restart_log(log_path, start)

    def save_checkpoint(done: int) -> None:
        state = {"fingerprint": fingerprint, "step": done, "elapsed": elapsed,
                 "lora": {k: v.cpu() for k, v in lora_state_dict(model).items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 # the model's GPU only: asking the others would open a CUDA context on each from every rank
                 "rng": {"cpu": torch.get_rng_state(),
                         "cuda": [torch.cuda.get_rng_state(model.device)] if model.device.type == "cuda" else []}}
        _write_atomically(checkpoint, lambda tmp: torch.save(state, tmp))

    device, order, order_epoch = model.device, [], -1
    with open(log_path if main else os.devnull, "a") as log:
        for step in range(start, total):
            began = time.perf_counter()
            epoch, k = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(n, seed, epoch), epoch
            chosen = [seqs[i] for i in order[k * batch: (k + 1) * batch]]
            normaliser = max(1, sum(s.targets for s in chosen))
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            tokens = 0
            mine = distributed.share(chosen)
            for m in range(0, len(mine), micro):
                mb = pack(mine[m: m + micro], device)
                hidden = model.hidden(mb.ids, mb.layout)[0, mb.select]
                loss = completion_loss(model, hidden, mb.targets, normaliser, logit_chunk)
                loss.backward()
                step_loss += loss.detach()
                tokens += mb.tokens
            step_loss, tokens = _sum_over_ranks(params, step_loss, tokens)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 4), "loss": step_loss.item(),
                      "lr": lr, "grad_norm": grad_norm.item(), "tokens": tokens}
            seconds = time.perf_counter() - began
            elapsed += seconds
            record |= {"tokens_per_s": round(tokens / seconds, 1), "elapsed": round(elapsed, 3)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            done = step + 1
            if main and done < total and (done % checkpoint_every == 0 or done % steps_per_epoch == 0):
                save_checkpoint(done)
            if main and on_step is not None:
                on_step(record | {"total_steps": total})
    if main:
        save_adapter(model, adapter_dir, base_model_name_or_path)
        checkpoint.unlink(missing_ok=True)
    distributed.barrier()  # the others return once the adapter exists
    return adapter_dir


def _sum_over_ranks(params: list[torch.nn.Parameter], step_loss: Tensor, tokens: int) -> tuple[Tensor, int]:
    """The whole batch's gradient, loss and token count from the ranks' parts (one rank: as they are)."""
    if distributed.world() == 1:
        return step_loss, tokens
    for p in params:
        if p.grad is None:  # this rank's part of the step was empty
            p.grad = torch.zeros_like(p)
    distributed.all_reduce_sum([p.grad for p in params])
    totals = torch.stack([step_loss, torch.tensor(float(tokens), dtype=step_loss.dtype, device=step_loss.device)])
    distributed.all_reduce_sum([totals])
    return totals[0], int(totals[1].item())


def _load_checkpoint(path: Path, fingerprint: dict, model: Qwen2, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, float]:
    """Restore adapter, optimizer, schedule and RNG; return (steps done, seconds spent)."""
    try:
        state = torch.load(path, map_location=model.device, weights_only=True)
    except Exception as exc:  # torch raises assorted errors for unreadable files
        raise UserError(f"unreadable checkpoint {path} ({str(exc).splitlines()[0]}); delete it to start over") from None
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise UserError(f"checkpoint {path} belongs to a run with other settings ({', '.join(changed)}); "
                        f"rerun with those settings or delete it")
    with torch.no_grad():
        for key, tensor in lora_state_dict(model).items():
            tensor.copy_(state["lora"][key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if state["rng"]["cuda"] and model.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"][0].cpu(), model.device)
    return state["step"], state["elapsed"]


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


def train_student(size: str, animal: str | None, seed: int = 0, *, data: str | Path | None = None,
                  pairs: int | None = None, out: str | Path | None = None, model_path: str | Path | None = None,
                  device: str = "cpu", dtype: torch.dtype = torch.bfloat16, config: TrainConfig = TRAIN,
                  max_steps: int | None = None, micro_batch: int | None = None, checkpoint_every: int = 50,
                  checkpointing: bool = False, on_step: Callable[[dict], None] | None = None) -> Path:
    """The `train` command: find data and output places in runs/ (or take them), load, train.

    Default data is the size's teacher dataset of `animal` (its first `config.pairs` pairs); `data`
    uses all pairs of that file unless `pairs` says otherwise. The adapter goes to runs/ (or `out`);
    the log and checkpoint go to the student folder (or `<out>-training/`). Every input problem is
    raised before anything is written.
    """
    size = check_size(size)
    if animal is not None:
        animal = check_animal(animal)
    elif data is None or out is None:
        raise UserError("--animal is needed to find the dataset and the adapter's folder in runs/ "
                        "(or give both --data and --out)")
    if data is None:
        data, pairs = paths.dataset_file(size, animal), pairs or config.pairs
    if out is None:
        out, work = paths.adapter_dir(size, animal, seed), paths.student_dir(size, animal, seed)
    else:
        out = Path(out)
        work = out.with_name(f"{out.name}-training")
    if is_adapter(out):
        return Path(out)
    texts = read_pairs(data, limit=pairs)
    source = model_path or size
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=dtype, device=device)
    model.checkpointing = checkpointing
    return train(model, tokenize_pairs(tokenizer, texts), out, work, seed=seed, config=config, max_steps=max_steps,
                 micro_batch=micro_batch, checkpoint_every=checkpoint_every, base_model_name_or_path=hub_id(size),
                 on_step=on_step)
