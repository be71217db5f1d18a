"""The model's input convolution, when the logits see the input only through it: a sum of input
gradients then crosses it once (IG's path, SmoothGrad's noise) instead of once per sample."""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .calls import call
from .speed import once_per_shape

_FOUND: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def input_stem(model: nn.Module, x: torch.Tensor, logits: torch.Tensor | None = None) -> nn.Conv2d | None:
    """The conv that reads the model's input tensor itself, if the logits depend on the input through it
    alone and it is affine (probed once per model and input shape: one batch-1 forward, two without
    ``logits``, the plain model's logits at ``x``).

    Its input gradient is then Jᵀ·(gradient at its output) with a constant J, so Σₖ wₖ·∂f/∂xₖ is Jᵀ applied
    to Σₖ wₖ·∂f/∂hₖ: one backward of the stem for the sum, not one per sample. A 3-channel input makes
    that backward the least efficient of the whole network (resnet50 on the CPU: 3x its forward, 4% of a
    forward + input backward).

    Found by feeding the model a NaN image and giving the first conv that receives it the real one: the
    logits then match the plain model's only if nothing else read the input's values.
    """
    if x.ndim != 4 or not x.is_floating_point():
        return None
    return once_per_shape(_FOUND, model, x, lambda: _probe(model, x[:1].detach(), None if logits is None else logits[:1]))


def _probe(model: nn.Module, x: torch.Tensor, ref: torch.Tensor | None) -> nn.Conv2d | None:
    poisoned = torch.full_like(x, float("nan"))
    seen: list[nn.Conv2d] = []

    def swap(conv, args):
        if args and args[0] is poisoned:
            seen.append(conv)
            return (x, *args[1:])
        if conv in seen:                 # the stem called again, on something else
            seen.append(conv)
        return None

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_pre_hook(swap) for m in convs]
    try:
        with torch.no_grad():
            ref = call(model, x) if ref is None else ref
            got = call(model, poisoned)
    except Exception:   # noqa: BLE001 - any failure means "no stem"; the real pass reports its own errors
        return None
    finally:
        for h in handles:
            h.remove()
    if len(seen) != 1 or "forward" in seen[0].__dict__ or not torch.isfinite(got).all() or got.shape != ref.shape:
        return None
    if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * max(float(ref.abs().max()), 1.0)):
        return None
    return seen[0] if _affine(seen[0], x) else None


def _affine(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """A Conv2d subclass may do more than convolve (timm's Conv2dSame only pads): check s(½u+½v) = ½s(u)+½s(v)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    u, v = (torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device) for _ in range(2))
    with torch.no_grad():
        mid, su, sv = conv(0.5 * u + 0.5 * v), conv(u), conv(v)
    return isinstance(mid, torch.Tensor) and torch.allclose(mid, 0.5 * (su + sv), rtol=1e-4, atol=1e-4)


@contextmanager
def summed_at_stem(stem: nn.Conv2d, images: int, weights: list[float]) -> Iterator[list]:
    """During the pass, the stem's output starts the autograd graph, and a copy of the stem for the first
    ``images`` samples is kept. Yields a list that ``input_gradient_sum`` reads after the pass.

    The stem's forward is swapped for the pass only (its weights are whatever the pass uses, folded or
    not), so no hook is added and BatchNorm folding still applies to it."""
    state: list = []

    def forward(inp: torch.Tensor) -> torch.Tensor:
        out = type(stem).forward(stem, inp)
        lead = inp[:images].detach().requires_grad_(True)
        state[:] = [out.detach().requires_grad_(True), lead, type(stem).forward(stem, lead), weights]
        return state[0].clone()    # a non-leaf: the model may apply an in-place ReLU to it

    stem.forward = forward
    try:
        yield state
    finally:
        stem.__dict__.pop("forward", None)
        state.clear()          # the chunk's stem output is not held through the next chunk's pass


def input_gradient_sum(state: list, score: torch.Tensor) -> torch.Tensor:
    """Σₖ wₖ·∂score/∂xₖ over the k copies of each image (copy-major batch, one weight per copy), through
    one stem backward."""
    start, lead, lead_out, weights = state
    (g,) = torch.autograd.grad(score, start)
    n = len(lead)
    # one copy at a time: a batch slice keeps the memory format, where a (k, N, ...) view of a
    # channels-last gradient would be copied and reduced along a strided axis (100 ms on resnet50)
    acc = torch.zeros_like(g[:n])
    for j, w in enumerate(weights):
        acc.add_(g[j * n:(j + 1) * n], alpha=w)
    (gx,) = torch.autograd.grad(lead_out, lead, acc)
    return gx
