"""Cross-entropy of bf16/fp16 logits and its gradient, in one kernel that overwrites the logits.

Why: the LM head's loss on a chunk of 1,024 completion rows over 151,936 columns went through five
full-size passes (the float32 copy of the logits, log-softmax, the zero-filled gradient of the gather,
log-softmax's backward, the cast of the gradient back to bf16): ~3 GB of memory traffic a chunk. Here
each row is read twice (its max and sum of exponentials, then its gradient) and written once. The
arithmetic is the reference's: logits widened to float32 exactly, softmax in float32, the gradient
(softmax - one-hot) / normaliser rounded once to the logits' dtype; loss (logsumexp - target logit) /
normaliser in float32; a row whose target is `ignore` gets loss 0 and gradient 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096  # columns a program reads at a time
WARPS = 8


@triton.jit
def _nll_grad(logits_ptr, targets_ptr, norm_ptr, loss_ptr, vocab, stride, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    norm = tl.load(norm_ptr + row).to(tl.float32)
    live = target != IGNORE
    top = tl.full([BLOCK], -float("inf"), tl.float32)
    mass = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, vocab, BLOCK):  # per lane: running max and sum of exp(x - max)
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32)
        new = tl.maximum(top, x)
        mass = tl.where(new == -float("inf"), 0.0, mass * tl.exp(top - new) + tl.exp(x - new))
        top = new
    peak = tl.max(top, 0)
    lse = peak + tl.log(tl.sum(mass * tl.exp(top - peak), 0))
    picked = tl.load(base + tl.where(live, target, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(live, (lse - picked) / norm, 0.0))
    weight = tl.where(live, 1.0 / norm, 0.0)
    for v0 in range(0, vocab, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * weight
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < vocab)


def nll_grad_(logits: Tensor, targets: Tensor, normaliser: Tensor, ignore: int) -> Tensor:
    """Per-row loss -log softmax(logits)[target] / normaliser (float32 [R]) of logits [R, V]; the logits
    are overwritten with the gradient of the summed loss."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _nll_grad[(rows,)](logits, targets, normaliser, loss, vocab, logits.stride(0), IGNORE=ignore, BLOCK=BLOCK,
                           num_warps=WARPS)
    return loss
