"""A training pass padded for a CUDA graph (longer row, zero-length sequences, ignored rows, a larger
attention bound) computes what the unpadded pass computes; the shapes listed ahead are the packed ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src import load_model
from src.lora import apply_lora, lora_parameters
from src.attention import Packed, Shared
from src.passes import IGNORED, Example, Padding, forward_backward, opening, pack, pass_shape, token_passes


def examples(count: int, seed: int, opening_tokens: int = 0) -> list[Example]:
    """Random sequences; with `opening_tokens`, all open with the same tokens (as the chat template's opening
    opens every student prompt) and say so (`Example.shared`)."""
    rng = np.random.default_rng(seed)
    head = rng.integers(0, 160, opening_tokens).tolist()
    out = []
    for _ in range(count):
        prompt, completion = rng.integers(3, 12), rng.integers(1, 6)
        ids = head + rng.integers(0, 160, prompt + completion).tolist()
        out.append(Example(ids, opening_tokens + int(prompt), opening_tokens))
    return out


def cohort_grads(model, groups, normalisers, padding):
    """(micro-batch, loss per student, every adapter gradient) of one pass from zeroed gradients."""
    mb = pack(groups, model.device, padding)
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, mb, normalisers, len(groups), chunk=100)
    return mb, loss, [p.grad.clone() for p in lora_parameters(model)]


def cohort_model(tiny_checkpoint, students: int, dtype: torch.dtype = torch.float64, device: str = "cpu"):
    """A tiny model with a cohort of `students` adapters, all non-zero."""
    model = apply_lora(load_model(tiny_checkpoint(seed=3), dtype=dtype, device=device),
                       seed=list(range(1, students + 1)))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    return model


def test_padded_pass_equals_the_unpadded_pass(tiny_checkpoint):
    """Cohort of 2, float64 on the CPU: losses per student and every adapter gradient agree to rounding."""
    model = cohort_model(tiny_checkpoint, 2)
    groups = [examples(3, 0), examples(4, 1)]
    normalisers = torch.tensor([7.0, 9.0], dtype=torch.float64)
    (plain, want, grads), (padded, got, padded_grads) = (
        cohort_grads(model, groups, normalisers, padding) for padding in (Padding(), Padding(64, 8, 256, 40)))
    assert padded.ids.shape[1] == 128 and padded.ids.shape[1] > plain.ids.shape[1]
    assert padded.select.shape[0] == 256 and (padded.targets[plain.select.shape[0]:] == IGNORED).all()
    cu = padded.layout.cu_seqlens
    assert (cu.shape[0] - 1) % 8 == 0 and cu[-1] == cu[-2] and padded.layout.max_seqlen == 40
    assert torch.allclose(got, want, rtol=1e-10) and want.abs().min() > 0
    for g, w in zip(padded_grads, grads):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12)


def test_a_shared_opening_stored_once_computes_what_every_copy_computes(tiny_checkpoint):
    """Cohort of 3 (openings of 9, 5 and 0 tokens), float64 on the CPU, unpadded and padded as on CUDA: a
    pass that stores each student's opening once gives the losses and adapter gradients of the pass that
    stores it in every sequence, with (S - 1) x opening fewer rows; a lone sequence stores it once anyway."""
    model = cohort_model(tiny_checkpoint, 3)
    groups = [examples(4, 0, 9), examples(3, 1, 5), examples(2, 2)]
    copied = [[Example(e.ids, e.first) for e in g] for g in groups]
    normalisers = torch.tensor([7.0, 9.0, 5.0], dtype=torch.float64)
    for padding in (Padding(), Padding(tokens=16, seqs=8, rows=256, longest=40)):
        whole, want, grads = cohort_grads(model, copied, normalisers, padding)
        mb, got, shared_grads = cohort_grads(model, groups, normalisers, padding)
        assert isinstance(whole.layout, Packed) and isinstance(mb.layout, Shared)
        assert mb.tokens == [t - d for t, d in zip(whole.tokens, (3 * 9, 2 * 5, 0))]
        assert mb.full.cu_seqlens.tolist()[:5] == whole.layout.cu_seqlens.tolist()[:5]  # the first student's, whole
        # each stored row's output is taken from a copy that reads it (attention's "pick" backward of queries)
        assert mb.layout.expand[mb.layout.keep].tolist() == list(range(mb.ids.shape[1]))
        assert torch.allclose(got, want, rtol=1e-10) and want.abs().min() > 0
        for g, w in zip(shared_grads, grads, strict=True):
            # the norms normalise in float32 (as the reference does): the opening's gradients summed after
            # them (every copy) or before (stored once) round differently there, ~1e-8 of the largest
            assert (g - w).abs().max() <= 1e-6 * w.abs().max() and w.abs().max() > 0
    lone = pack([examples(1, 3, 9)], torch.device("cpu"))
    assert isinstance(lone.layout, Packed) and lone.ids.shape[1] == len(examples(1, 3, 9)[0].ids)


def test_opening_is_the_common_prefix_short_of_the_first_target():
    base = [5, 6, 7, 8, 9, 10]
    assert opening([Example(base, 5), Example(base[:4] + [0, 1], 5)]) == 4
    assert opening([Example(base, 3), Example(base, 5)]) == 2  # never a row that predicts a completion token
    assert opening([Example([1, 2, 3], 2), Example([2, 2, 3], 2)]) == 0
    assert opening([]) == 0
    wrong = [Example(base, 5, 3), Example([5, 0, 7, 8, 9, 10], 5, 3)]
    with pytest.raises(ValueError, match="opening"):
        pack([wrong], torch.device("cpu"))


def test_pass_shape_is_the_packed_shape():
    """The shapes the trainer lists ahead (to capture their graphs) are those its passes take: cohorts of 1-3,
    uneven groups, fillers longer than a sequence."""
    for seed in range(30):
        students, micro = 1 + seed % 3, 1 + seed % 5
        padding = Padding(tokens=(1, 16, 64)[seed % 3], seqs=(1, 8)[seed % 2], rows=(1, 256)[seed % 2], longest=40)
        groups = [examples(max(1, micro - s), 10 * seed + s, (0, 7, 30)[(seed + s) % 3]) for s in range(students)]
        assert pass_shape(groups, padding) == pack(groups, torch.device("cpu"), padding).shape


def test_token_passes_cut_each_step_into_few_passes_within_the_capacity():
    """Every example of every student once, in its step's order within a pass; no student's segment over the
    capacity unless one example alone is; every student in every pass (cohorts of 1-3, uneven shares); as few
    passes as the tokens allow or within one of it, and never more than cutting fixed counts of examples
    (the largest count whose every pass fits) would take; one pass where the step fits."""
    rng = np.random.default_rng(0)
    for trial in range(90):
        students, shared = 1 + trial % 3, (0, 0, 6)[trial % 3 if trial < 60 else 2]
        parts = [examples(int(rng.integers(1, 25)), 100 * trial + s, shared) for s in range(students)]
        # a pass stores a student's opening once: each example costs its rest, the pass the opening
        lengths = [[len(e.ids) - shared for e in part] for part in parts]
        capacity = int(rng.integers(max(max(p) for p in lengths) // 2, 60)) + shared
        room = capacity - shared
        passes = token_passes(parts, capacity)
        assert all(len(groups) == students for groups in passes)
        for s, part in enumerate(parts):
            got = [e for groups in passes for e in groups[s]]
            assert sorted(map(id, got)) == sorted(map(id, part))
            for groups in passes:
                assert [part.index(e) for e in groups[s]] == sorted(part.index(e) for e in groups[s])
                stored = pack([groups[s]], torch.device("cpu")).ids.shape[1] if groups[s] else 0
                assert stored <= capacity or len(groups[s]) == 1
        least = max(-(-sum(p) // room) for p in lengths)
        fixed = max((m for m in range(1, 25) if all(sum(p[k: k + m]) <= room for p in lengths
                                                    for k in range(0, len(p), m))), default=1)
        most = max(len(p) for p in parts)
        assert least <= len(passes) <= max(-(-most // fixed), least + 1) or len(passes) == most
        assert len(token_passes(parts, max(sum(p) for p in lengths) + shared)) == 1
