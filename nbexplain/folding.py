"""Eval-mode BatchNorm folded into the convolution that feeds it, for the length of one model pass."""
from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .hygiene import global_hooks, hooked

Pair = tuple[nn.Conv2d, nn.BatchNorm2d]


def after_fold(bn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a folded BatchNorm still does (nothing, or timm's fused activation), or None if it cannot
    be folded. Only exact types are trusted: a subclass may do more than normalise."""
    if "forward" in bn.__dict__ or getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return None
    if type(bn) is nn.BatchNorm2d:
        return _identity
    if type(bn).__name__ == "BatchNormAct2d" and type(bn).__module__.startswith("timm."):
        act = _out_of_place(bn.act)
        return lambda t: act(bn.drop(t))
    return None


def _out_of_place(act: nn.Module) -> nn.Module:
    """The activation of a folded BatchNormAct2d, writing a new tensor. Unfolded, an in-place activation
    rewrites the BN's own fresh output; folded, it would rewrite the conv's output, which autograd may hold
    for another op's backward (CoAtNet's batched input gradients failed)."""
    if getattr(act, "inplace", False) is True:
        act = copy.copy(act)
        act.inplace = False
    return act


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def find_pairs(model: nn.Module, run: Callable[[], object]) -> list[Pair]:
    """(conv, BN) pairs where the BN reads exactly the conv's output tensor, each module run once in
    ``run()``. A conv output that also feeds something else is not detected here: the caller compares
    the folded model's logits with the original's and drops every pair if they differ."""
    produced: dict[int, tuple[nn.Module, weakref.ref]] = {}
    calls: dict[nn.Module, int] = {}
    found: dict[nn.Module, nn.Module] = {}

    def conv_hook(conv, _inp, out):
        calls[conv] = calls.get(conv, 0) + 1
        produced[id(out)] = (conv, weakref.ref(out))    # a weak ref: a reused id of a freed tensor never matches

    def bn_hook(bn, args):
        calls[bn] = calls.get(bn, 0) + 1
        hit = produced.get(id(args[0])) if args else None
        if hit is not None and hit[1]() is args[0]:
            found[bn] = hit[0]

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and not parametrize.is_parametrized(m):
                handles.append(m.register_forward_hook(conv_hook))
            elif after_fold(m) is not None:
                handles.append(m.register_forward_pre_hook(bn_hook))
        run()
    finally:
        for h in handles:
            h.remove()
    return [(conv, bn) for bn, conv in found.items()
            if calls[conv] == 1 and calls[bn] == 1 and bn.num_features == conv.out_channels]


def folded_weights(pairs: list[Pair]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """W·s and (b − μ)·s + β with s = γ/√(σ² + ε), from the current parameters (never cached: a
    user who trains between calls, even through ``p.data``, gets maps of the new weights). None for a
    pair that can no longer be folded (its BN lost its running statistics since the probe)."""
    out = []
    with torch.no_grad():
        for conv, bn in pairs:
            if after_fold(bn) is None:
                out.append(None)
                continue
            w = conv.weight
            dt = torch.promote_types(w.dtype, torch.float32)   # fp16/bf16 weights are folded in fp32
            scale = (bn.running_var.to(dt) + bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight.to(dt)
            shift = -bn.running_mean.to(dt) * scale
            if conv.bias is not None:
                shift = shift + conv.bias.to(dt) * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(dt)
            out.append(((w.to(dt) * scale.view(-1, 1, 1, 1)).to(w.dtype), shift.to(w.dtype)))
    return out


@contextmanager
def folded(pairs: list[Pair], weights: list[tuple[torch.Tensor, torch.Tensor] | None]) -> Iterator[int]:
    """Each conv computes conv + BN and its BN passes its input on; everything is put back on exit.

    A pair with a hook on either module stays as it is (a CAM reading that layer, or the user's own
    hook, sees what the unfolded model computes). Autograd keeps the folded weight it used, so the
    backward pass after this block is still the folded one. Yields how many pairs are folded."""
    if global_hooks():
        yield 0
        return
    saved = []
    try:
        for (conv, bn), wb in zip(pairs, weights):
            if wb is None or hooked(conv) or hooked(bn):
                continue
            saved.append((conv, bn, conv._parameters["weight"], conv._parameters["bias"]))
            conv._parameters["weight"], conv._parameters["bias"] = wb
            bn.forward = after_fold(bn)
        yield len(saved)
    finally:
        for conv, bn, w, b in saved:
            conv._parameters["weight"], conv._parameters["bias"] = w, b
            bn.__dict__.pop("forward", None)
