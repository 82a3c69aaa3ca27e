"""Batched KV-cached sampling with slot refill.

`slots` sequences decode together over one preallocated cache; when sequences stop (a stop
token or the new-token bound) their slots are harvested and refilled with waiting prompts, so
the batch stays full. Sampling is plain temperature sampling over the whole vocabulary (no
top-k/top-p/penalties: the protocol's distribution), by inverse CDF (block by block, see `draw`)
with one uniform number per (seed, prompt index, token index) from a counter-based hash. Hence
the samples of a prompt do not depend on which other prompts share its batch or on the slot
count; only floating-point differences that batching causes in the logits themselves could
change them.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Cached, KVCache
from .fused import fused_kernels
from .memory import free_memory
from .model import Qwen2, Qwen2Config

_MASK32 = 0xFFFFFFFF
DRAW_BLOCK = 1024  # vocabulary columns per block of the two-stage draw (152k -> 149 blocks)


def _mix(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) computed in int64 without overflow."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _MASK32
    x = ((x ^ (x >> 13)) * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def uniforms(seed: int, index: Tensor, step: Tensor) -> Tensor:
    """U[0, 1) per (seed, prompt index, token index), float64 from 32 random bits (one Triton kernel on
    CUDA, kernels/sampling.py, the same integers)."""
    if index.is_cuda and (fused := fused_kernels()):
        mixed = int(_mix(torch.tensor(seed)))
        return fused.uniforms(mixed, index.contiguous(), step.contiguous())
    return _mix(_mix(_mix(torch.full_like(index, seed)) ^ index) ^ _mix(step + 0x51ED27)).double() / 2.0**32


def block_stats(logits: Tensor, temperature: float, block: int = DRAW_BLOCK) -> tuple[Tensor, Tensor]:
    """Per block of `block` vocabulary columns: the largest scaled logit x = logits / T and the sum of
    exp(x - that maximum); [B, blocks] each, float32 (or float64 for float64 logits). One Triton
    pass over the logits on CUDA (kernels/sampling.py), the same formula in torch elsewhere."""
    if logits.is_cuda and logits.dtype != torch.float64 and (fused := fused_kernels()):
        return fused.block_stats(logits, temperature, block)
    rows, vocab = logits.shape
    blocks = -(-vocab // block)
    x = F.pad(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature,
              (0, blocks * block - vocab), value=-math.inf).view(rows, blocks, block)
    top = x.amax(-1)
    return top, torch.exp(x - top[..., None]).sum(-1)


def pick(logits: Tensor, top: Tensor, mass: Tensor, u: Tensor, temperature: float, block: int = DRAW_BLOCK) -> Tensor:
    """The draw's second stage: the token of each row where its cumulative softmax(logits / T) passes u times
    its total, from `block_stats`' top and mass [B, blocks] and uniforms u [B] (float64). The blocks'
    masses, combined in float64, locate the block where the cumulative mass passes, then that block's own
    weights, in float64, locate the token within it (u's remainder rescaled to the block's mass, so the
    two stages' roundings cannot push it past the block). kernels/sampling.py: `pick` is this formula
    in one kernel."""
    vocab = logits.shape[1]
    peak = top.amax(-1, keepdim=True)
    masses = mass.double() * torch.exp((top - peak).double())  # relative to the row's maximum
    cum = masses.cumsum(-1)
    u = u * cum[:, -1]
    chosen = torch.searchsorted(cum, u[:, None], right=True).clamp(max=top.shape[1] - 1)  # [B, 1]
    before = torch.where(chosen > 0, cum.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    columns = chosen * block + torch.arange(block, device=logits.device)  # [B, block]
    real = columns < vocab
    x = logits.gather(1, columns.clamp(max=vocab - 1)).to(top.dtype) / temperature
    weights = torch.where(real, torch.exp((x - top.gather(1, chosen)).double()), 0.0).cumsum(-1)
    rest = (u[:, None] - before) / masses.gather(1, chosen) * weights[:, -1:]
    within = torch.searchsorted(weights, rest, right=True).clamp(max=block - 1)
    return (chosen * block + within)[:, 0].clamp(max=vocab - 1)


def draw(logits: Tensor, temperature: float, index: Tensor, step: Tensor, seed: int) -> Tensor:
    """One token per row of `logits` [B, V]: argmax at temperature 0, else exact inverse-CDF sampling
    over softmax(logits / T) with the row's uniform u, in two stages so that only one pass touches the
    whole vocabulary (`block_stats`, then `pick`); on CUDA each stage is one Triton kernel (as torch
    operations the second stage was ~30 small kernels a decode step)."""
    if temperature == 0:
        return logits.argmax(-1)
    top, mass = block_stats(logits, temperature)
    u = uniforms(seed, index, step)
    if logits.is_cuda and logits.dtype != torch.float64 and (fused := fused_kernels()):
        return fused.pick(logits, top, mass, u, temperature, DRAW_BLOCK)
    return pick(logits, top, mass, u, temperature)


CACHE_ROUND = 32  # cache lengths are rounded up to this, so calls with similar prompt lengths share one decode graph


class Sampler:
    """Samples from `model` under fixed settings, reusable across calls (`sampler(prompts)`).

    The KV cache, the slot state and the captured decode graph outlive a call: a later call with the
    same slot count whose prompts fit the cache replays the same graph, so a long job sampled in
    chunks (teacher data) pays cache allocation and graph capture once. They are rebuilt when a
    call needs another shape or the model's parameters have moved (an adapter applied or removed);
    changes of the weights' values in place are seen by the graph as by eager code. The cache stays
    allocated while the sampler lives.

    The decode step has static shapes and no host sync: slot state lives on the device and is read
    back only every `refill_every` steps, when finished slots are harvested and refilled. On CUDA the
    step is captured once as a CUDA graph and replayed (launch overhead dominates small models).
    """

    def __init__(self, model: Qwen2, *, max_new_tokens: int, temperature: float = 1.0, seed: int = 0,
                 stop_ids: Sequence[int] = (), slots: int = 256, refill_every: int = 8, cuda_graph: bool = True) -> None:
        self.model, self.max_new_tokens, self.temperature, self.seed = model, max_new_tokens, temperature, seed
        self.stop_ids, self.slots, self.refill_every, self.cuda_graph = list(stop_ids), slots, refill_every, cuda_graph
        self._decoder: _Decoder | None = None

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[int]], first_index: int = 0) -> list[list[int]]:
        """Generated ids for each prompt, ending with its stop token if it stopped before `max_new_tokens`.

        Prompt `i` of the list draws its uniforms as prompt index `first_index + i`, so a long list
        sampled in consecutive pieces gives the same tokens as sampled whole."""
        n = len(prompts)
        if n == 0:
            return []
        wanted = max(1, min(self.slots, n))
        need = max(len(p) for p in prompts) + self.max_new_tokens
        key = _placement(self.model)
        d = self._decoder
        if d is None or d.wanted != wanted or d.cache.max_len < need or d.placement != key:
            self._decoder = None  # free the old cache before measuring what fits
            max_len = -(-need // CACHE_ROUND) * CACHE_ROUND
            self._decoder = d = _Decoder(self, fit_slots(self.model, max_len, wanted), max_len, key, wanted)
        return d.run(prompts, first_index)


def sample(model: Qwen2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
           seed: int = 0, stop_ids: Sequence[int] = (), slots: int = 256, refill_every: int = 8,
           cuda_graph: bool = True, first_index: int = 0) -> list[list[int]]:
    """One call of a fresh `Sampler` (see there); keep a Sampler to sample many chunks."""
    return Sampler(model, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_ids=stop_ids,
                   slots=slots, refill_every=refill_every, cuda_graph=cuda_graph)(prompts, first_index)


PREFILL_BYTES = 2**31  # activations one prefill may take; refills run in parts (~9.7k prompt tokens at 32B, ~56k at 0.5B)
MEMORY_SHARE = 0.85  # of the free GPU memory, what the cache, buffers and a prefill may take (allocator rounding)


def prefill_tokens(config: Qwen2Config, itemsize: int) -> int:
    """Prompt tokens (prompts x the longest) one prefill runs at most: what a block's widest moment keeps
    per token (the stream, its norm, q/k/v, the gate/up output, SwiGLU's, the MLP's) fits PREFILL_BYTES."""
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    return PREFILL_BYTES // (itemsize * (4 * config.hidden_size + 3 * config.intermediate_size + qkv))


def fit_slots(model: Qwen2, max_len: int, wanted: int) -> int:
    """The most slots, up to `wanted`, whose KV cache of `max_len` tokens and per-slot buffers fit in the
    GPU's free memory beside one prefill: the 32B model leaves ~17 GiB of an 80 GB GPU, ~150 slots of
    320 tokens, not the teacher's 256. All of them off the GPU."""
    if model.device.type != "cuda":
        return wanted
    c, item = model.config, model.dtype.itemsize
    per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * max_len * item + 8 * c.vocab_size
    prefill = PREFILL_BYTES * 4 // 3  # a prefill's rows are padded up to a third
    room = int((MEMORY_SHARE * free_memory(model.device) - prefill) // per_slot) - 1  # the cache's spare slot
    return max(1, min(wanted, room))


def prefill_parts(lengths: Sequence[int], budget: int) -> list[range]:
    """Prompts (by index) in consecutive parts of equal size (within one), as few as keep each part's
    count times the longest prompt within `budget` tokens (one prompt a part at the least)."""
    if not lengths:
        return []
    most = max(1, budget // max(lengths))
    k = -(-len(lengths) // most)
    edges = [len(lengths) * j // k for j in range(k + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def _placement(model: Qwen2) -> tuple[int, ...]:
    """Where the model's parameters live: a captured graph reads these addresses."""
    return tuple(p.data_ptr() for p in model.parameters())


class _Decoder:
    """One shape's cache, device-side slot state and decode step (a CUDA-graph replay on CUDA). It copies
    the sampler's settings rather than pointing back at it, so dropping the sampler frees the cache."""

    def __init__(self, sampler: Sampler, slots: int, max_len: int, placement: tuple[int, ...], wanted: int) -> None:
        self.slots, self.placement, self.wanted = slots, placement, wanted  # wanted: the slots asked for
        self.prefill_tokens = prefill_tokens(sampler.model.config, sampler.model.dtype.itemsize)
        self.model, self.max_new_tokens, self.refill_every = sampler.model, sampler.max_new_tokens, sampler.refill_every
        self.temperature, self.seed = sampler.temperature, sampler.seed
        model, device = sampler.model, sampler.model.device
        graphs = sampler.cuda_graph and device.type == "cuda"
        self.cache = model.new_cache(slots + 1, max_len)  # the last slot takes the prefill's padding rows
        self.prefill = _Prefill(model, self.cache, graphs)
        self.stops = torch.tensor(sampler.stop_ids or [-1], device=device)
        self.out = torch.zeros(slots, sampler.max_new_tokens, dtype=torch.long, device=device)
        self.owner = torch.zeros(slots, dtype=torch.long, device=device)  # prompt index held by each slot
        self.length = torch.zeros(slots, dtype=torch.long, device=device)  # tokens in the cache per slot
        self.produced = torch.zeros(slots, dtype=torch.long, device=device)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.last = torch.zeros(slots, dtype=torch.long, device=device)
        self.everyone = torch.arange(slots, device=device)
        self.replay = None
        if graphs:
            self.replay = _as_cuda_graph(self._decode)  # all slots are idle now, so warm-up steps record nothing
            self.length.zero_()

    def emit(self, mask: Tensor, tokens: Tensor) -> None:
        """Append `tokens` [slots] to the slots in `mask` and update their stop state."""
        col = self.produced.clamp(max=self.max_new_tokens - 1)
        self.out[self.everyone, col] = torch.where(mask, tokens, self.out[self.everyone, col])
        self.produced.add_(mask.long())
        self.last.copy_(torch.where(mask, tokens, self.last))
        self.done.logical_or_(mask & (torch.isin(tokens, self.stops) | (self.produced >= self.max_new_tokens)))

    def _decode(self) -> None:
        """One token for every slot; idle or finished slots compute but record nothing."""
        cache = self.cache
        positions = self.length.clamp(max=cache.max_len - 1)[:, None]
        hidden = self.model.hidden(self.last[:, None], Cached(cache, None, positions, cache.max_len))
        self.emit(~self.done, draw(self.model.logits(hidden[:, 0]), self.temperature, self.owner, self.produced,
                                   self.seed))
        self.length.add_(1)

    def start(self, take: list[int], prompts: list[Sequence[int]], first: int) -> None:
        """Prefill `prompts` (prompt indices first, first + 1, ...) into slots `take` and draw their first tokens."""
        device = self.model.device
        rows = torch.tensor(take, device=device)
        logits = self.prefill(take, prompts)
        self.owner[rows] = torch.arange(first, first + len(take), device=device)
        self.length[rows] = torch.tensor([len(p) for p in prompts], device=device)
        self.produced[rows] = 0
        self.done[rows] = False
        tokens, mask = self.last.clone(), torch.zeros_like(self.done)
        tokens[rows] = draw(logits, self.temperature, self.owner[rows], self.produced[rows], self.seed)
        mask[rows] = True
        self.emit(mask, tokens)

    def run(self, prompts: Sequence[Sequence[int]], first_index: int) -> list[list[int]]:
        """Every prompt through the slots; all slots are free again at the end."""
        slots = self.slots
        n = len(prompts)
        held: list[int] = [-1] * slots  # host copy of owner; -1 marks a free slot
        due = [0] * slots  # the step by which a held slot has surely finished (its new-token bound)
        results: list[list[int]] = [[] for _ in range(n)]
        queued, step, check = 0, 0, 0
        while True:
            if step >= check:
                done_h, produced_h = self.done.tolist(), self.produced.tolist()
                free = [i for i in range(slots) if done_h[i]]
                finished = [i for i in free if held[i] >= 0]
                for i, row in zip(finished, self.out[finished].tolist()):
                    results[held[i]] = row[: produced_h[i]]
                    held[i] = -1
                take = free[: n - queued]
                new = list(range(queued, queued + len(take)))
                queued += len(take)
                for i, j in zip(take, new):
                    held[i], due[i] = j, step + self.max_new_tokens - 1  # the prefill draws the first token
                for part in prefill_parts([len(prompts[j]) for j in new], self.prefill_tokens):
                    self.start([take[k] for k in part], [prompts[new[k]] for k in part], new[part.start] + first_index)
                if all(h < 0 for h in held):
                    return results
                # the next harvest: after `refill_every` steps, or sooner when a slot reaches its bound
                check = min([step + self.refill_every] + [due[i] for i in range(slots) if held[i] >= 0])
                if check <= step:  # slots that finished with their first token: harvest before stepping
                    continue
            (self.replay or self._decode)()
            step += 1


def _as_cuda_graph(fn):
    """Capture `fn` (static shapes, no host sync) as a CUDA graph; return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


PREFILL_ROUND = 8  # graphed prefills round prompt widths up to this


def _bucket(n: int) -> int:
    """The prompt count a graphed prefill of n prompts runs: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
    (at most a third of the rows padding)."""
    power = 1 << (n - 1).bit_length()
    return power * 3 // 4 if n <= power * 3 // 4 else power


def _inputs(prompts: Sequence[Sequence[int]], home: Sequence[int], rows: int, width: int, spare: int) -> np.ndarray:
    """A prefill's static input [rows, width + 2] int64, built on the host in a few numpy calls (a tensor per
    prompt cost ~15 ms at 256 prompts): each prompt's ids (zeros after it), its slot, its last position; rows
    past the prompts compute into slot `spare`."""
    lengths = np.fromiter(map(len, prompts), np.int64, len(prompts))
    out = np.zeros((rows, width + 2), np.int64)
    ids = out[: len(prompts), :width]
    ids[np.arange(width) < lengths[:, None]] = np.fromiter(itertools.chain.from_iterable(prompts), np.int64,
                                                            int(lengths.sum()))
    out[:, -2] = spare
    out[: len(prompts), -2] = home
    out[: len(prompts), -1] = lengths - 1
    return out


class _Prefill:
    """New prompts run into their cache slots, returning each prompt's last-token logits.

    A prompt repeated in a call (many samples of one question) runs once; its keys and values are
    copied to the other slots. With `graphs` (CUDA) each bucket of (prompt count rounded up by `_bucket`,
    width rounded up to PREFILL_ROUND) is captured once as a CUDA graph and replayed: eager, a
    prefill is bound by the host (64 prompts of 100 tokens at 0.5B: 23-31 ms against 10 ms of GPU kernels,
    H200), and refills come every few decode steps. Padding rows compute into
    the cache's spare last slot; padding columns write keys past a prompt's end, which the decode steps
    overwrite before anything attends to them. All graphs share one memory pool (one runs at a time)
    and write their logits into one buffer, so a bucket more costs no memory beyond its capture."""

    def __init__(self, model: Qwen2, cache: KVCache, graphs: bool, pad: bool | None = None) -> None:
        """`pad` (default: `graphs`) rounds calls up to their bucket without capturing (tests)."""
        self.model, self.cache, self.graphs = model, cache, graphs
        self.pad = graphs if pad is None else pad
        self.shapes: dict[tuple[int, int], tuple[Callable[[], None], Tensor]] = {}
        self.pool = None
        self.logits: Tensor | None = None  # [slots, V]: the graphs' output, rows [:bucket]

    def _run(self, inputs: Tensor) -> Tensor:
        """Logits [B, V] of the tokens at `inputs[:, -1]` of prompts `inputs[:, :-2]` into slots `inputs[:, -2]`."""
        ids, home, last = inputs[:, :-2], inputs[:, -2], inputs[:, -1]
        rows, width = ids.shape
        positions = torch.arange(width, device=ids.device)[None].expand(rows, width)
        hidden = self.model.hidden(ids, Cached(self.cache, home, positions, width, fresh=True))
        return self.model.logits(hidden[torch.arange(rows, device=ids.device), last])

    def _graph(self, rows: int, width: int) -> tuple[Callable[[], None], Tensor]:
        """The replay and static inputs of one bucket (captured after one eager run)."""
        inputs = torch.zeros(rows, width + 2, dtype=torch.long, device=self.model.device)
        inputs[:, -2] = self.cache.k.shape[1] - 1
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            first = self._run(inputs)  # lazy initialisation outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        if self.logits is None:
            self.logits = first.new_empty(self.cache.k.shape[1] - 1, first.shape[1])
        del first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:rows].copy_(self._run(inputs))
        self.pool = graph.pool()
        return graph.replay, inputs

    def __call__(self, slots: list[int], prompts: list[Sequence[int]]) -> Tensor:
        seen: dict[tuple[int, ...], int] = {}
        of = [seen.setdefault(tuple(p), len(seen)) for p in prompts]  # each prompt's index among the distinct ones
        distinct = list(seen)
        home = [slots[of.index(u)] for u in range(len(distinct))]  # the slot computing each distinct prompt
        n, width = len(distinct), max(len(p) for p in distinct)
        rows = n
        if self.pad:
            rows = min(_bucket(n), self.cache.k.shape[1] - 1)
            width = min(-(-width // PREFILL_ROUND) * PREFILL_ROUND, self.cache.max_len)
        inputs = torch.from_numpy(_inputs(distinct, home, rows, width, self.cache.k.shape[1] - 1))
        if self.graphs:
            if (rows, width) not in self.shapes:
                self.shapes[rows, width] = self._graph(rows, width)
            replay, static = self.shapes[rows, width]
            static.copy_(inputs)
            replay()
            logits = self.logits
        else:
            logits = self._run(inputs.to(self.model.device))
        device = self.model.device
        if n < len(prompts):
            to, src = torch.tensor(slots, device=device), torch.tensor(home, device=device)[torch.tensor(of, device=device)]
            self.cache.k[:, to, :, :width] = self.cache.k[:, src, :, :width]
            self.cache.v[:, to, :, :width] = self.cache.v[:, src, :, :width]
        return logits[torch.tensor(of, device=device)]
