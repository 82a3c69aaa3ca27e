"""LoRA adapters as plain modules, stored in PEFT's file format.

`apply_lora` swaps each targeted `nn.Linear` for a `LoraLinear` that keeps the frozen base weight
under the same name (`q_proj.weight`) and adds trainable `lora_A` [r, in] and `lora_B` [out, r].
The forward equals PEFT's: the base output in the model dtype, plus `B(A(x)) * alpha / r` computed
in the adapter dtype (float32 over a bf16 base), the sum cast back to the base output's dtype
(except on CUDA with a narrower base dtype, where `_FastLora` rounds the update to bf16).

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
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

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
    """A frozen linear layer plus low-rank updates `B @ A` scaled by alpha / rank, one per student.

    `lora_A` [S, r, in] and `lora_B` [S, out, r] hold S adapters over the same base (S = 1 for one
    student). With S > 1 the tokens of a call are S equal-length segments, segment s for adapter s,
    so a cohort of students trains in one pass over the shared base weights (src/train.py).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, students: int = 1) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # PEFT upcasts bf16/fp16 adapters to float32 and leaves wider ones alone.
        dtype = torch.promote_types(base.weight.dtype, torch.float32)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(students, rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(students, base.out_features, rank, dtype=dtype, device=device))
        self.low: tuple[Tensor, Tensor] | None = None  # A and B in the input dtype while `adapters_cast_once` holds
        self.group_low: tuple[Tensor, Tensor] | None = None  # the same for the group this layer leads (`grouped`)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.dtype != self.lora_A.dtype:
            return _FastLora.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale, self.low)
        out = F.linear(x, self.weight, self.bias)
        xs = x.reshape(self.lora_A.shape[0], -1, x.shape[-1]).to(self.lora_A.dtype)
        delta = torch.bmm(torch.bmm(xs, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2)) * self.scale
        return (out + delta.view(out.shape)).to(out.dtype)

    def tail(self) -> Tensor | None:
        """The extra columns after this layer's base weight in its group's buffer (`fuse`), where the
        group's B factors go (`extra_columns`); None where the weight has none."""
        w = self.weight
        extra = w.stride(0) - w.shape[1]
        if w.dim() != 2 or w.stride(1) != 1 or extra <= 0:
            return None
        return w.as_strided((w.shape[0], extra), (w.stride(0), 1), w.storage_offset() + w.shape[1])

    @staticmethod
    def extra_columns(layers: Sequence[nn.Module]) -> int:
        """How many columns a group's fused weight buffer keeps after the base weights: S n r (students x
        layers x rank) for LoRA layers of one kind whose outputs together are at least `WIDE` times their
        input (gate/up), so that [x | x A^T] @ [W | B]^T gives base output and update in one GEMM (K grows
        by S n r) instead of adding the update onto the whole output afterwards; 0 otherwise (q/k/v: the
        copy of x into the wider input costs about what it saves)."""
        if not all(isinstance(m, LoraLinear) for m in layers) or len(_kinds(layers)) != 1:
            return 0
        first = layers[0]
        outputs = sum(m.weight.shape[0] for m in layers)
        return first.lora_A.shape[0] * len(layers) * first.rank if outputs >= WIDE * first.weight.shape[1] else 0

    @staticmethod
    def grouped(layers: Sequence["LoraLinear"], x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """LoRA layers that read the same input, on their base weights fused into one (`weight` [sum of
        outputs, in + extra columns], `bias`): the outputs side by side, through one GEMM for the bases and
        one low-rank update (`_FastLoraGroup`). None where the GPU fast path does not apply (CPU or float32,
        where each layer computes PEFT's float32 update) or the adapters differ in count, rank or scale."""
        first = layers[0]
        if not (x.is_cuda and x.dtype != first.lora_A.dtype) or len(_kinds(layers)) != 1:
            return None
        a, b = first.group_low or _group_low([layers], x.dtype)[0]
        if b is not None:
            weight = weight[:, :x.shape[-1]]
        widths = tuple(m.lora_B.shape[1] for m in layers)
        return _FastLoraGroup.apply(x, weight, bias, a, b, first.scale, widths,
                                    *[m.lora_A for m in layers], *[m.lora_B for m in layers])

    def to_linear(self) -> nn.Linear:
        """The base layer alone (the adapter dropped, nothing merged)."""
        with torch.device("meta"):
            linear = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None)
        linear.weight, linear.bias = self.weight, self.bias
        return linear


WIDE = 2  # a group's outputs over its input from which its B factors sit in its weight buffer (`extra_columns`)


def _kinds(layers: Sequence[nn.Module]) -> set[tuple]:
    return {(m.lora_A.shape[0], m.rank, m.scale, m.lora_A.dtype) for m in layers}


def _wide(layers: Sequence[LoraLinear]) -> bool:
    """Whether the group's B factors live in its weight buffer's extra columns (`extra_columns`)."""
    tail = layers[0].tail()
    return tail is not None and tail.shape[1] == LoraLinear.extra_columns(layers)


class _FastLora(torch.autograd.Function):
    """GPU fast path of `LoraLinear`: base + low-rank update in the base dtype, with a hand-written
    backward (a handful of GEMMs, no casts of activations, no [tokens, out] float32 temporaries).

    It differs from PEFT's float32 update only by bf16 rounding of the update: x @ A^T and its
    product with B run as bf16 GEMMs with float32 accumulation, added onto the base output by one
    batched GEMM-with-add; the adapter gradients are bf16 GEMMs written out in float32.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float,
                low: tuple[Tensor, Tensor] | None) -> Tensor:
        students, width = lora_a.shape[0], x.shape[-1]
        a, b = low if low is not None else (lora_a.to(x.dtype), lora_b.to(x.dtype))
        out = F.linear(x, weight, bias)
        xs = x.reshape(students, -1, width)
        xa = torch.bmm(xs, a.transpose(1, 2))
        if scale != 1.0:
            xa = xa * scale
        out = out.view(students, -1, out.shape[-1]).baddbmm_(xa, b.transpose(1, 2)).view(out.shape)  # in place: no copy of out
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scale, ctx.adapter_dtype = scale, lora_a.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, a, b, xa = ctx.saved_tensors
        students = a.shape[0]
        g = grad.reshape(students, -1, grad.shape[-1])
        gb = torch.bmm(g, b)  # [S, L, r]: the upstream gradient through B
        if ctx.scale != 1.0:
            gb = gb * ctx.scale
        grad_x = None
        if ctx.needs_input_grad[0]:  # the update first, then the base GEMM adds onto it in its epilogue: where the
            # input is wide (down_proj) this saves a pass over grad_x (bitwise the same as adding the update after)
            grad_x = torch.bmm(gb, a).view(-1, x.shape[-1]).addmm_(grad.reshape(-1, grad.shape[-1]), weight).view(x.shape)
        # bf16 products written straight out in the adapter dtype (float32 accumulation either way)
        grad_a = torch.bmm(gb.transpose(1, 2), x.reshape(students, -1, x.shape[-1]), out_dtype=ctx.adapter_dtype)
        grad_b = torch.bmm(g.transpose(1, 2), xa, out_dtype=ctx.adapter_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


class _FastLoraGroup(torch.autograd.Function):
    """`_FastLora` for n LoRA layers that read the same input (q/k/v, gate/up) over their fused base weight,
    one autograd node: one x @ A^T for all n adapters (A stacked: `a` [S, n r, in]), and the update either
    (`b` given) one more GEMM through a block-diagonal B (`b` [S, sum of outputs, n r]) added onto the base
    output, or (`b` None) inside the base GEMM itself: `weight` then carries each student's block-diagonal
    B in S n r extra columns (`LoraLinear.extra_columns`), the input gets x A^T of each row's own student
    in the matching ones (zeros elsewhere), and in backward the same wide weight gives the input gradient
    and the gradient through B in one GEMM. `adapters` (the layers' lora_A, then lora_B) are inputs only to
    receive gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor | None, scale: float,
                widths: tuple[int, ...], *adapters: Tensor) -> Tensor:
        students, low, width = a.shape[0], a.shape[1], x.shape[-1]
        rows = x.reshape(students, -1, width)
        xa = torch.bmm(rows, a.transpose(1, 2))
        if scale != 1.0:
            xa = xa * scale
        if b is None:
            wide = x.new_empty(*x.shape[:-1], weight.shape[1])
            wide[..., :width].copy_(x)
            tail = wide[..., width:]
            if students > 1:
                tail.zero_()
            tail.view(students, -1, students, low).diagonal(0, 0, 2).copy_(xa.permute(1, 2, 0))
            out = F.linear(wide, weight, bias)
            x = wide[..., :width]
        else:
            out = F.linear(x, weight, bias)
            out = out.view(students, -1, out.shape[-1]).baddbmm_(xa, b.transpose(1, 2)).view(out.shape)  # in place: no copy of out
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.scale, ctx.widths, ctx.adapter_dtype = scale, widths, adapters[0].dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, a, b, xa = ctx.saved_tensors
        students, low, width = a.shape[0], a.shape[1], x.shape[-1]
        rank = low // len(ctx.widths)
        g = grad.reshape(students, -1, grad.shape[-1])
        if b is None:
            full = torch.matmul(grad, weight)  # [..., in + S n r]: input gradient, then the gradient through each B
            gb = full[..., width:].reshape(students, -1, students, low).diagonal(0, 0, 2).permute(2, 0, 1)
            base = full[..., :width]
        else:
            gb = torch.bmm(g, b)  # [S, L, n r]: each adapter's upstream gradient through its own B
            base = torch.matmul(grad, weight) if ctx.needs_input_grad[0] else None
        if ctx.scale != 1.0:
            gb = gb * ctx.scale
        xs = x.reshape(students, -1, width)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = base.reshape(xs.shape).baddbmm_(gb, a).view(x.shape)
        grad_a = torch.bmm(gb.transpose(1, 2), xs, out_dtype=ctx.adapter_dtype).split(rank, 1)
        # every layer's output gradient against every adapter's x A^T in one GEMM (n times the FLOPs of the n
        # products needed, a few MFLOP, for one launch instead of n); each B's gradient is its diagonal block
        every = torch.bmm(g.transpose(1, 2), xa, out_dtype=ctx.adapter_dtype)
        grad_b, start = [], 0
        for i, w in enumerate(ctx.widths):
            grad_b.append(every[:, start: start + w, i * rank: (i + 1) * rank])
            start += w
        return grad_x, None, None, None, None, None, None, *grad_a, *grad_b


def _group_low(groups: list[Sequence[LoraLinear]], dtype: torch.dtype,
               keep: Callable[[str, Tensor], Tensor] = lambda key, t: t) -> list[tuple[Tensor, Tensor | None]]:
    """For groups of the same shapes (one group per block), each group's stacked A [S, n r, in] in `dtype`
    and its block-diagonal B [S, sum of outputs, n r] (`_FastLoraGroup`), built for all groups in 2 + 2n
    launches (`keep` places the whole tensors, see `adapters_cast_once`); where the groups keep B in their
    weight buffers (`_wide`), B is written there instead (one copy a layer) and returned as None."""
    first = groups[0]
    students, rank, n = first[0].lora_A.shape[0], first[0].rank, len(first)
    a = keep("a", torch.cat([m.lora_A.detach() for group in groups for m in group], 1).to(dtype))
    a = [a[:, j * n * rank: (j + 1) * n * rank] for j in range(len(groups))]
    if _wide(first):
        with torch.no_grad():
            for group in groups:
                for i, m in enumerate(group):  # student s, layer i: columns (s n + i) r ... of the tail
                    tail = m.tail().view(m.weight.shape[0], students, n * rank)[..., i * rank: (i + 1) * rank]
                    tail.copy_(m.lora_B.detach().transpose(0, 1))
        return [(a_j, None) for a_j in a]
    widths = [m.lora_B.shape[1] for m in first]
    b = torch.zeros(students, len(groups), sum(widths), n * rank, dtype=dtype, device=a[0].device)
    start = 0
    for i, w in enumerate(widths):
        b[:, :, start: start + w, i * rank: (i + 1) * rank] = torch.stack([group[i].lora_B.detach() for group in groups], 1)
        start += w
    b = keep("b", b)
    return [(a_j, b[:, j]) for j, a_j in enumerate(a)]


def lora_groups(model: nn.Module) -> list[list[LoraLinear]]:
    """The model's LoRA layers that read the same input, as its modules declare them (`shared_input`)."""
    groups = []
    for module in model.modules():
        for names in getattr(module, "shared_input", ()):
            layers = [getattr(module, n) for n in names]
            if all(isinstance(m, LoraLinear) for m in layers):
                groups.append(layers)
    return groups


@contextmanager
def adapters_cast_once(model: nn.Module, dtype: torch.dtype, keep: dict[str, Tensor] | None = None):
    """Within: every LoRA layer's GPU fast path uses copies of its A and B in `dtype` made on entry, in
    a few launches for the whole model, instead of casting them in every forward pass (2 launches a
    layer and pass); layers that read the same input get their group's stacked A and block-diagonal B
    (`_group_low`). The adapters must not change inside: the trainer holds it over one optimizer
    step's passes, before the update. With `keep` (a dict the caller holds from one call to the next)
    the copies are written into the previous call's tensors, so their addresses stay fixed (a CUDA
    graph of the passes reads them there, src/passes.py)."""
    def fast(m: LoraLinear) -> bool:
        return m.weight.is_cuda and m.lora_A.dtype != dtype

    def kept(key: str, fresh: Tensor) -> Tensor:
        if keep is None:
            return fresh
        old = keep.get(key)
        if old is None or (old.shape, old.dtype, old.device) != (fresh.shape, fresh.dtype, fresh.device):
            keep[key] = fresh
            return fresh
        return old.copy_(fresh)

    groups = [g for g in lora_groups(model) if all(fast(m) for m in g)]
    grouped = {id(m) for g in groups for m in g}
    layers = [m for m in lora_modules(model).values() if fast(m) and id(m) not in grouped]
    tensors = [t.detach() for m in layers for t in (m.lora_A, m.lora_B)]
    if tensors:
        flat = kept("layers", torch.cat([t.flatten() for t in tensors]).to(dtype))
        low = [piece.view(t.shape) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
        for i, m in enumerate(layers):
            m.low = (low[2 * i], low[2 * i + 1])
    kinds: dict[tuple, list[list[LoraLinear]]] = {}
    for g in groups:
        kinds.setdefault(tuple((m.lora_A.shape, m.lora_B.shape, m.lora_A.dtype) for m in g), []).append(g)
    for kind, same in enumerate(kinds.values()):
        for g, low in zip(same, _group_low(same, dtype, lambda key, t: kept(f"group {kind} {key}", t))):
            g[0].group_low = low
    try:
        yield
    finally:
        for m in layers:
            m.low = None
        for g in groups:
            g[0].group_low = None


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters, A then B per layer in module order (the optimizer's order)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _refit_buffers(model: nn.Module) -> None:
    """Give the model's fused weight buffers the extra columns its adapters now ask for (`extra_columns`;
    a model without fused projections has none)."""
    refit = getattr(model, "fuse_projections", None)
    if refit is not None:
        refit()


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter, restoring the plain base layers (e.g. to evaluate the base model again)."""
    for name, module in lora_modules(model).items():
        _replace(model, name, module.to_linear())
    _refit_buffers(model)
    return model


def _targeted(name: str, targets: tuple[str, ...] | list[str] | str) -> bool:
    """PEFT's matching: a list names module suffixes, a string is a regex matched on the full path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name.rpartition(".")[2] in targets


def apply_lora(model: nn.Module, rank: int = TRAIN.lora_rank, alpha: float = TRAIN.lora_alpha,
               targets: tuple[str, ...] | list[str] | str = TRAIN.lora_targets,
               seed: int | None | Sequence[int] = 0) -> nn.Module:
    """Freeze the model and wrap every targeted linear layer with LoRA adapters, in place.

    `seed` draws A as PEFT does after `torch.manual_seed(seed)`, B zero; None leaves A and B zero
    (for loading weights). A list of seeds makes one adapter per seed (a cohort, see LoraLinear),
    each drawn from its own seed's stream. An existing adapter is replaced.
    """
    seeds = list(seed) if isinstance(seed, Sequence) else [seed]
    remove_lora(model)
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _targeted(n, targets)]
    if not names:
        raise UserError(f"no linear layer of the model matches the LoRA targets {targets!r}")
    generators = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    for name in names:
        base = model.get_submodule(name)
        layer = LoraLinear(base, rank, alpha, students=len(seeds))
        for student, generator in enumerate(generators):
            if generator is None:
                continue
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear(in, r) default init
            nn.init.kaiming_uniform_(torch.empty(base.out_features, rank), a=math.sqrt(5), generator=generator)  # B's, discarded
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # PEFT's reset of A
            with torch.no_grad():
                layer.lora_A[student].copy_(a.to(base.weight.dtype))  # through the base dtype, as PEFT moves it
        _replace(model, name, layer)
    _refit_buffers(model)
    return model


def lora_state_dict(model: nn.Module, student: int = 0) -> dict[str, Tensor]:
    """One student's adapter tensors (views) under PEFT's saved key names (`base_model.model.<path>.lora_A.weight`)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()[student]
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach()[student]
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


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str, student: int = 0) -> Path:
    """Write one student's adapter as PEFT does (adapter_config.json + adapter_model.safetensors), atomically."""
    config = adapter_config(model, base_model_name_or_path)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model, student).items()}

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
