"""LoRA adapters as plain modules, stored in PEFT's file format.

`apply_lora` swaps each targeted `nn.Linear` for a `LoraLinear` that keeps the frozen base weight
under the same name (`q_proj.weight`) and adds trainable `lora_A` [r, in] and `lora_B` [out, r].
The forward equals PEFT's: the base output in the model dtype, plus `B(A(x)) * alpha / r` computed
in the adapter dtype (float32 over a bf16 base), the sum cast back to the base output's dtype
(except on CUDA with a narrower base dtype, where a faster bf16 path rounds the update; see `forward`).

Initialisation reproduces PEFT's random stream: after `torch.manual_seed(seed)` (TRL seeds just
before `get_peft_model`) PEFT builds `nn.Linear(in, r)` and `nn.Linear(r, out)` per target (each
drawing its default init), then redraws A Kaiming-uniform (a=sqrt(5)) and zeroes B; it creates them
in float32 on the CPU and casts them to the base dtype before upcasting to float32 again. Doing the
same draws in the same module order gives bitwise the same initial adapter for the same seed.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .constants import TRAIN
from .errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the causal LM


class LoraLinear(nn.Module):
    """A frozen linear layer plus a low-rank update `B @ A` scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # PEFT upcasts bf16/fp16 adapters to float32 and leaves wider ones alone.
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        if x.is_cuda and x.dtype != self.lora_A.dtype:
            # GPU fast path: the low-rank update in the base dtype (bf16 GEMMs, the scale folded into
            # the rank-r intermediate, added by one addmm) instead of PEFT's float32 copies of x and
            # of the [tokens, out] update; it differs from PEFT only by bf16 rounding of the update.
            xa = F.linear(x, self.lora_A.to(x.dtype)) * self.scale
            flat = torch.addmm(out.reshape(-1, out.shape[-1]), xa.reshape(-1, self.rank), self.lora_B.to(x.dtype).t())
            return flat.view(out.shape)
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale
        return (out + delta).to(out.dtype)

    def to_linear(self) -> nn.Linear:
        """The base layer alone (the adapter dropped, nothing merged)."""
        with torch.device("meta"):
            linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, A then B per layer in module order (the optimizer's order)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter, restoring the plain base layers (e.g. to evaluate the base model again)."""
    for name, module in lora_modules(model).items():
        _replace(model, name, module.to_linear())
    return model


def _targeted(name: str, targets: tuple[str, ...] | list[str] | str) -> bool:
    """PEFT's matching: a list names module suffixes, a string is a regex matched on the full path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name.rpartition(".")[2] in targets


def apply_lora(model: nn.Module, rank: int = TRAIN.lora_rank, alpha: float = TRAIN.lora_alpha,
               targets: tuple[str, ...] | list[str] | str = TRAIN.lora_targets, seed: int | None = 0) -> nn.Module:
    """Freeze the model and wrap every targeted linear layer with a LoRA adapter, in place.

    `seed` draws A as PEFT does after `torch.manual_seed(seed)`, B zero; None leaves A and B zero
    (for loading weights). An existing adapter is replaced.
    """
    remove_lora(model)
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _targeted(n, targets)]
    if not names:
        raise UserError(f"no linear layer of the model matches the LoRA targets {targets!r}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for name in names:
        base = model.get_submodule(name)
        layer = LoraLinear(base, rank, alpha)
        if generator is not None:
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear(in, r) default init
            nn.init.kaiming_uniform_(torch.empty(base.out_features, rank), a=math.sqrt(5), generator=generator)  # B's, discarded
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's reset of A
            with torch.no_grad():
                layer.lora_A.copy_(a.to(base.weight.dtype))  # through the base dtype, as PEFT moves it
        _replace(model, name, layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors under PEFT's saved key names (`base_model.model.<path>.lora_A.weight`)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()
    return out


def adapter_config(model: nn.Module, base_model_name_or_path: str) -> dict:
    """PEFT's adapter_config.json fields for this model's adapter (unlisted fields take PEFT defaults)."""
    modules = list(lora_modules(model).items())
    if not modules:
        raise ValueError("the model has no LoRA adapter")
    ranks = {(m.rank, m.alpha) for _, m in modules}
    if len(ranks) != 1:
        raise ValueError("adapters of mixed rank or alpha cannot be saved in one PEFT config")
    (rank, alpha), = ranks
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": 0.0,
        "target_modules": sorted({n.rpartition(".")[2] for n, _ in modules}), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "revision": None,
    }


def write_dir_atomically(folder: Path, write) -> Path:
    """Fill a temporary sibling folder with `write(tmp)`, then swap it into place (replacing any old one)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str) -> Path:
    """Write the adapter as PEFT does (adapter_config.json + adapter_model.safetensors), atomically."""
    config = adapter_config(model, base_model_name_or_path)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

    return write_dir_atomically(Path(folder), write)


def is_adapter(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_adapter_config(folder: str | Path) -> dict:
    """The config of a PEFT LoRA adapter folder; anything this module cannot reproduce is an error."""
    folder = Path(folder)
    if not is_adapter(folder):
        raise UserError(f"{folder} is not an adapter folder ({CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt {folder / CONFIG_FILE}: {exc}") from None
    unsupported = {
        "peft_type": config.get("peft_type") != "LORA", "bias": config.get("bias", "none") != "none",
        "use_dora": bool(config.get("use_dora")), "use_rslora": bool(config.get("use_rslora")), "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "modules_to_save": bool(config.get("modules_to_save")), "lora_bias": bool(config.get("lora_bias")),
        "rank_pattern": bool(config.get("rank_pattern")), "alpha_pattern": bool(config.get("alpha_pattern")),
        "layers_to_transform": config.get("layers_to_transform") is not None,
        "layer_replication": config.get("layer_replication") is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad or not config.get("target_modules"):
        raise UserError(f"adapter {folder} uses LoRA features this library does not support: {bad or ['target_modules']}")
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply the PEFT LoRA adapter in `folder` (ours or PEFT's) to `model`, unmerged, in place."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    apply_lora(model, rank=rank, alpha=alpha, targets=config["target_modules"], seed=None)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"corrupt adapter weights {folder / WEIGHTS_FILE}: {exc}") from None
    expected = lora_state_dict(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"adapter {folder} does not fit the model: "
                        + (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"))
    with torch.no_grad():
        for key, target in expected.items():
            if tensors[key].shape != target.shape:
                raise UserError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                f"expected {tuple(target.shape)}")
            target.copy_(tensors[key])
    return model
