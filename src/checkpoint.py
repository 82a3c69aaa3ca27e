"""Load Qwen2.5 checkpoints (local folder or Hub id) into our `Qwen2` without extra copies.

The model is built on the meta device and every tensor is read from safetensors straight into
the target dtype and device, one tensor at a time: 32B in bf16 fits an 80 GB GPU from a 128 GB
host because no full-precision (or even full CPU) copy of the model ever exists.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .constants import SIZES
from .errors import UserError
from .model import Qwen2, Qwen2Config

WEIGHT_PATTERNS = ["*.json", "*.safetensors"]


def resolve(name_or_path: str | Path, patterns: list[str] | None = None) -> Path:
    """A local folder as is; a study size ('7b') or Hub id ('Qwen/Qwen2.5-7B-Instruct') downloaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    repo = SIZES.get(name.lower(), name)
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    if repo.count("/") != 1 or looks_local:
        raise UserError(
            f"no checkpoint folder {name!r} and it is not a Hub id or size ({', '.join(SIZES)})"
        )
    from .hub import download

    return download(repo, patterns or WEIGHT_PATTERNS)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, through the shard index when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"corrupt shard index {index}: {exc}") from None
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UserError(f"no *.safetensors weights in {folder}")
    for f in files:
        if not f.exists():
            raise UserError(f"missing checkpoint shard {f}")
    return files


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> Qwen2:
    """Build `Qwen2` from a checkpoint; weights are frozen (requires_grad False)."""
    folder = resolve(name_or_path)
    cfg = Qwen2Config.from_file(folder / "config.json")
    with torch.device("meta"):
        model = Qwen2(cfg)
    params = dict(model.named_parameters())
    device = torch.device(device)
    loaded: set[str] = set()
    for file in weight_files(folder):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key not in params:
                        if key == "lm_head.weight" and cfg.tie_word_embeddings:
                            continue
                        raise UserError(f"unexpected weight {key!r} in {file}")
                    tensor = f.get_tensor(key).to(dtype)
                    if tensor.shape != params[key].shape:
                        raise UserError(f"weight {key!r} in {file} has shape {tuple(tensor.shape)}, "
                                        f"expected {tuple(params[key].shape)}")
                    _assign(model, key, tensor)
                    loaded.add(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise UserError(f"corrupt checkpoint file {file}: {str(exc).splitlines()[0]}") from None
    missing = sorted(set(params) - loaded)
    if missing:
        raise UserError(f"checkpoint {folder} lacks {len(missing)} weights, e.g. {missing[0]!r}")
    model.fuse_projections()  # the loaded q/k/v and gate/up weights into one buffer each, a group at a time
    model.eval()
    return model


def _assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def random_model(cfg: Qwen2Config, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 seed: int = 0) -> Qwen2:
    """A random-initialised model of the given shape (speed and memory runs; no checkpoint needed).

    Built directly in `dtype` on `device`, so a 32B stand-in never exists in float32 anywhere."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2(cfg)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.02, generator=generator) if p.dim() > 1 else p.zero_()
    model.requires_grad_(False)
    return model.eval()
