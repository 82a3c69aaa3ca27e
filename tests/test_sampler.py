"""The batched KV-cached sampler against brute force (full forwards, no cache, one prompt at a time),
against transformers' greedy generate, and its sampling distribution against exact probabilities."""
from __future__ import annotations

import math

import pytest
import torch

from src import load_model, sample
from src.sampler import draw, uniforms
from tests.cheap import one_thread  # noqa: F401 (fixture)

VOCAB = 160  # conftest.TINY


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=11)
    return folder, load_model(folder, dtype=torch.float32)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@torch.no_grad()
def brute_force(model, prompts, *, max_new_tokens, temperature=1.0, seed=0, stop_ids=(), first_index=0):
    """One prompt at a time, the whole sequence re-run for every token; the same (index, step) draws."""
    results = []
    for i, prompt in enumerate(prompts):
        ids, out = list(prompt), []
        while len(out) < max_new_tokens:
            logits = model(torch.tensor([ids]))[:, -1]
            token = int(draw(logits, temperature, torch.tensor([first_index + i]), torch.tensor([len(out)]), seed)[0])
            out.append(token)
            ids.append(token)
            if token in stop_ids:
                break
        results.append(out)
    return results


def test_greedy_equals_argmax_over_full_forwards(tiny):
    _, model = tiny
    prompts = _prompts(7)
    got = sample(model, prompts, max_new_tokens=10, temperature=0, slots=3, refill_every=2)
    want = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(10):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            want.append(ids[len(p):])
    assert got == want


def test_greedy_equals_transformers_generate(tiny):
    from transformers import AutoModelForCausalLM

    folder, model = tiny
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = _prompts(5, seed=1)
    got = sample(model, prompts, max_new_tokens=12, temperature=0, slots=2)
    for p, ours in zip(prompts, got):
        want = ref.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
        assert ours == want[0, len(p):].tolist()


@pytest.mark.parametrize("slots,refill_every", [(3, 1), (2, 4), (7, 8)])
def test_temperature_sampling_equals_brute_force_with_stops_and_refill(tiny, slots, refill_every):
    """More prompts than slots, prompts of different lengths, stop tokens: the tokens, the stop and the
    length bound are exactly those of the one-prompt-at-a-time reference."""
    _, model = tiny
    prompts = _prompts(7, seed=2)
    stops = (5, 17, 33, 101, 150)  # frequent enough that some sequences stop early
    got = sample(model, prompts, max_new_tokens=9, temperature=1.0, seed=3, stop_ids=stops, slots=slots,
                 refill_every=refill_every)
    want = brute_force(model, prompts, max_new_tokens=9, temperature=1.0, seed=3, stop_ids=stops)
    assert got == want
    assert any(len(o) < 9 for o in got) and any(len(o) == 9 for o in got)  # both ways of ending occur
    for out in got:
        assert all(t not in stops for t in out[:-1])  # nothing after a stop token
        assert len(out) <= 9


def test_same_seed_same_samples_other_seed_other_samples(tiny):
    _, model = tiny
    prompts = _prompts(6, seed=4)
    a = sample(model, prompts, max_new_tokens=8, seed=5, slots=4)
    assert a == sample(model, prompts, max_new_tokens=8, seed=5, slots=4)
    b = sample(model, prompts, max_new_tokens=8, seed=6, slots=4)
    assert sum(x != y for x, y in zip(a, b)) >= 5


def test_samples_do_not_depend_on_batch_composition(tiny):
    """A prompt's tokens depend only on (seed, its index, the prompt): alone, with others, in another
    order (its index travelling with it via first_index), under other slot counts and refill cadences."""
    _, model = tiny
    prompts = _prompts(8, seed=6)
    kwargs = dict(max_new_tokens=10, seed=7, stop_ids=(3, 9))
    full = sample(model, prompts, slots=8, **kwargs)
    for slots, refill_every in ((1, 1), (3, 2), (5, 8)):
        assert sample(model, prompts, slots=slots, refill_every=refill_every, **kwargs) == full
    for i in (0, 5):
        assert sample(model, [prompts[i]], first_index=i, **kwargs) == [full[i]]
    assert sample(model, prompts[3:], first_index=3, slots=2, **kwargs) == full[3:]
    # Another prompt at the same index gets the same uniforms but, being another prompt, other tokens.
    swapped = sample(model, [prompts[1], prompts[0]], slots=2, **kwargs)
    assert swapped != full[:2]


def _chi_square_p_upper(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof), Wilson-Hilferty normal approximation."""
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over bins of expected count >= 5 (the rest pooled into one bin)."""
    n = counts.sum().item()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_token_distribution_matches_softmax(tiny, temperature):
    """4000 samples of one prompt (distinct prompt indices) against softmax(logits / T): the chi-square
    p-value must exceed 1e-3; the same samples scored against the other temperature's probabilities
    must fail it (the test has power)."""
    folder, _ = tiny
    model = load_model(folder, dtype=torch.float32)
    model.model.norm.weight.mul_(10)  # sharpen the tiny model's near-uniform logits (std ~0.14 -> ~1.4)
    prompt = [7, 42, 99, 3]
    n = 4000
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double()
    samples = sample(model, [prompt] * n, max_new_tokens=1, temperature=temperature, seed=8, slots=n)
    counts = torch.bincount(torch.tensor([s[0] for s in samples]), minlength=VOCAB)
    stat, dof = _chi_square(counts, torch.softmax(logits / temperature, -1))
    assert dof > 20
    assert _chi_square_p_upper(stat, dof) > 1e-3, (stat, dof)
    other = 2.0 if temperature == 1.0 else 1.0
    stat_other, dof_other = _chi_square(counts, torch.softmax(logits / other, -1))
    assert _chi_square_p_upper(stat_other, dof_other) < 1e-6, (stat_other, dof_other)


@pytest.mark.parametrize("vocab", [160, 1025, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draw_equals_inverse_cdf_over_the_whole_vocabulary(vocab, dtype):
    """The two-stage draw (block masses, then one block) picks the token that one float64 cumulative
    sum over softmax(logits / T) picks for the same uniform, for rows from flat to peaked."""
    torch.manual_seed(vocab)
    rows = 300
    logits = (torch.randn(rows, vocab) * torch.linspace(0.1, 12, rows)[:, None]).to(dtype)
    index, step = torch.arange(rows), torch.full((rows,), 5)
    for temperature in (1.0, 0.6):
        cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
        u = uniforms(3, index, step) * cdf[:, -1]
        want = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp(max=vocab - 1)
        got = draw(logits, temperature, index, step, 3)
        assert (got == want).float().mean().item() >= 0.99, temperature  # differ only within rounding of u
        assert got.max().item() < vocab
        below = torch.where(want > 0, cdf.gather(1, (want - 1).clamp(min=0)[:, None])[:, 0], 0.0)
        above = cdf.gather(1, want[:, None])[:, 0]
        far = torch.minimum(u - below, above - u) > 1e-9  # u not within rounding of a token's edge
        assert far.float().mean().item() > 0.9 and torch.equal(got[far], want[far])


def test_uniforms_are_uniform_and_independent():
    """The counter hash: 100 equal bins of u, and 10x10 bins of pairs (u at consecutive steps, at
    consecutive indices, under consecutive seeds), each a chi-square p-value above 1e-3."""
    index = torch.arange(400).repeat_interleave(250)
    step = torch.arange(250).repeat(400)
    u = uniforms(0, index, step)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    assert len(torch.unique(u)) > 0.99 * len(u)
    counts = torch.histc(u.float(), bins=100, min=0, max=1)
    stat, dof = _chi_square(counts, torch.full((100,), 0.01))
    assert _chi_square_p_upper(stat, dof) > 1e-3
    for other in (uniforms(0, index, step + 1), uniforms(0, index + 1, step), uniforms(1, index, step)):
        cell = (u * 10).long() * 10 + (other * 10).long()
        stat, dof = _chi_square(torch.bincount(cell, minlength=100), torch.full((100,), 0.01))
        assert _chi_square_p_upper(stat, dof) > 1e-3
    # A correlated pair fails the same check (the check has power).
    shifted = (u + 0.05 * torch.rand(len(u), generator=torch.Generator().manual_seed(0))) % 1
    cell = (u * 10).long() * 10 + (shifted * 10).long()
    stat, dof = _chi_square(torch.bincount(cell, minlength=100), torch.full((100,), 0.01))
    assert _chi_square_p_upper(stat, dof) < 1e-6


def test_empty_and_single_slot(tiny):
    _, model = tiny
    assert sample(model, [], max_new_tokens=4) == []
    prompts = _prompts(3, seed=9)
    assert sample(model, prompts, max_new_tokens=4, slots=1, seed=2) == brute_force(model, prompts, max_new_tokens=4,
                                                                                      seed=2)


def test_a_kept_sampler_gives_what_fresh_calls_give(tiny, tmp_path):
    """Chunks through one Sampler (its cache and slot state reused, rebuilt for a longer prompt, a new
    slot count or an applied adapter) give the tokens of a fresh sample() per chunk."""
    from src.lora import apply_lora
    from src.sampler import Sampler

    folder, _ = tiny
    model = load_model(folder, dtype=torch.float32)
    kwargs = dict(max_new_tokens=7, temperature=1.0, seed=4, stop_ids=(3, 9))
    sampler = Sampler(model, slots=3, **kwargs)
    chunks = [_prompts(5, seed=1), _prompts(4, seed=2), [[1] * 40, [2, 3], [4]], _prompts(2, seed=3)]
    seen = []
    for i, chunk in enumerate(chunks):
        assert sampler(chunk, first_index=10 * i) == sample(model, chunk, slots=3, first_index=10 * i, **kwargs)
        seen.append(sampler._decoder)
    assert seen[0] is seen[1] and seen[1] is not seen[2] and seen[2] is not seen[3]  # reused; longer; 2 slots
    apply_lora(model, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    chunk = chunks[3]  # the shape of the last decoder: only the parameters moved, and that rebuilds it
    assert sampler(chunk, first_index=30) == sample(model, chunk, slots=3, first_index=30, **kwargs)
    assert sampler._decoder is not seen[3]


def test_prefill_padded_to_its_bucket_equals_the_exact_prefill():
    """The prefill as CUDA graphs see it (prompt count rounded up to a power of two, width to CACHE_ROUND,
    padding rows into the spare slot) gives the exact prefill's last-token logits and cache rows, in float64;
    repeated prompts run once and are copied."""
    from src.checkpoint import random_model
    from src.model import Qwen2Config
    from src.sampler import _Prefill
    from tests.conftest import TINY

    model = random_model(Qwen2Config.from_dict(TINY), dtype=torch.float64, device="cpu", seed=5)
    prompts = _prompts(6, seed=3)
    prompts[3] = prompts[1]  # 5 distinct: 6 rows, 1 of them padding
    slots = [6, 0, 2, 5, 3, 1]
    results = []
    for pad in (False, True):
        cache = model.new_cache(8, 40)  # 7 slots + the spare
        with torch.no_grad():
            logits = _Prefill(model, cache, graphs=False, pad=pad)(slots, prompts)
        results.append((logits, cache))
    (exact, a), (padded, b) = results
    assert exact.shape == (6, VOCAB)
    assert (exact - padded).abs().max().item() < 1e-10
    assert torch.equal(exact[1], exact[3])
    for slot, p in zip(slots, prompts):
        for c in (a.k, a.v):
            assert c[:, slot, :, : len(p)].abs().sum() > 0
        assert (a.k[:, slot, :, : len(p)] - b.k[:, slot, :, : len(p)]).abs().max().item() < 1e-10
        assert (a.v[:, slot, :, : len(p)] - b.v[:, slot, :, : len(p)]).abs().max().item() < 1e-10
    assert a.k[:, 7].abs().sum() == 0 and b.k[:, 7].abs().sum() > 0  # padding rows went to the spare slot


def test_prefill_parts_cover_the_prompts_in_order_within_the_budget():
    from src.sampler import prefill_parts

    g = torch.Generator().manual_seed(5)
    for _ in range(200):
        lengths = torch.randint(1, 60, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g).tolist()
        budget = int(torch.randint(1, 200, (1,), generator=g))
        parts = prefill_parts(lengths, budget)
        assert [i for part in parts for i in part] == list(range(len(lengths)))
        if lengths:
            most = max(1, budget // max(lengths))
            assert all(len(part) <= most for part in parts) and len(parts) == -(-len(lengths) // most)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_fewer_slots_than_asked_and_prefill_in_parts_sample_the_same_tokens(tiny, monkeypatch):
    """Where the GPU's memory holds fewer slots than asked (fit_slots) and refills are prefilled a few
    prompts at a time (prefill_tokens), the tokens are still the brute-force ones, and a second call
    keeps the decoder (the slots asked for, not the slots that fit, identify it)."""
    from src import sampler as sampler_module

    _, model = tiny
    monkeypatch.setattr(sampler_module, "fit_slots", lambda model, max_len, wanted: min(wanted, 2))
    monkeypatch.setattr(sampler_module, "prefill_tokens", lambda config, itemsize: 20)  # parts of 1 or 2 prompts
    prompts = _prompts(7, seed=6)
    kept = sampler_module.Sampler(model, max_new_tokens=6, seed=1, slots=5)
    assert kept(prompts) == brute_force(model, prompts, max_new_tokens=6, seed=1)
    decoder = kept._decoder
    assert decoder.slots == 2 and decoder.wanted == 5
    assert kept(prompts[:6], first_index=3) == brute_force(model, prompts[:6], max_new_tokens=6, seed=1, first_index=3)
    assert kept._decoder is decoder


def test_slots_that_fit_the_32b_teacher_on_80_gb(monkeypatch):
    """The arithmetic of fit_slots at the 32B shape with the ~17 GiB an 80 GB GPU has beside its weights:
    the teacher's 320-token cache holds ~150 slots, not 256; the benchmark's 160-token one all 256; and
    what it grants (cache, spare slot, buffers and one prefill) stays within the share of free memory."""
    from types import SimpleNamespace

    from src import sampler as sampler_module
    from src.constants import SHAPES
    from src.model import Qwen2Config

    free = 17 * 2**30
    monkeypatch.setattr(sampler_module, "free_memory", lambda device: free)
    config = Qwen2Config.from_dict(SHAPES["32b"])
    fake = SimpleNamespace(config=config, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    cache_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    for max_len, low, high in [(320, 140, 160), (160, 256, 256)]:
        slots = sampler_module.fit_slots(fake, max_len, 256)
        assert low <= slots <= high
        assert (slots + 1) * cache_per_token * max_len + 4 / 3 * sampler_module.PREFILL_BYTES <= \
            sampler_module.MEMORY_SHARE * free
    assert 9_000 <= sampler_module.prefill_tokens(config, 2) <= 10_000  # a 256-prompt refill in three parts
    assert sampler_module.fit_slots(SimpleNamespace(device=torch.device("cpu")), 320, 256) == 256
