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
    if not _foldable(bn):
        return None
    if type(bn) is nn.BatchNorm2d:
        return _identity
    act = _out_of_place(bn.act)
    return lambda t: act(bn.drop(t))


def _foldable(bn: nn.Module) -> bool:
    """Whether ``after_fold`` can fold ``bn``: an exact BatchNorm2d, or timm's BatchNormAct2d."""
    if "forward" in bn.__dict__ or getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return False
    return type(bn) is nn.BatchNorm2d or (type(bn).__name__ == "BatchNormAct2d"
                                         and type(bn).__module__.startswith("timm."))


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
    ``run()``, and no other module reads that tensor (MaxViT's stem: the next block's shortcut does; the
    modules that contain the BN pass it on). A conv output used by a plain function as well is not seen
    here: the caller compares the folded model's logits with the original's and drops every pair if
    they differ."""
    produced: dict[int, tuple[nn.Module, weakref.ref]] = {}
    calls: dict[nn.Module, int] = {}
    found: dict[nn.Module, nn.Module] = {}
    readers: dict[nn.Module, list[nn.Module]] = {}        # conv -> every module its output went into

    def conv_hook(conv, _inp, out):
        calls[conv] = calls.get(conv, 0) + 1
        produced[id(out)] = (conv, weakref.ref(out))    # a weak ref: a reused id of a freed tensor never matches

    def read(module, args):
        for a in args:
            hit = produced.get(id(a)) if isinstance(a, torch.Tensor) else None
            if hit is not None and hit[1]() is a:
                readers.setdefault(hit[0], []).append(module)

    def bn_hook(bn, args):
        calls[bn] = calls.get(bn, 0) + 1
        hit = produced.get(id(args[0])) if args else None
        if hit is not None and hit[1]() is args[0]:
            found[bn] = hit[0]

    handles = [nn.modules.module.register_module_forward_pre_hook(read)]
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
    holders = _holders(model)
    return [(conv, bn) for bn, conv in found.items()
            if calls[conv] == 1 and calls[bn] == 1 and bn.num_features == conv.out_channels
            and all(r is bn or r in holders[bn] for r in readers.get(conv, ()))]


def _holders(model: nn.Module) -> dict[nn.Module, set[nn.Module]]:
    """Each module's ancestors (the modules whose forward receives what they pass to it)."""
    holders: dict[nn.Module, set[nn.Module]] = {}

    def walk(module: nn.Module, above: set[nn.Module]) -> None:
        holders[module] = above
        for child in module.children():
            if child not in holders:
                walk(child, above | {module})

    walk(model, set())
    return holders


@contextmanager
def distinct_statistics(model: nn.Module) -> Iterator[None]:
    """Every foldable BatchNorm's running statistics moved (σ² by up to ±25%, μ by up to ±σ/4; seeded) until
    exit, for the probe that decides folding. A conv output that feeds its BN and something else (MaxViT's
    stem: the next block's shortcut) must not be folded, and the probe tells by comparing logits; but a fresh
    BN (μ = 0, σ² = 1) is the identity within its ε, so in random weights the folded model's logits moved
    by 1e-4 of their scale, under the tolerance, while its input gradients moved by 1e-3. A correct fold
    keeps the logits for any statistics. A hooked model keeps its statistics: its hooks see the probe."""
    gen = torch.Generator().manual_seed(0)
    saved = []
    hooks = global_hooks() or any(hooked(m) for m in model.modules())
    try:
        for bn in () if hooks else model.modules():
            if not _foldable(bn):
                continue
            mean, var = bn._buffers["running_mean"], bn._buffers["running_var"]
            grow = (0.75 + 0.5 * torch.rand(var.shape, generator=gen)).to(var)
            shift = (0.5 * torch.rand(mean.shape, generator=gen) - 0.25).to(mean)
            saved.append((bn, mean, var))
            bn._buffers["running_var"] = var * grow
            bn._buffers["running_mean"] = mean + shift * var.clamp(min=0).sqrt().to(mean)
        yield
    finally:
        for bn, mean, var in saved:
            bn._buffers["running_mean"], bn._buffers["running_var"] = mean, var


def folded_weights(pairs: list[Pair]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """W·s and (b − μ)·s + β with s = γ/√(σ² + ε), from the current parameters (never cached: a
    user who trains between calls, even through ``p.data``, gets maps of the new weights). None for a
    pair that can no longer be folded (its BN lost its running statistics since the probe). One fused
    op per step over all pairs (``torch._foreach_*``): EfficientNet-Lite0's 49 pairs fold in 2.8 ms, not
    the 4.9 ms of seven small ops per pair."""
    foldable = [_foldable(bn) for _, bn in pairs]
    live = [pair for pair, ok in zip(pairs, foldable) if ok]
    if not live:
        return [None] * len(pairs)
    # each pair in its conv's dtype promoted to fp32 at least (fp16/bf16 weights are folded in fp32 and cast
    # back); all fp32, the common case, converts nothing
    dts = [torch.promote_types(conv.weight.dtype, torch.float32) for conv, _ in live]
    same = all(dt == torch.float32 and bn.running_var.dtype == torch.float32 for dt, (_, bn) in zip(dts, live))
    low = any(dt != conv.weight.dtype for dt, (conv, _) in zip(dts, live))       # cast back

    def f32(ts: list) -> list:
        return ts if same else [t if t is None else t.to(dt) for t, dt in zip(ts, dts)]

    with torch.no_grad():
        scale = torch._foreach_add(f32([bn.running_var for _, bn in live]), [float(bn.eps) for _, bn in live])
        torch._foreach_rsqrt_(scale)
        _each(torch._foreach_mul_, scale, f32([bn.weight for _, bn in live]))
        shift = torch._foreach_mul(f32([bn.running_mean for _, bn in live]), scale)
        torch._foreach_neg_(shift)
        _each(torch._foreach_add_, shift, f32([conv.bias for conv, _ in live]), scale)
        _each(torch._foreach_add_, shift, f32([bn.bias for _, bn in live]))
        weights = torch._foreach_mul(f32([conv.weight for conv, _ in live]), [s.view(-1, 1, 1, 1) for s in scale])
    if low:
        weights = [w.to(conv.weight.dtype) for w, (conv, _) in zip(weights, live)]
        shift = [b.to(conv.weight.dtype) for b, (conv, _) in zip(shift, live)]
    made = zip(weights, shift)
    return [next(made) if ok else None for ok in foldable]


def _each(op, targets: list[torch.Tensor], values: list[torch.Tensor | None],
          times: list[torch.Tensor] | None = None) -> None:
    """``op(targets[i], values[i] (· times[i]))`` in place, over the pairs whose value is not None."""
    rows = [i for i, v in enumerate(values) if v is not None]
    if rows:
        vals = [values[i] for i in rows]
        op([targets[i] for i in rows], vals if times is None else torch._foreach_mul(vals, [times[i] for i in rows]))


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
