"""The Triton kernels of kernels/ (forward and backward) against the eager formulas they replace.

On a CUDA machine they run on the GPU; elsewhere through Triton's interpreter on the CPU (where
Triton is installed), so the arithmetic is checked in CI too.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton reads it
pytest.importorskip("triton")

from src.fused import kernel  # noqa: E402
from src.model import rope_tables  # noqa: E402

varlen_attention, cached_attention = kernel("attention").varlen_attention, kernel("attention").cached_attention
nll_grad_ = kernel("cross_entropy").nll_grad_
rms_norm, add_rms_norm = kernel("rmsnorm").rms_norm, kernel("rmsnorm").add_rms_norm
rope_qkv = kernel("rope").rope_qkv
swiglu = kernel("swiglu").swiglu
block_stats, pick, uniforms = kernel("sampling").block_stats, kernel("sampling").pick, kernel("sampling").uniforms

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def eager_rms_norm(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def eager_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def eager_rope_qkv(qkv, cos, sin, heads, kv_heads):
    """The fused projection's output split into q, k, v heads, q and k rotated."""
    dim = cos.shape[-1]
    q, k, v = qkv.unflatten(-1, (heads + 2 * kv_heads, dim)).split([heads, kv_heads, kv_heads], -2)
    return eager_rope(q, cos, sin), eager_rope(k, cos, sin), v


def eager_swiglu(gu):
    g, u = gu.chunk(2, -1)
    return torch.nn.functional.silu(g) * u


def compare(fused, eager, inputs, dtype, tol):
    """Outputs and input gradients of `fused` and `eager` under one random upstream gradient."""
    mine = [x.detach().clone().requires_grad_(x.dtype == dtype) for x in inputs]
    ref = [x.detach().clone().requires_grad_(x.dtype == dtype) for x in inputs]
    a, b = fused(*mine), eager(*ref)
    upstream = torch.randn_like(b.float()).to(b.dtype)
    (a.float() * upstream.float()).sum().backward()
    (b.float() * upstream.float()).sum().backward()
    scale = b.float().abs().max().item()
    assert (a.float() - b.float()).abs().max().item() <= tol * scale
    for x, y in zip(mine, ref):
        if x.grad is not None:
            assert (x.grad.float() - y.grad.float()).abs().max().item() <= tol * y.grad.float().abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm(dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 96, device=DEVICE).to(dtype) * 3
    w = (torch.rand(96, device=DEVICE) + 0.5).to(dtype)
    compare(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: eager_rms_norm(x, w, 1e-6), [x, w.detach()], dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_add_rms_norm(dtype, tol):
    """The residual add and the norm after it: the sum bitwise eager's, the norm and both inputs' gradients
    (through the norm and along the residual) within tolerance."""
    torch.manual_seed(5)
    x, delta = (torch.randn(2, 7, 96, device=DEVICE).to(dtype) * 3 for _ in range(2))
    w = (torch.rand(96, device=DEVICE) + 0.5).to(dtype)
    s, _ = add_rms_norm(x, delta, w, 1e-6)
    if DEVICE == "cuda":
        assert torch.equal(s, x + delta)
    else:  # Triton's interpreter rounds float32 -> bfloat16 toward zero, not to nearest
        assert (s.float() - (x + delta).float()).abs().max() <= 2 ** -7 * (x + delta).float().abs().max()

    def joined(pair):
        return torch.cat([pair[0], pair[1] * 2], -1)  # both outputs, unequal weights in the upstream gradient

    compare(lambda x, d: joined(add_rms_norm(x, d, w, 1e-6)),
            lambda x, d: joined((x + d, eager_rms_norm(x + d, w, 1e-6))), [x, delta], dtype, tol)


def test_norm_backward_reads_a_gradient_with_spaced_rows():
    """An upstream gradient whose rows lie further apart (a view of a wider one, as LoRA's wide GEMM returns
    it, src/lora.py) is read where it lies and gives the gradients of its contiguous copy, bitwise."""
    torch.manual_seed(6)
    x, delta = (torch.randn(2, 7, 96, device=DEVICE) for _ in range(2))
    w = torch.rand(96, device=DEVICE) + 0.5
    dy = torch.randn(2, 7, 96 + 16, device=DEVICE)[..., :96]
    assert not dy.is_contiguous()
    for norm in (lambda x, d: rms_norm(x + d, w, 1e-6), lambda x, d: add_rms_norm(x, d, w, 1e-6)[1]):
        grads = []
        for upstream in (dy, dy.contiguous()):
            inputs = [x.clone().requires_grad_(), delta.clone().requires_grad_()]
            grads.append(torch.autograd.grad(norm(*inputs), inputs, upstream))
        assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads", [(3, 1), (4, 2), (14, 2)])
def test_rope_qkv(dtype, tol, heads, kv_heads):
    """q and k rotated, v copied, from one fused projection output; every output's gradient reaches it."""
    torch.manual_seed(1)
    positions = torch.randint(0, 500, (2, 5), device=DEVICE)
    cos, sin = rope_tables(positions, 16, 1e6, dtype)
    x = torch.randn(2, 5, (heads + 2 * kv_heads) * 16, device=DEVICE).to(dtype)

    def joined(outputs):
        return torch.cat([t.flatten(-2) for t in outputs], -1)

    q, k, v = rope_qkv(x, cos, sin, heads, kv_heads)
    assert q.shape == (2, 5, heads, 16) and k.shape == v.shape == (2, 5, kv_heads, 16)
    compare(lambda x: joined(rope_qkv(x, cos, sin, heads, kv_heads)),
            lambda x: joined(eager_rope_qkv(x, cos, sin, heads, kv_heads)), [x], dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_swiglu(dtype, tol):
    torch.manual_seed(2)
    gu = torch.randn(3, 4, 2 * 130, device=DEVICE).to(dtype) * 4
    compare(swiglu, eager_swiglu, [gu], dtype, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [160, 1024, 3000])
def test_block_stats(dtype, vocab):
    """The sampler's per-block (max, sum of exp) in one Triton pass equals the torch formula, the last
    block partial or not."""
    from src import sampler

    torch.manual_seed(3)
    logits = (torch.randn(5, vocab, device=DEVICE) * 4).to(dtype)
    top, mass = block_stats(logits, 0.7, 256)
    want_top, want_mass = sampler.block_stats(logits.cpu(), 0.7, 256)  # the torch path (CPU)
    assert top.shape == want_top.shape == (5, -(-vocab // 256))
    assert torch.allclose(top.cpu(), want_top, rtol=1e-6, atol=0)
    assert (mass.cpu() - want_mass).abs().max().item() <= 1e-5 * want_mass.abs().max().item()


@pytest.mark.parametrize("vocab", [300, 151936])
def test_pick_equals_the_torch_pick(vocab):
    """The draw's second stage in one kernel (block masses, their cumulative sum, the chosen block's weights)
    picks the tokens of the torch formula (src/sampler.py: `pick`) for the same statistics and uniforms, rows
    from flat to peaked, bf16 logits, at two temperatures; ties only within rounding of u may differ."""
    from src import sampler

    torch.manual_seed(vocab)
    rows = 64
    logits = (torch.randn(rows, vocab) * torch.linspace(0.1, 12, rows)[:, None]).bfloat16()
    index, step = torch.arange(rows), torch.full((rows,), 2)
    for temperature in (1.0, 0.7):
        top, mass = sampler.block_stats(logits, temperature)
        u = sampler.uniforms(11, index, step)
        want = sampler.pick(logits, top, mass, u, temperature)
        got = pick(logits.to(DEVICE), top.to(DEVICE), mass.to(DEVICE), u.to(DEVICE), temperature,
                   sampler.DRAW_BLOCK).cpu()
        assert got.dtype == torch.long and got.max().item() < vocab
        assert (got == want).float().mean().item() >= 0.98, temperature


def test_uniforms_equal_the_torch_hash():
    """The draw's random numbers from one kernel are the torch formula's, bitwise, seeds and indices
    beyond 32 bits included."""
    from src import sampler

    g = torch.Generator().manual_seed(4)
    index = torch.randint(0, 2**40, (3000,), generator=g)
    step = torch.randint(0, 5000, (3000,), generator=g)
    for seed in (0, 7, 2**33 + 5):
        want = sampler.uniforms(seed, index, step)  # the torch path (CPU)
        got = uniforms(int(sampler._mix(torch.tensor(seed))), index.to(DEVICE), step.to(DEVICE)).cpu()
        assert torch.equal(got, want)
        assert 0 <= got.min() and got.max() < 1


def per_sequence_attention(q, k, v, cu):
    """Causal attention of each packed sequence on its own (SDPA), the reference of the varlen kernel."""
    out = torch.zeros_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(
                *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, enable_gqa=True).transpose(0, 1)
    return out


ON_GPU = pytest.mark.skipif(DEVICE != "cuda", reason="Triton's interpreter multiplies bf16 tiles in tl.dot as raw bits")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=ON_GPU)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (3, 3, 8), (4, 1, 24)])
def test_varlen_attention(dtype, tol, heads, kv_heads, dim):
    """Packed sequences (one over two key blocks, one of a single token, zero-length ones between and at the
    end as the graphed passes add them) against each sequence attended alone in float64: outputs and the
    q, k, v gradients (dK and dV summed over the query heads sharing a KV head); head dimensions below 16
    and not powers of two run padded."""
    torch.manual_seed(7)
    lens = [5, 70, 0, 130, 1, 33, 0, 0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(int(cu[-1]), h, dim, device=DEVICE).to(dtype) for h in (heads, kv_heads, kv_heads))
    upstream = torch.randn(int(cu[-1]), heads, dim, device=DEVICE)
    results = []
    for attend, kind in ((lambda q, k, v: varlen_attention(q, k, v, cu, 140), dtype),
                         (lambda q, k, v: per_sequence_attention(q, k, v, cu), torch.float64)):
        inputs = [x.detach().to(kind).requires_grad_() for x in (q, k, v)]
        out = attend(*inputs)
        results.append([out, *torch.autograd.grad((out.double() * upstream.double()).sum(), inputs)])
    for got, want in zip(*results):
        assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-2, marks=ON_GPU)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(14, 2, 64), (5, 1, 8), (4, 4, 24)])
@pytest.mark.parametrize("arranged", [False, True])
@pytest.mark.parametrize("crowded", [False, True])
def test_cached_attention(dtype, tol, heads, kv_heads, dim, arranged, crowded, monkeypatch):
    """From the q/k/v projection: each token's k, rotated as `rope_qkv` rotates it, and its v land in its
    row's cache slot at its position, and nothing else in the cache changes; each query, rotated, attends
    over its slot up to its own position, against SDPA over the cache so written with that mask in float64.
    One query a row (decoding; positions 0, within the first key block, across blocks, the cache's last
    row) and three a row at consecutive positions (the evaluator: a query sees the keys of the row's
    earlier queries); slots in order or arranged; stale entries past a position must not count. Both
    launch shapes (`crowded`: as with many programs to an SM, keys 32 at a time); head sizes whose half is
    not a power of two (24) or under 16 (8)."""
    monkeypatch.setattr(sys.modules[cached_attention.__module__], "_multiprocessors",
                        lambda device: 1 if crowded else 10**6)
    torch.manual_seed(9)
    slots_n, length = 6, 150
    for t, positions in ((1, [[0], [63], [64], [149], [100], [7]]), (3, [[5, 6, 7], [62, 63, 64], [0, 1, 2], [147, 148, 149]])):
        k_cache, v_cache = (torch.randn(slots_n, kv_heads, length, dim, device=DEVICE).to(dtype) for _ in range(2))
        positions = torch.tensor(positions, device=DEVICE)
        b = len(positions)
        rows = torch.tensor([4, 0, 5, 2, 1, 3][:b] if arranged else range(b), device=DEVICE)
        cos, sin = rope_tables(positions, dim, 1e6, dtype)
        qkv = torch.randn(b, t, (heads + 2 * kv_heads) * dim, device=DEVICE).to(dtype)
        q, k, v = eager_rope_qkv(qkv.float(), cos.float(), sin.float(), heads, kv_heads)
        want_k, want_v = k_cache.clone(), v_cache.clone()
        want_k[rows[:, None], :, positions] = k.to(dtype)
        want_v[rows[:, None], :, positions] = v.to(dtype)
        got = cached_attention(qkv, cos, sin, heads, kv_heads, k_cache, v_cache, rows, positions)
        assert torch.equal(v_cache, want_v)
        assert (k_cache.double() - want_k.double()).abs().max().item() <= tol * k.abs().max().item()
        seen = torch.arange(length, device=DEVICE)[None, None, :] <= positions[:, :, None]
        want = torch.nn.functional.scaled_dot_product_attention(
            q.to(dtype).double().transpose(1, 2), k_cache[rows].double(), v_cache[rows].double(),
            attn_mask=seen[:, None], enable_gqa=True).transpose(1, 2).reshape(b, t, heads * dim)
        assert got.shape == want.shape and got.dtype == dtype
        assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("vocab", [300, 9000])
def test_nll_grad(dtype, tol, vocab):
    """Per-row loss (cross-entropy / normaliser) and the logits' gradient written over them, against
    F.cross_entropy's in float64, over vocabularies smaller than and spanning several column blocks;
    ignored rows give 0 and 0."""
    torch.manual_seed(8)
    logits = (torch.randn(5, vocab, device=DEVICE) * 4).to(dtype)
    targets = torch.tensor([3, -100, vocab - 1, 0, 17], device=DEVICE)
    norm = torch.tensor([2.0, 5.0, 1.0, 7.0, 3.0], device=DEVICE)
    wide = logits.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(wide, targets, reduction="none", ignore_index=-100) / norm.double()
    (grad,) = torch.autograd.grad(want.sum(), wide)
    got_logits = logits.clone()
    got = nll_grad_(got_logits, targets, norm, -100)
    assert got.dtype == torch.float32 and got[1] == 0 and not got_logits[1].any()
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()
    assert (got_logits.double() - grad).abs().max().item() <= tol * grad.abs().max().item()
