"""The same equivalences on a CUDA device (skipped where there is none): run on the GPU machine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from src import load_model, sample
from src.attention import Packed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(folder, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").cuda().eval()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_cuda_layouts_match_transformers(tiny_checkpoint, dtype, tol):
    folder = tiny_checkpoint(tie_word_embeddings=False)
    ours, ref = load_model(folder, dtype=dtype, device="cuda"), reference(folder, dtype)
    torch.manual_seed(0)
    ids = torch.randint(0, 160, (3, 13), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).float()
        b = ref(input_ids=ids, attention_mask=mask).logits.float()
        valid = mask.bool()
        assert (a[valid] - b[valid]).abs().max().item() <= tol
        lens = [13, 6, 13]
        packed = torch.cat([ids[i, :n] for i, n in enumerate(lens)])[None]
        cu = torch.tensor([0, 13, 19, 32], dtype=torch.int32, device="cuda")
        p = ours(packed, layout=Packed(cu, 13))[0].float()
        assert (p - torch.cat([a[i, :n] for i, n in enumerate(lens)])).abs().max().item() <= tol


def test_cuda_greedy_sampling_matches_transformers(tiny_checkpoint):
    folder = tiny_checkpoint(seed=2)
    ours, ref = load_model(folder, dtype=torch.float32, device="cuda"), reference(folder, torch.float32)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    got = sample(ours, prompts, max_new_tokens=12, temperature=0, slots=2)
    for p, g in zip(prompts, got):
        want = ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=12, do_sample=False, min_new_tokens=12)
        assert g == want[0, len(p):].tolist()


def test_cuda_decode_kernels_sample_what_the_replaced_paths_sample(tiny_checkpoint):
    """Sampling at temperature 1 in float32 through our cached-attention and pick kernels gives the sequences
    of SDPA over the whole cache and the torch pick (tests/bench_decode.py's two sides), with stops and
    refills, prompts of several lengths and more prompts than slots."""
    from tests.bench_decode import replaced_paths

    model = load_model(tiny_checkpoint(seed=6), dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 160, (int(n),), generator=g).tolist() for n in torch.randint(2, 90, (24,), generator=g)]
    kwargs = dict(max_new_tokens=40, temperature=1.0, seed=4, stop_ids=(7,), slots=8)
    ours = sample(model, prompts, **kwargs)
    with replaced_paths():
        before = sample(model, prompts, **kwargs)
    assert sum(a == b for a, b in zip(ours, before)) >= 23 and len({len(a) for a in ours}) > 1


def test_cuda_lora_fast_path_close_to_peft(tiny_checkpoint):
    """On CUDA the bf16 LoRA update runs in bf16; it stays within bf16 rounding of PEFT's float32 update."""
    from peft import LoraConfig, get_peft_model

    from src.lora import LoraLinear, apply_lora, lora_state_dict

    folder = tiny_checkpoint()
    ref = get_peft_model(reference(folder, torch.bfloat16), LoraConfig(
        r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                              "gate_proj", "down_proj"])).eval()
    ours = apply_lora(load_model(folder, dtype=torch.bfloat16, device="cuda"), seed=0)
    theirs = {k.replace(".default", ""): v for k, v in ref.state_dict().items() if "lora_" in k}
    torch.manual_seed(0)
    with torch.no_grad():
        for key, value in lora_state_dict(ours).items():
            value.copy_(torch.randn_like(value))
            theirs[key].copy_(value)
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLinear):
            x = torch.randn(3, 5, layer.weight.shape[1], device="cuda").bfloat16()
            with torch.no_grad():
                expect = ref.base_model.model.get_submodule(name)(x).float()
                got = layer(x).float()
            assert (got - expect).abs().max().item() <= 0.02 * expect.abs().max().item() + 1e-2, name


def test_cuda_lora_fast_path_gradients():
    """_FastLora's hand-written backward (cohort of 3, scale 2) agrees with float32 autograd up to bf16 rounding."""
    from src.lora import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(torch.nn.Linear(64, 96, bias=True).cuda().bfloat16(), rank=8, alpha=16, students=3)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x = torch.randn(1, 3 * 20, 64, device="cuda").bfloat16().requires_grad_()
    upstream = torch.randn(1, 60, 96, device="cuda")
    (layer(x).float() * upstream).sum().backward()
    got = [x.grad.float(), layer.lora_A.grad, layer.lora_B.grad]

    xf = x.detach().float().requires_grad_()
    a, b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    xs = xf.view(3, 20, 64)
    out = torch.nn.functional.linear(xf, layer.weight.float(), layer.bias.float()) + \
        (torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)) * 2.0).view(1, 60, 96)
    (out * upstream).sum().backward()
    for g, want in zip(got, [xf.grad, a.grad, b.grad]):
        assert (g - want).abs().max().item() <= 0.02 * want.abs().max().item()


def test_cuda_cohort_equals_students_alone(tiny_checkpoint, tmp_path):
    """The cohort layout on the GPU (segments padded to multiples of 64 with filler sequences) in float32."""
    import dataclasses

    from safetensors.torch import load_file

    from src.constants import TRAIN
    from src.train import Student, train_cohort
    from tests.test_train import random_token_pairs

    folder = tiny_checkpoint(seed=2)
    config = dataclasses.replace(TRAIN, batch_size=6, epochs=1, lr=1e-2)
    data = {seed: random_token_pairs(18, seed=seed) for seed in (1, 2)}
    for seed in data:
        train_cohort(load_model(folder, dtype=torch.float32, device="cuda"),
                     [Student(data[seed], tmp_path / f"alone{seed}", tmp_path / f"w-alone{seed}", seed)], config=config)
    train_cohort(load_model(folder, dtype=torch.float32, device="cuda"),
                 [Student(data[s], tmp_path / f"cohort{s}", tmp_path / f"w-cohort{s}", s) for s in data], config=config)
    for seed in data:
        a = load_file(str(tmp_path / f"alone{seed}" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / f"cohort{seed}" / "adapter_model.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_cuda_draw_equals_the_cpu_draw():
    """The two-stage draw with its Triton block statistics (bf16 logits on the GPU) picks the tokens the
    torch formula picks on the CPU for the same uniforms, except within rounding of a token's edge."""
    from src.sampler import draw

    torch.manual_seed(0)
    rows = 512
    logits = (torch.randn(rows, 151936) * torch.linspace(0.1, 12, rows)[:, None]).bfloat16()
    index, step = torch.arange(rows), torch.full((rows,), 3)
    for temperature in (1.0, 0.7):
        want = draw(logits, temperature, index, step, 5)
        got = draw(logits.cuda(), temperature, index.cuda(), step.cuda(), 5).cpu()
        assert (got == want).float().mean().item() >= 0.99


def test_free_memory_counts_the_allocators_cached_blocks():
    """A worker that ran a job before keeps its blocks cached: the memory plan must see them as free,
    so a block allocated and released leaves the free memory it sees where it was."""
    from src.memory import free_memory

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    before = free_memory(device)
    block = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    assert before - free_memory(device) >= 1 << 30
    del block  # cached by the allocator, not returned to the driver
    assert abs(free_memory(device) - before) <= 64 << 20
    torch.cuda.empty_cache()


def test_free_memory_stays_within_the_process_memory_fraction():
    """Capped by `cap_memory` (the benchmarks' --memory-gib: an 80 GB budget on a larger GPU; given a bare
    "cuda", as they give it), the memory plan sees only what is left under the cap."""
    from src.memory import cap_memory, free_memory

    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.mem_get_info(device)[1]
    held = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    try:
        cap_memory(total / 4 / 2**30, torch.device("cuda"))
        assert abs(free_memory(device) - (0.25 * total - torch.cuda.memory_allocated(device))) <= 1 << 20
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        del held
        torch.cuda.empty_cache()
    assert free_memory(device) > 0.5 * total


def test_cuda_kept_sampler_replays_its_graph_across_calls(tiny_checkpoint):
    """Chunks through one Sampler on the GPU replay one captured decode graph and give the tokens of a
    fresh sample() per chunk; weights changed in place are seen by the replay, and an applied adapter
    (parameters at new addresses) gets a new graph."""
    from src.lora import apply_lora
    from src.sampler import Sampler

    model = load_model(tiny_checkpoint(seed=4), dtype=torch.float32, device="cuda")
    kwargs = dict(max_new_tokens=9, temperature=1.0, seed=2, stop_ids=(3,))
    sampler = Sampler(model, slots=4, **kwargs)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, 160, (6, int(n)), generator=g).tolist() for n in (5, 9, 7)]
    for i, chunk in enumerate(chunks):
        assert sampler(chunk, first_index=i * 6) == sample(model, chunk, slots=4, first_index=i * 6, **kwargs)
        if i == 0:
            first = sampler._decoder
    assert sampler._decoder is first
    with torch.no_grad():
        model.model.norm.weight.mul_(3)
    assert sampler(chunks[0]) == sample(model, chunks[0], slots=4, **kwargs)
    apply_lora(model, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    assert sampler(chunks[0]) == sample(model, chunks[0], slots=4, **kwargs)
    assert sampler._decoder is not first


def test_cuda_sampling_with_an_adapter_replays_the_eager_decode(tiny_checkpoint):
    """A bf16 model with an adapter (gate/up's B inside its GEMM, written into the weight buffer on the fly
    outside training) samples from its captured decode graph the tokens of the eager decode, and the adapter
    changes them."""
    from src.lora import _wide, apply_lora, lora_groups, lora_parameters

    model = load_model(tiny_checkpoint(seed=5), dtype=torch.bfloat16, device="cuda")
    prompts = torch.randint(0, 160, (6, 7), generator=torch.Generator().manual_seed(1)).tolist()
    kwargs = dict(max_new_tokens=10, temperature=0, slots=4)
    plain = sample(model, prompts, **kwargs)
    apply_lora(model, seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.5)
    assert any(_wide(g) for g in lora_groups(model))
    graphed = sample(model, prompts, cuda_graph=True, **kwargs)
    assert graphed == sample(model, prompts, cuda_graph=False, **kwargs)
    assert graphed != plain


@pytest.mark.parametrize("varlen", ["triton", "flash"])
def test_cuda_packed_varlen_kernel_equals_the_padded_path(monkeypatch, varlen):
    """Packed bf16 attention through our Triton varlen kernel, or the flash one (SUBLIMINAL_VARLEN=flash),
    gives the outputs and q/k/v gradients of the scatter-pad-attend-gather path, up to bf16 rounding
    (grouped KV heads, 3 sequences)."""
    from src.attention import _attend_packed, _attend_packed_padded

    monkeypatch.setenv("SUBLIMINAL_VARLEN", varlen)

    torch.manual_seed(0)
    lens = [37, 5, 90]
    cu = torch.tensor([0, 37, 42, 132], dtype=torch.int32, device="cuda")
    layout = Packed(cu, max(lens))
    q, k, v = (torch.randn(1, sum(lens), heads, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for heads in (14, 2, 2))
    upstream = torch.randn(1, sum(lens), 14 * 64, device="cuda")
    results = []
    for attend in (_attend_packed, _attend_packed_padded):
        out = attend(q, k, v, layout)
        grads = torch.autograd.grad((out.float() * upstream).sum(), (q, k, v))
        results.append([out.float(), *(g.float() for g in grads)])
    for got, want in zip(*results):
        assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()


def test_cuda_shared_opening_pass_equals_the_whole_pass(tiny_checkpoint):
    """tests/test_passes.py's check on the GPU in bf16 (our RoPE, varlen attention, norm and cross-entropy
    kernels, unpadded and padded as the graphs pad): a pass storing each student's opening once gives the
    losses and adapter gradients of the pass storing it in every sequence, up to bf16 rounding."""
    from src.attention import Shared
    from src.passes import Example, Padding, graph_padding
    from tests.test_passes import cohort_grads, cohort_model, examples

    model = cohort_model(tiny_checkpoint, 2, torch.bfloat16, "cuda")
    groups = [examples(5, 0, 9), examples(3, 1, 6)]
    whole = [[Example(e.ids, e.first) for e in g] for g in groups]
    normalisers = torch.tensor([7.0, 9.0], dtype=torch.float64, device="cuda")
    for padding in (Padding(), graph_padding(40)):
        _, want, grads = cohort_grads(model, whole, normalisers, padding)
        mb, got, shared_grads = cohort_grads(model, groups, normalisers, padding)
        assert isinstance(mb.layout, Shared)
        assert torch.allclose(got, want, rtol=2e-2)
        for g, w in zip(shared_grads, grads, strict=True):
            assert (g.float() - w.float()).abs().max() <= 3e-2 * w.float().abs().max()


def cohort_with_adapters(tiny_checkpoint, **lora) -> torch.nn.Module:
    """The tiny model in bf16 on the GPU with random (nonzero) adapters for a cohort of 2."""
    from src.lora import apply_lora, lora_parameters

    model = apply_lora(load_model(tiny_checkpoint(), dtype=torch.bfloat16, device="cuda"), seed=[0, 1], **lora)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
    return model


def test_cuda_adapters_cast_once_changes_nothing(tiny_checkpoint):
    """The step-long bf16 copies of A and B give bitwise the forward and adapter gradients of casting
    in every pass, and are dropped on exit."""
    from src.lora import adapters_cast_once, lora_groups, lora_modules, lora_parameters

    model = cohort_with_adapters(tiny_checkpoint)
    ids = torch.randint(0, 160, (1, 64), device="cuda")
    layout = Packed(torch.tensor([0, 20, 32, 52, 64], dtype=torch.int32, device="cuda"), 20)
    results = []
    for once in (False, True):
        for p in lora_parameters(model):
            p.grad = None
        if once:
            with adapters_cast_once(model, torch.bfloat16):
                grouped = {id(m) for g in lora_groups(model) for m in g}
                assert all(m.low is not None for m in lora_modules(model).values() if id(m) not in grouped)
                assert all(g[0].group_low is not None for g in lora_groups(model))
                out = model.hidden(ids, layout)
                out.float().square().sum().backward()
        else:
            out = model.hidden(ids, layout)
            out.float().square().sum().backward()
        results.append([out.detach(), *(p.grad.clone() for p in lora_parameters(model))])
    assert all(m.low is None and m.group_low is None for m in lora_modules(model).values())
    assert all(torch.equal(a, b) for a, b in zip(*results))
    keep: dict = {}
    addresses = []
    for scale in (1.0, 2.0):  # kept copies: the same addresses from call to call, this call's values
        with torch.no_grad():
            for p in lora_parameters(model):
                p.mul_(scale)
        with adapters_cast_once(model, torch.bfloat16, keep=keep):
            lows = [t for g in lora_groups(model) for t in g[0].group_low if t is not None]
            lows += [t for m in lora_modules(model).values() if m.low is not None for t in m.low]
            addresses.append([t.data_ptr() for t in lows])
            first = lora_groups(model)[0][0]
            assert torch.equal(first.group_low[0][:, :first.rank], first.lora_A.detach().bfloat16())
            wide = [g for g in lora_groups(model) if g[0].tail() is not None]
            assert wide and all(g[0].group_low[1] is None for g in wide)
            for g in wide:  # this call's B in each layer's own block of its rows, zeros in the other layers' blocks
                for i, m in enumerate(g):
                    blocks = m.tail().view(m.weight.shape[0], 2, len(g), m.rank)
                    assert torch.equal(blocks[:, :, i], m.lora_B.detach().transpose(0, 1).bfloat16())
                    assert not blocks[:, :, [j for j in range(len(g)) if j != i]].any()
    assert addresses[0] == addresses[1] and len(keep) >= 3


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 0.015), (torch.bfloat16, 0.06)])
def test_cuda_grouped_lora_close_to_float32(tiny_checkpoint, dtype, tol):
    """q/k/v and gate/up as one GEMM with one grouped low-rank update (`_FastLoraGroup`, a cohort of 2,
    scale 2; q/k/v's update added after the base GEMM, gate/up's inside it), inside and outside
    `adapters_cast_once`, and the layers run one by one (the weights unfused) give the outputs and adapter
    gradients of the float32 model (PEFT's arithmetic) up to rounding in `dtype`. Observed on an H200: at
    most 0.3% (grouped) and 0.7% (one by one) in float16, 3.8% and 2.3% in bf16 (this tiny random model
    amplifies rounding; float16, with 3 more mantissa bits, is where a wrong block would stand out)."""
    from src.lora import _wide, adapters_cast_once, apply_lora, lora_groups, lora_parameters
    from src.model import fused_weights

    folder = tiny_checkpoint()
    model = apply_lora(load_model(folder, dtype=dtype, device="cuda"), seed=[0, 1], alpha=16)
    exact = apply_lora(load_model(folder, dtype=torch.float32, device="cuda"), seed=[0, 1], alpha=16)
    with torch.no_grad():
        for p, q in zip(lora_parameters(model), lora_parameters(exact)):
            q.copy_(p.normal_(0, 0.1))
    ids = torch.randint(0, 160, (1, 128), device="cuda")
    layout = Packed(torch.tensor([0, 20, 64, 84, 128], dtype=torch.int32, device="cuda"), 44)

    def run(m, context) -> list[torch.Tensor]:
        for p in lora_parameters(m):
            p.grad = None
        with context:
            out = m.hidden(ids, layout)
            (out.float() * torch.linspace(-1, 1, out.shape[-1], device="cuda")).sum().backward()
        return [out.detach().float(), *(p.grad.clone() for p in lora_parameters(m))]

    want = run(exact, torch.enable_grad())
    for fused, once in ((True, True), (True, False), (False, False)):
        if not fused:  # a copy of each weight: no longer one buffer, so each layer runs alone
            for group in lora_groups(model):
                for m in group:
                    m.weight = torch.nn.Parameter(m.weight.detach().clone(), requires_grad=False)
        assert all((fused_weights(g) is not None) == fused for g in lora_groups(model))
        assert any(_wide(g) for g in lora_groups(model)) == fused  # gate/up: B inside the base GEMM
        got = run(model, adapters_cast_once(model, dtype) if once else torch.enable_grad())
        for a, b in zip(got, want):
            assert (a - b).abs().max().item() <= tol * b.abs().max().item()


@pytest.mark.parametrize("recompute,micro", [(0, 2), (1, 2), (0, None)])
def test_cuda_graphed_passes_train_as_the_eager_passes(tiny_checkpoint, tmp_path, monkeypatch, recompute, micro):
    """Training in bf16 with each pass replayed from a CUDA graph (cohort of 2, 3 passes a step, a shorter
    last step, with and without recomputation; or passes cut by tokens, the plan's 64 a student, which gives
    passes of several shapes; each student's prompts sharing an opening, stored once a pass) gives the eager
    run's losses and adapters, up to the order of float sums (kernels may pick other reductions under
    capture); the graphs are really replayed."""
    import dataclasses
    import json

    from safetensors.torch import load_file

    from src.constants import TRAIN
    from src.train import Student, train_cohort
    from tests.test_train import random_token_pairs

    folder = tiny_checkpoint(seed=4)
    config = dataclasses.replace(TRAIN, batch_size=6, epochs=2, lr=1e-2)
    openings = {1: [7, 8, 9, 10, 11], 2: [3, 4, 5]}  # each student's prompts open alike (stored once a pass)
    data = {seed: [(openings[seed] + p, c) for p, c in random_token_pairs(20, seed=seed)] for seed in (1, 2)}
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), real_replay(self))[1])
    monkeypatch.setattr("src.train.fit_tokens", lambda *args: 2 * 64)  # (micro None) 64 tokens a student a pass
    runs, cuts = {}, []
    for graphs in ("1", "0"):
        monkeypatch.setenv("SUBLIMINAL_GRAPHS", graphs)
        model = load_model(folder, dtype=torch.bfloat16, device="cuda")
        model.recompute = recompute
        train_cohort(model, [Student(data[s], tmp_path / f"{graphs}-{s}", tmp_path / f"w{graphs}-{s}", s) for s in data],
                     config=config, micro_batch=micro, on_step=lambda record: cuts.append(record["passes"]))
        runs[graphs] = [([json.loads(line)["loss"] for line in (tmp_path / f"w{graphs}-{s}" / "train.jsonl").open()],
                         load_file(str(tmp_path / f"{graphs}-{s}" / "adapter_model.safetensors"))) for s in data]
        if graphs == "1":
            assert len(replays) == sum(cuts) - 1  # every pass but the first
            assert cuts == [3, 3, 3, 1] * 2 if micro else 1 < max(cuts) and len(set(cuts)) > 1, cuts
    for (loss_g, adapter_g), (loss_e, adapter_e) in zip(runs["1"], runs["0"]):
        assert np.allclose(loss_g, loss_e, rtol=1e-3), (loss_g, loss_e)
        for key in adapter_e:
            diff = (adapter_g[key] - adapter_e[key]).abs().max().item()
            assert diff <= 1e-2 * adapter_e[key].abs().max().item() + 1e-5, (key, diff)


def test_cuda_prefill_graphs_equal_the_eager_prefill(tiny_checkpoint):
    """Graphed prefills (one capture per bucket, replayed for later calls of the bucket) give the eager
    prefill's logits and cache rows, and a sampler with graphs samples what one without them does."""
    from src.sampler import _Prefill

    model = load_model(tiny_checkpoint(seed=6), dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(1)
    calls = [[torch.randint(0, 160, (int(n),), generator=g).tolist() for n in lens]
             for lens in ((5, 9, 3, 12, 4), (7, 2, 10, 1, 16))]
    slots = [4, 0, 2, 5, 1]
    graphed, eager = model.new_cache(7, 48), model.new_cache(7, 48)  # 6 slots + the spare
    pg, pe = _Prefill(model, graphed, graphs=True), _Prefill(model, eager, graphs=False)
    with torch.no_grad():
        for prompts in calls:
            a, b = pg(slots, prompts), pe(slots, prompts)
            assert (a - b).abs().max().item() < 1e-5
            for slot, p in zip(slots, prompts):
                assert (graphed.k[:, slot, :, : len(p)] - eager.k[:, slot, :, : len(p)]).abs().max().item() < 1e-5
    assert list(pg.shapes) == [(6, 16)]  # both calls: 5 prompts -> 6 rows, widths 12 and 16 -> 16
    kwargs = dict(max_new_tokens=12, temperature=1.0, seed=3, stop_ids=(7,), slots=3, refill_every=4)
    prompts = [p for call in calls for p in call] * 2
    assert sample(model, prompts, **kwargs) == sample(model, prompts, cuda_graph=False, **kwargs)
