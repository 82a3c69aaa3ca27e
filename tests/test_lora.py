"""Our LoRA against PEFT's: initialisation from a seed, layer outputs in float32 and bf16, and adapter
files both ways (PEFT loads ours, we load PEFT's) with equal logits."""
from __future__ import annotations

import json

import pytest
import torch

from src import UserError, apply_lora, load_adapter, load_model, lora_state_dict, remove_lora, save_adapter
from src.constants import TRAIN
from src.lora import LoraLinear, lora_parameters

TARGETS = list(TRAIN.lora_targets)


def peft_model(folder, dtype, seed, **config):
    """transformers' model of `folder` wrapped by PEFT right after torch.manual_seed(seed), as TRL does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    torch.manual_seed(seed)
    lora = LoraConfig(**{"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": TARGETS,
                         "task_type": "CAUSAL_LM"} | config)
    return get_peft_model(hf, lora).eval()


def peft_lora_tensors(model) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors under their saved names (adapter name dropped)."""
    return {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_and_layer_output_equal_peft(tiny_checkpoint, dtype):
    folder = tiny_checkpoint()
    ref = peft_model(folder, dtype, seed=11)
    ours = apply_lora(load_model(folder, dtype=dtype), seed=11)
    theirs, mine = peft_lora_tensors(ref), lora_state_dict(ours)
    assert set(theirs) == set(mine) and len(mine) == 2 * 7 * 2
    for key in mine:
        assert mine[key].dtype == theirs[key].dtype == torch.float32
        assert torch.equal(mine[key], theirs[key]), key
    assert any(t.abs().sum() > 0 for k, t in mine.items() if "lora_A" in k)
    assert all(t.abs().sum() == 0 for k, t in mine.items() if "lora_B" in k)
    # a different seed draws a different adapter
    other = lora_state_dict(apply_lora(load_model(folder, dtype=dtype), seed=12))
    assert not torch.equal(other[next(iter(other))], mine[next(iter(mine))])

    # With a non-zero B, every adapted layer computes exactly what PEFT's computes (dtype casts included).
    torch.manual_seed(0)
    with torch.no_grad():
        for key in mine:
            if "lora_B" in key:
                value = torch.randn_like(mine[key])
                mine[key].copy_(value)
                theirs[key].copy_(value)
    base = ref.base_model.model
    for name, layer in ours.named_modules():
        if isinstance(layer, LoraLinear):
            x = torch.randn(3, 5, layer.weight.shape[1]).to(dtype)
            with torch.no_grad():
                expect = base.get_submodule(name)(x)
                got = layer(x)
            assert got.dtype == expect.dtype == dtype
            assert torch.equal(got, expect), name


def random_batch(vocab: int = 160):
    torch.manual_seed(5)
    ids = torch.randint(0, vocab, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_peft_loads_our_adapter(tiny_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = tiny_checkpoint(seed=2)
    ours = apply_lora(load_model(folder, dtype=torch.float32), seed=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.add_(torch.randn_like(p) * 0.1)
    save_adapter(ours, tmp_path / "adapter", "Qwen/Qwen2.5-0.5B-Instruct")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (8, 8, "CAUSAL_LM")
    assert sorted(config["target_modules"]) == sorted(TARGETS)

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                    tmp_path / "adapter").eval()
    theirs, mine = peft_lora_tensors(ref), lora_state_dict(ours)
    assert set(theirs) == set(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
    ids, mask = random_batch()
    with torch.no_grad():
        expect = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
        plain = remove_lora(ours)(ids, attention_mask=mask)
    valid = mask.bool()
    assert (got[valid] - expect[valid]).abs().max() <= 1e-4
    assert (plain[valid] - expect[valid]).abs().max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("targets", [TARGETS, ["q_proj", "v_proj", "up_proj"]])
def test_we_load_peft_adapter(tiny_checkpoint, tmp_path, targets):
    """Also an adapter on some layers of a fused group (q and v, not k; up, not gate): those groups run
    layer by layer."""
    folder = tiny_checkpoint(seed=3)
    ref = peft_model(folder, torch.float32, seed=6, init_lora_weights=False, target_modules=targets)  # B random
    ref.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(folder, dtype=torch.float32), tmp_path / "peft")
    ids, mask = random_batch()
    with torch.no_grad():
        expect = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
        plain = remove_lora(load_model(folder, dtype=torch.float32))(ids, attention_mask=mask)
    valid = mask.bool()
    assert (got[valid] - expect[valid]).abs().max() <= 1e-4
    assert (plain[valid] - expect[valid]).abs().max() > 1e-2
    # loading again replaces the adapter instead of stacking a second one
    again = load_adapter(ours, tmp_path / "peft")
    assert len(lora_state_dict(again)) == len(peft_lora_tensors(ref))
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask), got)


def test_load_adapter_rejects_bad_folders(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint()
    model = load_model(folder, dtype=torch.float32)
    with pytest.raises(UserError, match="not an adapter folder"):
        load_adapter(model, tmp_path)
    save_adapter(apply_lora(load_model(folder, dtype=torch.float32), seed=0), tmp_path / "a", "x")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"r": 4}))
    with pytest.raises(UserError, match="shape"):
        load_adapter(model, tmp_path / "a")
    other = tiny_checkpoint(num_hidden_layers=3)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="missing"):
        load_adapter(load_model(other, dtype=torch.float32), tmp_path / "a")


def test_adapters_widen_the_gate_up_buffer(tiny_checkpoint):
    """With adapters (a cohort of 2, rank 8) the gate/up weights share a buffer with 2 x 2 x 8 zero columns
    after them, where the GPU path keeps B (`LoraLinear.extra_columns`); q/k/v, whose outputs are not twice
    their input, get none. Base weights keep their values and the model its outputs, also after a cast;
    removing the adapters takes the columns away again."""
    from safetensors.torch import load_file

    from src.model import fused_weights

    folder = tiny_checkpoint()
    model = load_model(folder, dtype=torch.float32)
    ids = torch.randint(0, 160, (2, 7))
    with torch.no_grad():
        want = model(ids)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    hidden = attn.q_proj.weight.shape[1]

    def columns(group):
        return fused_weights(group)[0].shape[1]

    apply_lora(model, seed=[0, 1])  # B zero: the same outputs
    qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    assert columns(gate_up) == hidden + 2 * 2 * 8 and columns(qkv) == hidden
    assert mlp.up_proj.tail().shape == (mlp.up_proj.weight.shape[0], 32) and attn.q_proj.tail() is None
    assert not fused_weights(gate_up)[0][:, hidden:].any()
    with torch.no_grad():
        assert torch.equal(model(ids), want)
        model.to(torch.float64)
        assert columns(gate_up) == hidden + 32
        assert (model(ids).float() - want).abs().max().item() <= 1e-5
        model.to(torch.float32)
    remove_lora(model)
    assert columns([mlp.gate_proj, mlp.up_proj]) == hidden and isinstance(mlp.up_proj, torch.nn.Linear)
    saved = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
