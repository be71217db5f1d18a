"""The CAM family: each method weighs a layer's activations A (N,C,h,w), mostly by their gradients G."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..context import Context
from . import register
from .gradients import _guided_backprop

CAMS: dict[str, Callable] = {}


def cam(name: str, summary: str, reference: str, gradients: bool = True):
    """Register ``weigh(A, G, ctx) -> (N,h,w)`` as a layer method; ReLU is applied to every CAM."""
    def deco(weigh: Callable) -> Callable:
        def run(ctx: Context) -> torch.Tensor:
            acts, grads, _ = ctx.capture(ctx.layer(), gradients=gradients)
            if gradients and not bool(grads.any()):
                _no_gradient_here(ctx, name)
            return F.relu(weigh(acts, grads, ctx))
        CAMS[name] = weigh
        register(name, kind="cam", signed=False, needs_layer=True, summary=summary, reference=reference)(run)
        return weigh
    return deco


def _no_gradient_here(ctx: Context, name: str) -> None:
    """A layer whose output the score does not depend on (a ViT's last block under class-token pooling:
    only the class token is read, and it is not on the patch grid) gives an all-zero map: say so."""
    msg = (f"{name}: the target's gradient is zero at every position of layer {ctx.meta['layer']!r}, so the map "
           "is empty; the score does not read this layer's positions directly (a ViT's last block when the "
           "head reads only the class token): pick an earlier layer, e.g. that block's norm1")
    ctx.warn(msg, stacklevel=4)


def _weighted(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights[:, :, None, None] * acts).sum(1)


@cam("gradcam", "Channels weighted by their mean gradient.", "Selvaraju et al. 2017")
def gradcam(A, G, ctx):
    return _weighted(A, G.mean((2, 3)))


@cam("gradcam++", "Channels weighted by positive gradients with higher-order terms (better for several "
     "instances).", "Chattopadhyay et al. 2018")
def gradcam_pp(A, G, ctx):
    g2 = G * G
    alpha = g2 / (2 * g2 + A.sum((2, 3), keepdim=True) * g2 * G + 1e-6)
    alpha = torch.where(G != 0, alpha, torch.zeros_like(alpha))
    return _weighted(A, (F.relu(G) * alpha).sum((2, 3)))


@cam("xgradcam", "Channels weighted by activation-normalised gradients (axiom-based).", "Fu et al. 2020")
def xgradcam(A, G, ctx):
    return _weighted(A, (G * A / (A.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3)))


@cam("layercam", "Every location weighted by its own positive gradient (finer maps at early layers).",
     "Jiang et al. 2021")
def layercam(A, G, ctx):
    return (F.relu(G) * A).sum(1)


@cam("hirescam", "Element-wise gradient × activation summed over channels (faithful to the model's "
     "score for linear heads).", "Draelos & Carin 2020")
def hirescam(A, G, ctx):
    return (G * A).sum(1)


@cam("eigencam", "First principal component of the activations (no gradients, class-agnostic). The "
     "sign is chosen to agree with the mean activation.", "Muhammad & Yeasin 2020", gradients=False)
def eigencam(A, G, ctx):
    n, c, h, w = A.shape
    flat = A.flatten(2).transpose(1, 2)                      # (N, hw, C)
    flat = flat - flat.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(flat, full_matrices=False)
    proj = (flat @ vh[:, 0, :, None])[..., 0]                 # (N, hw)
    sign = torch.sign((proj * A.flatten(2).mean(1)).sum(1, keepdim=True))
    return (proj * torch.where(sign == 0, 1.0, sign)).view(n, h, w)


@cam("scorecam", "Channels weighted by the class score when the image is masked by each upsampled "
     "channel (gradient-free, one batched forward per channel; channels of one shape, such as all the dead "
     "ones, share it).", "Wang et al. 2020", gradients=False)
def scorecam(A, G, ctx):
    n, c = A.shape[:2]
    scores = torch.empty(n, c, device=A.device)
    for i in range(n):
        # channels of one shape share a mask, so one forward scores them all: every constant channel (dead
        # after a ReLU, say) masks the image to zero, and on a trained net ~10% of the live ones repeat
        # another's shape (one cell active), found at the layer's resolution before upsampling
        groups, members = torch.unique(_shapes(A[i]), dim=0, return_inverse=True)
        first = torch.full((len(groups),), c, device=A.device).scatter_reduce(
            0, members, torch.arange(c, device=A.device), "amin")
        shared = torch.empty(len(groups), device=A.device)
        for j in range(0, len(first), ctx.batch_size):
            idx = first[j:j + ctx.batch_size]
            # masks are made per chunk: all of them at once is C x H x W floats per image (3 GB for a
            # batch of 8 at resnet50's layer4)
            masked = ctx.x[i:i + 1] * _unit_masks(A[i, idx], ctx.x.shape[2:]).to(ctx.x.dtype)
            shared[j:j + len(idx)] = ctx.scores(masked, ctx.targets[i].repeat(len(idx))).float()   # a bf16 model's too
            ctx.report((i + (j + len(idx)) / len(first)) / n)
        scores[i] = shared[members]
    return _weighted(A, scores.softmax(1))


def _shapes(acts: torch.Tensor) -> torch.Tensor:
    """(c,h,w) activations -> (c, h*w), each scaled to [0, 1] (0 where constant): equal rows, equal masks."""
    flat = acts.flatten(1).float()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return torch.where(hi > lo, (flat - lo) / (hi - lo).clamp(min=torch.finfo(flat.dtype).tiny), 0.0)


def _unit_masks(acts: torch.Tensor, size) -> torch.Tensor:
    """(k,h,w) activations -> (k,1,H,W) upsampled and scaled to [0, 1] each (Score-CAM's masks)."""
    up = F.interpolate(acts[:, None], size=tuple(size), mode="bilinear", align_corners=True)
    lo = up.flatten(1).amin(1)[:, None, None, None]
    hi = up.flatten(1).amax(1)[:, None, None, None]
    return (up - lo) / (hi - lo + 1e-8)


@register("guided_gradcam", kind="pixel", signed=False, reduce="absmax", needs_layer=True,
          summary="Guided backprop multiplied by the upsampled Grad-CAM (needs ReLU modules and a layer).",
          reference="Selvaraju et al. 2017")
def guided_gradcam(ctx: Context) -> torch.Tensor:
    with ctx.quietly():                  # the guided backprop pass below reports the progress
        acts, grads, _ = ctx.capture(ctx.layer())
    heat = F.relu(gradcam(acts, grads, ctx))[:, None]
    heat = F.interpolate(heat, size=ctx.x.shape[2:], mode="bilinear", align_corners=False)
    return _guided_backprop(ctx, ctx.x, None) * heat
