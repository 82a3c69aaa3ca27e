"""One training pass: a micro-batch packed into one row, its completion loss, its backward; run eagerly
or replayed from a CUDA graph.

Every student prompt opens with the same tokens (the chat template's default system prompt and the user
turn's header: 24 of a mean ~131 tokens with Qwen2.5's tokenizer, measured over 2,000 numbers prompts);
a pass stores that opening once per student (`Example.shared`, `attention.Shared`), so every GEMM, norm
and LoRA product runs on 15-19% fewer rows (6-60 examples a pass); only attention sees each sequence whole.

Why graphs: to queue one block's forward and backward the host needs ~4 ms (autograd, the Python of
the autograd Functions, ~70 launches), longer than the GPU needs for it at 0.5B-3B and for the small
passes that fit 32B's memory; a captured pass is queued in one launch. A graph fixes its shapes and
addresses, so (`Padding`) every pass is padded to one of a few shapes: its row to a multiple of
`tokens` with filler sequences nobody learns from, its sequence boundaries to a multiple of `seqs`
entries with zero-length sequences at the end, its completion rows to a multiple of `rows` with rows
whose target is ignored (zero loss, zero gradient), and attention's longest-sequence bound is the
run's longest example. The eager path takes the same padded micro-batch, so both run the same kernels.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Packed, Shared
from .fused import fused_kernels
from .model import Qwen2

LOGIT_CHUNK = 1024  # LM-head rows per chunk: bounds the float32 [rows, vocab] buffers (~0.6 GB each at 152k)
UNFUSED_LOGIT_BYTES = 4 * 4  # the unfused loss's float32 buffers a logit: widened, log-softmax, its gradient, the gather's
IGNORED = -100  # the target of a padding row: cross-entropy's ignore_index


@dataclass(frozen=True)
class Padding:
    """What a packed micro-batch is rounded up to (1: nothing), and attention's longest-sequence bound
    (None: the pass's own longest sequence)."""

    tokens: int = 1
    seqs: int = 1
    rows: int = 1
    longest: int | None = None


def graph_padding(longest: int) -> Padding:
    """The padding on CUDA: a few recurring shapes that a CUDA graph (or the GEMM and attention kernels'
    plans) can be reused for; ~1% more tokens and ~5% more LM-head rows than the pass has."""
    return Padding(tokens=64, seqs=8, rows=256, longest=longest)


@dataclass
class Example:
    """One training sequence: prompt + completion ids (truncated as TRL does) and where predicting starts."""

    ids: list[int]
    first: int  # first position whose token is a loss target (the first completion token, at least 1)
    shared: int = 0  # leading tokens every example of its student opens with (`opening`): a pass stores them once

    @property
    def targets(self) -> int:
        return max(0, len(self.ids) - self.first)


@dataclass
class MicroBatch:
    """One forward pass: each student's sequences back to back in its own segment of a packed row,
    the segments padded to one length (filler sequences nobody learns from) so that segment s of
    every layer's input is student s's (LoraLinear's cohort layout)."""

    ids: Tensor  # [1, S * L]
    layout: Packed | Shared
    select: Tensor  # [R] positions whose next token is a completion token, student by student (then padding)
    targets: Tensor  # [R] those next tokens (IGNORED on padding rows)
    student: Tensor  # [R] the student each selected position belongs to
    tokens: list[int]  # rows each student's sequences take (a shared opening once)

    @property
    def full(self) -> Packed:
        """The sequences as attention sees them (each whole)."""
        return self.layout.full if isinstance(self.layout, Shared) else self.layout

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """What a CUDA graph of this pass is specific to: tokens stored, tokens attention sees, sequence
        boundaries, completion rows."""
        tokens = self.ids.shape[1]
        seen = self.layout.expand.shape[0] if isinstance(self.layout, Shared) else tokens
        return tokens, seen, self.full.cu_seqlens.shape[0], self.select.shape[0]

    def _tensors(self) -> list[Tensor]:
        shared = [self.layout.expand, self.layout.keep] if isinstance(self.layout, Shared) else []
        return [self.ids, self.full.cu_seqlens, self.select, self.targets, self.student, *shared]

    def load(self, other: "MicroBatch") -> None:
        """Copy `other` (of the same shape) into this one's tensors (a graph's static inputs)."""
        for mine, theirs in zip(self._tensors(), other._tensors(), strict=True):
            mine.copy_(theirs)
        self.tokens = other.tokens

    def clone(self) -> "MicroBatch":
        full = Packed(self.full.cu_seqlens.clone(), self.full.max_seqlen)
        layout = Shared(full, self.layout.expand.clone(), self.layout.keep.clone()) \
            if isinstance(self.layout, Shared) else full
        return replace(self, ids=self.ids.clone(), layout=layout, select=self.select.clone(),
                       targets=self.targets.clone(), student=self.student.clone())


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list as a tensor on `device` without waiting for the GPU: a plain copy from pageable memory
    would first drain everything queued (through pinned memory it is queued like a kernel)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _fillers(gap: int, longest: int) -> list[int]:
    """Filler sequences for `gap` tokens of padding, none longer than the pass's longest real sequence."""
    return [min(longest, gap - start) for start in range(0, gap, longest)]


def opening(examples: Sequence[Example]) -> int:
    """How many leading tokens all of `examples` share, short of every one's first loss target (so that no
    shared row is a completion row)."""
    if not examples:
        return 0
    first = examples[0].ids
    n = min(min(len(e.ids), e.first - 1) for e in examples)
    for e in examples[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], e.ids[:n])) if a != b), n)
    return max(n, 0)


def _stored(group: Sequence[Example]) -> int:
    """Leading tokens a pass stores once for this group of one student's sequences (none for a lone one)."""
    return min(e.shared for e in group) if len(group) > 1 else 0


def _lengths(groups: Sequence[Sequence[Example]]) -> tuple[list[int], list[int]]:
    """(tokens each group's opening is stored with, rows each group's sequences take stored)."""
    openings = [_stored(g) for g in groups]
    return openings, [sum(len(s.ids) for s in g) - max(len(g) - 1, 0) * o for g, o in zip(groups, openings)]


def pass_shape(groups: Sequence[Sequence[Example]], padding: Padding) -> tuple[int, int, int, int]:
    """`pack(groups, ..., padding).shape`, from the lengths alone (the trainer lists a run's shapes ahead)."""
    longest = max((len(s.ids) for g in groups for s in g), default=1)
    openings, lengths = _lengths(groups)
    segment = _up(max(max(lengths), 1), padding.tokens)
    seqs = sum(len(g) + len(_fillers(segment - length, longest)) for g, length in zip(groups, lengths))
    tokens = len(groups) * segment
    copies = sum(max(len(g) - 1, 0) * o for g, o in zip(groups, openings))
    seen = _up(tokens + copies, padding.tokens) if copies else tokens
    seqs += len(_fillers(seen - tokens - copies, longest))
    rows = sum(s.targets for g in groups for s in g)
    return tokens, seen, _up(seqs, padding.seqs) + 1, _up(rows, padding.rows)


def token_passes(parts: Sequence[Sequence[Example]], capacity: int) -> list[list[list[Example]]]:
    """One step's examples per student (`parts`) cut into as few passes as hold at most `capacity` tokens per
    student (an example longer than that alone in its pass), not into fixed counts of examples: at 32B, 60
    examples of 110-180 tokens in passes of at most 704 take ~13.8 passes a step where 4 examples a pass take
    15. For k = 1, 2, ... passes, each student's examples are dealt (`_deal`) until every student's fit.
    Tokens are counted as a pass stores them: a student's shared opening once. Examples keep their order
    within a pass."""
    shared = [min((e.shared for e in part), default=0) for part in parts]
    lengths = [[len(e.ids) - o for e in part] for part, o in zip(parts, shared)]
    room = [max(capacity - o, 1) for o in shared]
    most = max(1, max(len(part) for part in parts))
    least = max(1, max(-(-sum(part) // r) for part, r in zip(lengths, room)))
    for k in range(min(least, most), most + 1):
        dealt = [_deal(part, k, r if k < most else None) for part, r in zip(lengths, room)]
        if all(d is not None for d in dealt):
            return [[[part[i] for i in sorted(d[j])] for part, d in zip(parts, dealt)] for j in range(k)]
    raise AssertionError("unreachable: a pass per example always fits")


def _deal(lengths: Sequence[int], k: int, capacity: int | None) -> list[list[int]] | None:
    """Indices of `lengths` in k bins of at most `capacity` tokens (None: any), or None where neither way fits:
    longest first each to the bin holding the fewest tokens (even bins), else longest first each to the first
    bin it fits in (tighter where the capacity is close to the mean)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = [[] for _ in range(k)]
    loads = [(0, j) for j in range(k)]
    for i in order:
        load, j = heapq.heappop(loads)
        bins[j].append(i)
        heapq.heappush(loads, (load + lengths[i], j))
    if capacity is None or max(loads)[0] <= capacity:
        return bins
    bins, room = [[] for _ in range(k)], [capacity] * k
    for i in order:
        j = next((j for j in range(k) if room[j] >= lengths[i]), None)
        if j is None:
            return None
        bins[j].append(i)
        room[j] -= lengths[i]
    return bins


def pack(groups: Sequence[Sequence[Example]], device: torch.device, padding: Padding = Padding()) -> MicroBatch:
    """Pack one group of sequences per student; segments are padded to a common length, rounded up to
    `padding.tokens`. Filler sequences are no longer than the longest real one and are never selected.
    Where a group's sequences share an opening (`Example.shared`), its segment holds it once, then each
    sequence's rest; attention's layout (`Shared.full`: `cu`, `expand`, `keep`) has every sequence whole,
    rounded up to `padding.tokens` with fillers too."""
    longest = max((len(s.ids) for g in groups for s in g), default=1)
    openings, lengths = _lengths(groups)
    segment = _up(max(max(lengths), 1), padding.tokens)
    ids: list[int] = []
    select: list[int] = []
    student: list[int] = []
    cu = [0]  # attention's sequences, each whole
    expand: list[int] = []  # the stored row of each of attention's rows
    keep: list[int] = []  # attention's row that each stored row takes its output from
    for index, (group, shared, length) in enumerate(zip(groups, openings, lengths)):
        base, head = len(ids), group[0].ids[:shared] if group else []
        if any(s.ids[:shared] != head for s in group):
            raise ValueError("the examples of a pass do not share the opening they declare (Example.shared)")
        ids.extend(head)
        keep.extend(range(cu[-1], cu[-1] + shared))  # the stored opening is its first sequence's
        for s in group:
            start, at = cu[-1], len(ids) - shared  # position j >= shared is stored at row at + j
            chosen = range(at + s.first - 1, at + len(s.ids) - 1)
            select.extend(chosen)
            student.extend([index] * len(chosen))
            ids.extend(s.ids[shared:])
            expand.extend([*range(base, base + shared), *range(at + shared, at + len(s.ids))])
            keep.extend(range(start + shared, start + len(s.ids)))
            cu.append(start + len(s.ids))
        for piece in _fillers(segment - length, longest):
            expand.extend(range(len(ids), len(ids) + piece))
            keep.extend(range(cu[-1], cu[-1] + piece))
            ids.extend([0] * piece)
            cu.append(cu[-1] + piece)
    copies = cu[-1] - len(ids)
    for piece in _fillers(_up(cu[-1], padding.tokens) - cu[-1] if copies else 0, longest):
        expand.extend([0] * piece)  # attention's own fillers: read any row, their outputs are not kept
        cu.append(cu[-1] + piece)
    targets = [ids[i + 1] for i in select]
    extra = _up(len(select), padding.rows) - len(select)
    select.extend([0] * extra)
    targets.extend([IGNORED] * extra)
    student.extend([0] * extra)
    cu.extend([cu[-1]] * (_up(len(cu) - 1, padding.seqs) + 1 - len(cu)))
    bound = max(padding.longest or longest, longest)
    layout = Packed(to_device(cu, torch.int32, device), bound)
    if copies:
        layout = Shared(layout, to_device(expand, torch.long, device), to_device(keep, torch.long, device))
    return MicroBatch(to_device(ids, torch.long, device)[None], layout, to_device(select, torch.long, device),
                      to_device(targets, torch.long, device), to_device(student, torch.long, device), lengths)


def fused_head(device: torch.device, dtype: torch.dtype):
    """The kernels whose cross-entropy overwrites the LM head's logits with their gradient, where the loss uses
    it (CUDA, bf16/fp16, kernels on); else None."""
    return fused_kernels() if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else None


def logit_bytes(device: torch.device, dtype: torch.dtype) -> int:
    """Bytes the LM head's loss holds a row and vocabulary entry of its chunk: the logits alone where the
    fused kernel overwrites them with their gradient, else `UNFUSED_LOGIT_BYTES`."""
    return dtype.itemsize if fused_head(device, dtype) is not None else UNFUSED_LOGIT_BYTES


class _HeadNLL(torch.autograd.Function):
    """Per-row -log p(target) / normaliser[row] through the (frozen) LM head `head`, chunk by chunk
    (rows whose target is IGNORED: 0).

    The gradient w.r.t. the hidden rows is computed in the forward pass, one chunk at a time, and
    kept ([rows, hidden], small); backward only scales it row by row (each row's loss depends on
    its own hidden row alone). Casts follow the reference: logits in the model dtype, softmax in
    float32 (or wider); on CUDA in bf16/fp16 one kernel computes both and writes the logits' gradient
    over them (kernels/cross_entropy.py).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, targets: Tensor, normaliser: Tensor, head: Callable, chunk: int) -> Tensor:
        wide = torch.promote_types(hidden.dtype, torch.float32)
        rows = torch.empty(hidden.shape[0], dtype=wide, device=hidden.device)
        grad = torch.empty_like(hidden)
        fused = fused_head(hidden.device, hidden.dtype)
        with torch.enable_grad():
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s: s + chunk].detach().requires_grad_()
                logits, part, norm = head(h), targets[s: s + chunk], normaliser[s: s + chunk].to(wide)
                if fused is not None:
                    rows[s: s + chunk] = fused.nll_grad_(logits.detach(), part, norm, IGNORED)
                    (grad[s: s + chunk],) = torch.autograd.grad(logits, h, logits.detach())
                else:
                    loss = F.cross_entropy(logits.to(wide), part, reduction="none", ignore_index=IGNORED) / norm
                    (grad[s: s + chunk],) = torch.autograd.grad(loss.sum(), h)
                    rows[s: s + chunk] = loss.detach()
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, upstream: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype)[:, None], None, None, None, None


def completion_loss(model: Qwen2, hidden: Tensor, targets: Tensor, normaliser: Tensor,
                    chunk: int = LOGIT_CHUNK) -> Tensor:
    """Per-row completion NLL of hidden rows [R, h] predicting `targets` [R], each divided by its
    row's `normaliser` [R] (its student's completion-token count for the step)."""
    return _HeadNLL.apply(hidden, targets, normaliser, model.logits, chunk)


def forward_backward(model: Qwen2, mb: MicroBatch, normalisers: Tensor, students: int,
                     chunk: int = LOGIT_CHUNK) -> Tensor:
    """Add one pass's adapter gradients to `.grad`; return its loss per student [S] (the loss summed over
    the pass's completion tokens, each divided by its student's `normalisers` entry)."""
    hidden = model.hidden(mb.ids, mb.layout)[0, mb.select]
    rows = completion_loss(model, hidden, mb.targets, normalisers[mb.student], chunk)
    per_student = torch.zeros(students, dtype=rows.dtype, device=rows.device).index_add_(0, mb.student, rows)
    per_student.sum().backward()
    return per_student.detach()


def graphs_wanted(device: torch.device) -> bool:
    """CUDA graphs for the passes: on CUDA unless SUBLIMINAL_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("SUBLIMINAL_GRAPHS", "1") != "0"


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: MicroBatch
    normalisers: Tensor
    loss: Tensor


class Passes:
    """A training run's passes (`forward_backward`): eager, or (CUDA, `shapes` given) replayed from CUDA
    graphs, one per shape.

    The first pass runs eagerly (lazy initialisation of cuBLAS, Triton and autograd must not happen
    during a capture); then every shape the run will take (`shapes`, `pass_shape`) is captured, the
    largest first, so that the graphs' shared memory pool is sized once and each smaller shape reuses
    it, and no capture interrupts the run later (a shape not foreseen is captured when it comes). A
    graph adds into the adapters' `.grad` at fixed addresses, so the trainer zeroes gradients instead
    of dropping them, and the adapters' cast copies keep their addresses (`adapters_cast_once(...,
    keep=...)`).
    """

    def __init__(self, model: Qwen2, students: int, chunk: int = LOGIT_CHUNK,
                 shapes: Sequence[tuple[int, int, int]] | None = None) -> None:
        self.model, self.students, self.chunk = model, students, chunk
        self.graphs = shapes is not None
        self.pending = sorted(set(shapes or ()), reverse=True)
        self.captured: dict[tuple[int, int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.warm = False

    def __call__(self, mb: MicroBatch, normalisers: Tensor) -> Tensor:
        if not self.graphs or not self.warm:
            self.warm = True
            return forward_backward(self.model, mb, normalisers, self.students, self.chunk)
        for shape in self.pending:
            self._capture(_synthetic(mb, shape), normalisers)
        self.pending = []
        entry = self.captured.get(mb.shape) or self._capture(mb, normalisers)
        entry.inputs.load(mb)
        entry.normalisers.copy_(normalisers)
        entry.graph.replay()
        return entry.loss.clone()

    def _capture(self, mb: MicroBatch, normalisers: Tensor) -> _Graph:
        """Record (not run) one pass of `mb`'s shape; its static inputs are loaded before each replay."""
        inputs, norms = mb.clone(), normalisers.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            loss = forward_backward(self.model, inputs, norms, self.students, self.chunk)
        self.captured[mb.shape] = entry = _Graph(graph, inputs, norms, loss)
        return entry


def _synthetic(like: MicroBatch, shape: tuple[int, int, int, int]) -> MicroBatch:
    """Static inputs of `shape` for a capture (one sequence, every row ignored): a real pass of that shape
    loads its own into them before each replay."""
    tokens, seen, seqs, rows = shape
    device = like.ids.device
    cu = torch.full((seqs,), seen, dtype=torch.int32, device=device)
    cu[0] = 0
    layout = Packed(cu, like.full.max_seqlen)
    if seen != tokens:
        layout = Shared(layout, torch.zeros(seen, dtype=torch.long, device=device),
                        torch.zeros(tokens, dtype=torch.long, device=device))
    zeros = torch.zeros(rows, dtype=torch.long, device=device)
    return MicroBatch(torch.zeros(1, tokens, dtype=torch.long, device=device), layout,
                      zeros, torch.full_like(zeros, IGNORED), zeros.clone(), [0] * len(like.tokens))
