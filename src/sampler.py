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

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import Cached, KVCache
from .model import Qwen2, fused_kernels

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
    """U[0, 1) per (seed, prompt index, token index), float64 from 32 random bits."""
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


def draw(logits: Tensor, temperature: float, index: Tensor, step: Tensor, seed: int) -> Tensor:
    """One token per row of `logits` [B, V]: argmax at temperature 0, else exact inverse-CDF sampling
    over softmax(logits / T) with the row's uniform u.

    In two stages, so that only one pass touches the whole vocabulary: the blocks' masses (from
    `block_stats`, combined in float64) locate the block where the cumulative mass passes u, then
    that block's own weights, in float64, locate the token within it (u's remainder rescaled to the
    block's mass, so the two stages' roundings cannot push it past the block)."""
    if temperature == 0:
        return logits.argmax(-1)
    vocab, block = logits.shape[1], DRAW_BLOCK
    top, mass = block_stats(logits, temperature, block)
    peak = top.amax(-1, keepdim=True)
    masses = mass.double() * torch.exp((top - peak).double())  # relative to the row's maximum
    cum = masses.cumsum(-1)
    u = uniforms(seed, index, step) * cum[:, -1]
    chosen = torch.searchsorted(cum, u[:, None], right=True).clamp(max=top.shape[1] - 1)  # [B, 1]
    before = torch.where(chosen > 0, cum.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    columns = chosen * block + torch.arange(block, device=logits.device)  # [B, block]
    real = columns < vocab
    x = logits.gather(1, columns.clamp(max=vocab - 1)).to(top.dtype) / temperature
    weights = torch.where(real, torch.exp((x - top.gather(1, chosen)).double()), 0.0).cumsum(-1)
    rest = (u[:, None] - before) / masses.gather(1, chosen) * weights[:, -1:]
    within = torch.searchsorted(weights, rest, right=True).clamp(max=block - 1)
    return (chosen * block + within)[:, 0].clamp(max=vocab - 1)


@torch.no_grad()
def sample(model: Qwen2, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
           seed: int = 0, stop_ids: Sequence[int] = (), slots: int = 256, refill_every: int = 8,
           cuda_graph: bool = True, first_index: int = 0) -> list[list[int]]:
    """Generated ids for each prompt, ending with its stop token if it stopped before `max_new_tokens`.

    Prompt `i` of the list draws its uniforms as prompt index `first_index + i`, so a long list
    sampled in consecutive pieces gives the same tokens as sampled whole.

    The decode step has static shapes and no host sync: slot state lives on the device and is read
    back only every `refill_every` steps, when finished slots are harvested and refilled. On CUDA the
    step is captured once as a CUDA graph and replayed (launch overhead dominates small models).
    """
    n, device = len(prompts), model.device
    if n == 0:
        return []
    slots = max(1, min(slots, n))
    cache = model.new_cache(slots, max(len(p) for p in prompts) + max_new_tokens)
    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    out = torch.zeros(slots, max_new_tokens, dtype=torch.long, device=device)
    owner = torch.zeros(slots, dtype=torch.long, device=device)  # prompt index held by each slot
    length = torch.zeros(slots, dtype=torch.long, device=device)  # tokens in the cache per slot
    produced = torch.zeros(slots, dtype=torch.long, device=device)
    done = torch.ones(slots, dtype=torch.bool, device=device)
    last = torch.zeros(slots, dtype=torch.long, device=device)
    everyone = torch.arange(slots, device=device)
    held: list[int] = [-1] * slots  # host copy of owner; -1 marks a free slot
    results: list[list[int]] = [[] for _ in range(n)]
    queued, step = 0, 0

    def emit(mask: Tensor, tokens: Tensor) -> None:
        """Append `tokens` [slots] to the slots in `mask` and update their stop state."""
        col = produced.clamp(max=max_new_tokens - 1)
        out[everyone, col] = torch.where(mask, tokens, out[everyone, col])
        produced.add_(mask.long())
        last.copy_(torch.where(mask, tokens, last))
        done.logical_or_(mask & (torch.isin(tokens, stops) | (produced >= max_new_tokens)))

    def decode() -> None:
        """One token for every slot; idle or finished slots compute but record nothing."""
        positions = length.clamp(max=cache.max_len - 1)[:, None]
        hidden = model.hidden(last[:, None], Cached(cache, None, positions, cache.max_len))
        emit(~done, draw(model.logits(hidden[:, 0]), temperature, owner, produced, seed))
        length.add_(1)

    if cuda_graph and device.type == "cuda":
        decode = _as_cuda_graph(decode)  # all slots are idle now, so warm-up steps record nothing
        length.zero_()

    while True:
        if step % refill_every == 0:
            done_h, produced_h = done.tolist(), produced.tolist()
            free = [s for s in range(slots) if done_h[s]]
            finished = [s for s in free if held[s] >= 0]
            for s, row in zip(finished, out[finished].tolist()):
                results[held[s]] = row[: produced_h[s]]
                held[s] = -1
            take = free[: n - queued]
            if take:
                rows = torch.tensor(take, device=device)
                new = list(range(queued, queued + len(take)))
                queued += len(take)
                for s, i in zip(take, new):
                    held[s] = i
                logits = _prefill(model, cache, rows, [prompts[i] for i in new])
                owner[rows] = torch.tensor(new, device=device) + first_index
                length[rows] = torch.tensor([len(prompts[i]) for i in new], device=device)
                produced[rows] = 0
                done[rows] = False
                tokens, mask = last.clone(), torch.zeros_like(done)
                tokens[rows] = draw(logits, temperature, owner[rows], produced[rows], seed)
                mask[rows] = True
                emit(mask, tokens)
            if all(h < 0 for h in held):
                break
        decode()
        step += 1
    return results


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


def _prefill(model: Qwen2, cache: KVCache, rows: Tensor, prompts: list[Sequence[int]]) -> Tensor:
    """Run new prompts into cache slots `rows`; return the logits [len(rows), V] of each last prompt token.

    A prompt repeated in `prompts` (many samples of one question) runs once; its keys and values are
    copied to the other slots."""
    device = rows.device
    seen: dict[tuple[int, ...], int] = {}
    of = [seen.setdefault(tuple(p), len(seen)) for p in prompts]  # each prompt's index among the distinct ones
    distinct = list(seen)
    home = rows[[of.index(u) for u in range(len(distinct))]]  # the slot computing each distinct prompt
    lens = torch.tensor([len(p) for p in distinct], device=device)
    width = int(lens.max())
    ids = torch.zeros(len(distinct), width, dtype=torch.long, device=device)
    for j, p in enumerate(distinct):
        ids[j, : len(p)] = torch.tensor(p, device=device)
    positions = torch.arange(width, device=device)[None].expand(len(distinct), width)
    hidden = model.hidden(ids, Cached(cache, home, positions, width, fresh=True))
    of = torch.tensor(of, device=device)
    if len(distinct) < len(prompts):
        cache.k[:, rows, :, :width] = cache.k[:, home[of], :, :width]
        cache.v[:, rows, :, :width] = cache.v[:, home[of], :, :width]
    return model.logits(hidden[of, lens[of] - 1])
