"""Plain gradient methods: saliency, gradient x input, guided backprop."""
from __future__ import annotations


import torch
from torch import nn

from ..context import Context, guided_relus
from . import register

# Pixel methods are written as base(ctx, xs, targets) -> input-shaped attribution, so that
# SmoothGrad can wrap any of them (BASES) without a copy per method.
BASES = {}


def base(name):
    def deco(fn):
        BASES[name] = fn
        return fn
    return deco


@base("saliency")
def _saliency(ctx: Context, xs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ctx.input_grads(xs, targets)[0]


@base("gradient_x_input")
def _gradient_x_input(ctx: Context, xs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ctx.input_grads(xs, targets)[0] * xs


@base("guided_backprop")
def _guided_backprop(ctx: Context, xs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in ctx.model.modules()):
        msg = ("guided_backprop: the model has no nn.ReLU/ReLU6 modules (e.g. a GELU ViT), so guided "
               "backprop here equals the plain gradient ('saliency')")
        ctx.warn(msg, stacklevel=2)            # SmoothGrad calls this per chunk: recorded once
    return ctx.input_grads(xs, targets, hooks=lambda: guided_relus(ctx.model))[0]


@register("saliency", kind="pixel", signed=False, reduce="absmax",
          summary="Gradient of the class score w.r.t. the pixels (map: max |gradient| over channels).",
          reference="Simonyan et al. 2014")
def saliency(ctx: Context) -> torch.Tensor:
    return _saliency(ctx, ctx.x, None)


@register("gradient_x_input", kind="pixel", signed=True,
          summary="Gradient times the input: a first-order contribution of each pixel.",
          reference="Shrikumar et al. 2016")
def gradient_x_input(ctx: Context) -> torch.Tensor:
    return _gradient_x_input(ctx, ctx.x, None)


@register("guided_backprop", kind="pixel", signed=False, reduce="absmax",
          summary="Gradient with negative gradients stopped at every ReLU (needs ReLU modules).",
          reference="Springenberg et al. 2015")
def guided_backprop(ctx: Context) -> torch.Tensor:
    return _guided_backprop(ctx, ctx.x, None)
