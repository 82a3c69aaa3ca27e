"""Our Qwen2 against transformers' on tiny random checkpoints: every layout, both config dialects,
sharded files and the loader's errors."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src import UserError, load_model
from src.attention import Cached, Packed
from src.model import Qwen2Config

SHAPES = [
    dict(),  # tied, GQA 6/2
    dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4, head_dim=12, hidden_size=40),
    dict(tie_word_embeddings=False, num_attention_heads=3, num_key_value_heads=1, head_dim=16, hidden_size=30,
         intermediate_size=50, num_hidden_layers=3, rope_theta=1_000_000.0),
]


def reference(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_padded_batch_matches_transformers(tiny_checkpoint, shape):
    folder = tiny_checkpoint(**shape)
    ours, ref = load_model(folder, dtype=torch.float32), reference(folder)
    torch.manual_seed(1)
    ids = torch.randint(0, 160, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = ref(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert a.shape == b.shape
    assert (a[valid] - b[valid]).abs().max().item() <= 1e-4
    assert not torch.isnan(a).any()


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_equals_separate(tiny_checkpoint, shape):
    folder = tiny_checkpoint(seed=3, **shape)
    ours, ref = load_model(folder, dtype=torch.float32), reference(folder)
    torch.manual_seed(2)
    seqs = [torch.randint(0, 160, (n,)) for n in (5, 9, 1, 7)]
    packed = torch.cat(seqs)[None]
    cu = torch.tensor([0, 5, 14, 15, 22], dtype=torch.int32)
    with torch.no_grad():
        out = ours(packed, layout=Packed(cu, 9))[0]
        for i, s in enumerate(seqs):
            expect = ref(input_ids=s[None]).logits[0]
            assert (out[cu[i]: cu[i + 1]] - expect).abs().max().item() <= 1e-4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("fresh", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_cache_decoding_equals_full_forward(tiny_checkpoint, shape, fresh, device):
    """A prompt prefilled into arbitrary cache slots, then three tokens a slot in one call (the evaluator's
    rows), then one at a time (decoding): the logits of the whole sequence's forward. On CUDA the calls
    after the prefill run the cached-attention kernel from the q/k/v projection (`attend_cached`)."""
    folder = tiny_checkpoint(seed=5, **shape)
    ours = load_model(folder, dtype=torch.float32, device=device)
    torch.manual_seed(4)
    full = torch.randint(0, 160, (2, 12), device=device)
    prompt_len = 5
    cache = ours.new_cache(slots=4, max_len=16)
    slots = torch.tensor([3, 1], device=device)  # arbitrary slots: prefill must land where asked
    with torch.no_grad():
        expect = ours(full)
        pos = torch.arange(prompt_len, device=device)[None].expand(2, prompt_len)
        h = ours.hidden(full[:, :prompt_len], Cached(cache, slots, pos, prompt_len, fresh=fresh))
        got = [ours.logits(h)]
        pos = torch.arange(prompt_len, prompt_len + 3, device=device)[None].expand(2, 3)
        got.append(ours.logits(ours.hidden(full[:, prompt_len:prompt_len + 3], Cached(cache, slots, pos, 16))))
        for t in range(prompt_len + 3, 12):
            h = ours.hidden(full[:, t:t + 1], Cached(cache, slots, torch.full((2, 1), t, device=device), 16))
            got.append(ours.logits(h))
    assert (torch.cat(got, 1) - expect).abs().max().item() <= 1e-4


def test_hub_config_dialect_loads_the_same_model(tiny_checkpoint):
    folder = tiny_checkpoint(rope_theta=1_000_000.0)
    cfg = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in cfg  # transformers 5 dialect as written by save_pretrained
    expect = load_model(folder, dtype=torch.float32)
    # Rewrite in the dialect the Hub's Qwen2.5 files use (written by transformers 4.43).
    hub = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype", "layer_types")}
    hub |= {"rope_theta": cfg["rope_parameters"]["rope_theta"], "torch_dtype": "bfloat16",
            "sliding_window": 32768, "max_window_layers": 21, "use_sliding_window": False}
    (folder / "config.json").write_text(json.dumps(hub))
    got = load_model(folder, dtype=torch.float32)
    assert got.config == expect.config and got.config.rope_theta == 1_000_000.0
    ids = torch.randint(0, 160, (1, 8))
    with torch.no_grad():
        assert torch.equal(got(ids), expect(ids))


def test_rope_scaling_is_refused():
    with pytest.raises(UserError, match="rope scaling"):
        Qwen2Config.from_dict(dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1, rope_scaling={"type": "yarn"}))


def sharded(tiny_checkpoint) -> Path:
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint(tie_word_embeddings=False)
    out = src.parent / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="20KB")
    return out


def test_sharded_checkpoint_loads(tiny_checkpoint):
    folder = sharded(tiny_checkpoint)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert (folder / "model.safetensors.index.json").exists() and len(shards) >= 3
    ours, ref = load_model(folder, dtype=torch.float32), reference(folder)
    ids = torch.randint(0, 160, (2, 6))
    with torch.no_grad():
        assert (ours(ids) - ref(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_truncated_and_missing_shards_fail_with_file_name(tiny_checkpoint):
    folder = sharded(tiny_checkpoint)
    shards = sorted(folder.glob("model-*.safetensors"))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=shards[1].name) as err:
        load_model(folder)
    assert "\n" not in str(err.value)
    shards[2].unlink()
    with pytest.raises(UserError, match=f"missing checkpoint shard .*{shards[2].name}"):
        load_model(folder)


def test_bf16_load_keeps_no_fp32_copy(tiny_checkpoint):
    model = load_model(tiny_checkpoint(), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_projections_share_one_buffer_and_stay_exact(tiny_checkpoint):
    """After loading, and after a cast, each block's q/k/v and gate/up weights (and biases) are views of
    one buffer (`project` runs each group as one GEMM), under their own names and with the checkpoint's
    values; a layer whose weight was replaced makes its group run layer by layer, with the same logits."""
    from safetensors.torch import load_file

    from src.model import fused_weights

    folder = tiny_checkpoint(tie_word_embeddings=False)
    model = load_model(folder, dtype=torch.float32)

    def groups():
        return [[b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj] for b in model.model.layers] + \
            [[b.mlp.gate_proj, b.mlp.up_proj] for b in model.model.layers]

    assert all(fused_weights(g) is not None for g in groups())
    saved = load_file(str(folder / "model.safetensors"))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in saved.items()}
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    ids = torch.randint(0, 160, (2, 7))
    with torch.no_grad():
        want = model(ids)
        model.to(torch.float64)
        assert all(fused_weights(g) is not None for g in groups())
        assert (model(ids).float() - want).abs().max().item() <= 1e-5
        model.to(torch.float32)
        q = model.model.layers[0].self_attn.q_proj
        q.weight = torch.nn.Parameter(q.weight.detach().clone(), requires_grad=False)
        assert fused_weights(groups()[0]) is None and fused_weights(groups()[1]) is not None
        assert torch.equal(model(ids), want)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "src.cli", *args], capture_output=True, text=True,
                          cwd=cwd or Path(__file__).parents[1], env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_unknown_size_is_one_line_listing_valid_sizes():
    result = run_cli("chat", "--size", "9b")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown size '9b'; valid sizes: 0.5b, 1.5b, 3b, 7b, 14b, 32b"


def test_missing_checkpoint_folder_is_one_line(tmp_path):
    result = run_cli("chat", "--model-path", str(tmp_path / "nope"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0 and "chat" in result.stdout


@pytest.mark.parametrize("ours_first", [True, False])
def test_our_kernels_folder_is_not_taken_for_the_kernels_package(ours_first):
    """transformers imports the PyPI package `kernels` where it is installed (a requirement from 5.25 on) and
    probes for it where not; with the project root first on sys.path, as under `python -m` and pytest, our
    kernels/ must neither shadow it nor pass for it, whichever side is imported first."""
    pytest.importorskip("triton")
    root = Path(__file__).parents[1]
    ours = "from src.fused import kernel; assert kernel('rmsnorm').rms_norm"
    theirs = "from transformers import Qwen2ForCausalLM; from transformers.utils import is_kernels_available"
    code = "\n".join([
        f"import sys; sys.path.insert(0, {str(root)!r})", *([ours, theirs] if ours_first else [theirs, ours]),
        "import importlib.util as u; spec = u.find_spec('kernels')",
        "print(is_kernels_available(), spec is not None and spec.origin is not None and "
        f"spec.origin.startswith({str(root / 'kernels')!r}))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    available, shadowed = out.stdout.split()
    assert shadowed == "False"
    assert available == str(importlib.util.find_spec("kernels") is not None and
                            importlib.util.find_spec("kernels").origin is not None)
