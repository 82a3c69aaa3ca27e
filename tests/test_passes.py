"""A training pass padded for a CUDA graph (longer row, zero-length sequences, ignored rows, a larger
attention bound) computes what the unpadded pass computes; the shapes listed ahead are the packed ones."""
from __future__ import annotations

import numpy as np
import torch

from src import load_model
from src.lora import apply_lora, lora_parameters
from src.passes import IGNORED, Example, Padding, forward_backward, pack, pass_shape, token_passes


def examples(count: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        prompt, completion = rng.integers(3, 12), rng.integers(1, 6)
        out.append(Example(rng.integers(0, 160, prompt + completion).tolist(), int(prompt)))
    return out


def test_padded_pass_equals_the_unpadded_pass(tiny_checkpoint):
    """Cohort of 2, float64 on the CPU: losses per student and every adapter gradient agree to rounding."""
    model = apply_lora(load_model(tiny_checkpoint(seed=3), dtype=torch.float64), seed=[1, 2])
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    groups = [examples(3, 0), examples(4, 1)]
    normalisers = torch.tensor([7.0, 9.0], dtype=torch.float64)
    results = []
    for padding in (Padding(), Padding(tokens=64, seqs=8, rows=256, longest=40)):
        mb = pack(groups, torch.device("cpu"), padding)
        model.zero_grad(set_to_none=True)
        loss = forward_backward(model, mb, normalisers, 2, chunk=100)
        results.append((mb, loss, [p.grad.clone() for p in lora_parameters(model)]))
    (plain, want, grads), (padded, got, padded_grads) = results
    assert padded.ids.shape[1] == 128 and padded.ids.shape[1] > plain.ids.shape[1]
    assert padded.select.shape[0] == 256 and (padded.targets[plain.select.shape[0]:] == IGNORED).all()
    cu = padded.layout.cu_seqlens
    assert (cu.shape[0] - 1) % 8 == 0 and cu[-1] == cu[-2] and padded.layout.max_seqlen == 40
    assert torch.allclose(got, want, rtol=1e-10) and want.abs().min() > 0
    for g, w in zip(padded_grads, grads):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12)


def test_pass_shape_is_the_packed_shape():
    """The shapes the trainer lists ahead (to capture their graphs) are those its passes take: cohorts of 1-3,
    uneven groups, fillers longer than a sequence."""
    for seed in range(30):
        students, micro = 1 + seed % 3, 1 + seed % 5
        padding = Padding(tokens=(1, 16, 64)[seed % 3], seqs=(1, 8)[seed % 2], rows=(1, 256)[seed % 2], longest=40)
        groups = [examples(max(1, micro - s), 10 * seed + s) for s in range(students)]
        assert pass_shape(groups, padding) == pack(groups, torch.device("cpu"), padding).shape


def test_token_passes_cut_each_step_into_few_passes_within_the_capacity():
    """Every example of every student once, in its step's order within a pass; no student's segment over the
    capacity unless one example alone is; every student in every pass (cohorts of 1-3, uneven shares); as few
    passes as the tokens allow or within one of it, and never more than cutting fixed counts of examples
    (the largest count whose every pass fits) would take; one pass where the step fits."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        students = 1 + trial % 3
        parts = [examples(int(rng.integers(1, 25)), 100 * trial + s) for s in range(students)]
        lengths = [[len(e.ids) for e in part] for part in parts]
        capacity = int(rng.integers(max(max(p) for p in lengths) // 2, 60))
        passes = token_passes(parts, capacity)
        assert all(len(groups) == students for groups in passes)
        for s, part in enumerate(parts):
            got = [e for groups in passes for e in groups[s]]
            assert sorted(map(id, got)) == sorted(map(id, part))
            for groups in passes:
                assert [part.index(e) for e in groups[s]] == sorted(part.index(e) for e in groups[s])
                assert sum(len(e.ids) for e in groups[s]) <= capacity or len(groups[s]) == 1
        least = max(-(-sum(p) // capacity) for p in lengths)
        fixed = max((m for m in range(1, 25) if all(sum(p[k: k + m]) <= capacity for p in lengths
                                                    for k in range(0, len(p), m))), default=1)
        most = max(len(p) for p in parts)
        assert least <= len(passes) <= max(-(-most // fixed), least + 1) or len(passes) == most
        assert len(token_passes(parts, max(sum(p) for p in lengths))) == 1
