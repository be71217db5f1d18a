"""Occlusion: slide a patch over the image and record how much the class score drops."""
from __future__ import annotations

import math

import torch

from ..context import Context
from . import Param, register
from .baselines import make_baseline

FILLS = ("zeros", "black", "mean", "blur")
NOISE = 1e-5      # of the score: float32 passes in other batch sizes or on crops differ by ~1e-7 of it


def windows(size: int, patch: int, stride: int) -> list[int]:
    """Window starts along one axis, as captum places them: the last one may run past the edge."""
    patch = min(patch, size)
    return [i * stride for i in range(math.ceil((size - patch) / stride) + 1)]


@register("occlusion", kind="pixel", signed=True, reduce="mean",
          summary="Score drop when a square patch is replaced by the fill, averaged over the windows "
                  "covering each pixel (batched, no gradients; a CNN's first layers run on crops around "
                  "each patch).",
          reference="Zeiler & Fergus 2014",
          params=(Param("patch", "int", 16, "patch side in input pixels", 1, 512, 1),
                  Param("stride", "int", 8, "step between windows in pixels (≤ patch)", 1, 512, 1),
                  Param("fill", "choice", "zeros", "what replaces the patch: zeros (model input 0), "
                        "black pixels, the image's mean colour, or a blurred copy", choices=FILLS)))
def occlusion(ctx: Context, patch: int, stride: int, fill: str) -> torch.Tensor:
    if stride > patch:
        raise ValueError(f"occlusion: stride={stride} > patch={patch} would leave pixels unoccluded; "
                         "use stride <= patch")
    x, t = ctx.x, ctx.targets
    n, _, h, w = x.shape
    ph, pw = min(patch, h), min(patch, w)
    filled = make_baseline(x, fill, ctx.preprocess, param="fill")
    spots = [(y, xx) for y in windows(h, ph, stride) for xx in windows(w, pw, stride)]
    if len(spots) == 1:
        raise ValueError(f"occlusion: patch={patch} covers the whole {h}x{w} model input in one window, so "
                         f"every pixel would get the same score drop; use a smaller patch (e.g. "
                         f"patch={max(1, min(h, w) // 4)}, stride={max(1, min(h, w) // 8)})")
    base = ctx.logits.gather(1, t[:, None])[:, 0]            # the pass that chose the targets
    total = torch.zeros(n, 1, h, w, device=x.device)
    count = torch.zeros(1, 1, h, w, device=x.device)
    largest = torch.zeros(n, device=x.device)             # each image's largest |drop|
    per_chunk = max(1, ctx.batch_size // n)
    for i in range(0, len(spots), per_chunk):
        chunk = spots[i:i + per_chunk]
        xs = x.repeat(len(chunk), 1, 1, 1)
        for j, (y, xx) in enumerate(chunk):
            xs[j * n:(j + 1) * n, :, y:y + ph, xx:xx + pw] = filled[:, :, y:y + ph, xx:xx + pw]
        boxes = [(y, min(y + ph, h), xx, min(xx + pw, w)) for y, xx in chunk for _ in range(n)]
        scores = ctx.occluded_scores(xs, boxes, list(range(n)) * len(chunk), t.repeat(len(chunk)), (ph, pw))
        drop = (base.repeat(len(chunk)) - scores).view(len(chunk), n)
        largest = torch.maximum(largest, drop.abs().amax(0))
        for j, (y, xx) in enumerate(chunk):
            total[:, :, y:y + ph, xx:xx + pw] += drop[j].view(n, 1, 1, 1)
            count[:, :, y:y + ph, xx:xx + pw] += 1
        ctx.report((i + len(chunk)) / len(spots))
    _warn_if_noise(ctx, largest, base)
    return (total / count).expand_as(x).clone()


def _warn_if_noise(ctx: Context, largest: torch.Tensor, base: torch.Tensor) -> None:
    """Score drops at rounding level (a dead or untrained net) would be stretched to a full-range map."""
    noise = largest <= NOISE * base.abs().clamp(min=1)
    if bool(noise.any()):
        i = int(noise.nonzero()[0])
        ctx.warn(f"occlusion: no window moves the score by more than rounding (at most {float(largest[i]):.1e} of "
                 f"a score of {float(base[i]):.3g}), so the map shows noise; the model may not look at the image "
                 "(untrained or dead units), or the patch may be too small to matter", stacklevel=4)

