"""Modules whose PyTorch kernel is slow for how they are called run an exact equivalent, for one pass.

**TF-"same" depthwise convs** (timm's ``Conv2dSame``) run without padding their input. ``Conv2dSame``
pads the input by ``(p, p + 1)`` where the stride leaves one more cell on the far side, then convolves:
the pad copies the whole activation tensor, and its backward copies the gradient out of a padded one. A
kernel of one more tap with a zero first tap, padded ``p + 1`` on both sides, computes exactly the same
output (same windows, the extra tap reads the extra pad cell and weighs it 0). On a depthwise conv the
extra taps cost next to nothing, the copies a lot: a stride-2 depthwise layer of EfficientNet-Lite0 took
61 ms with the pad and 40 ms without (forward + input backward, batch 16, CPU, buffers reused), the same
output and gradient to the bit. A dense conv pays for its extra taps more than for the pad (3-channel
stem, 24 -> 48 channels: 20-50% slower), so it keeps timm's code.

**Max-pooling of an NCHW tensor on the CPU** runs on a channels-last copy: PyTorch's NCHW kernel is 4x
slower than its NHWC one (a ResNet's stem pool at batch 1: 7.1 ms against 1.8 ms with both copies). That
is 9% of a resnet18 Grad-CAM and 4% of a resnet50 one, whose graph starts after the pool (15 interleaved
calls each). Only where no gradient flows through the pool (CAMs, forward-only passes): a saliency pass,
with the copies' backward, came out 1-3% slower. The maximum is exact, and so is the layout handed on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


def substitutes(modules: list[nn.Module]) -> list[tuple[nn.Module, Callable]]:
    """(module, forward) for every module of an exact type that has a faster equivalent (a subclass may do
    more), and no forward of its own already."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        Conv2dSame = None
    out = []
    for m in modules:
        if "forward" in m.__dict__:
            continue
        if (type(m) is Conv2dSame and m.groups == m.in_channels == m.out_channels and m.groups > 1
                and tuple(m.dilation) == (1, 1) and not parametrize.is_parametrized(m)):
            out.append((m, _unpadded(m)))
        elif type(m) is nn.MaxPool2d and not m.return_indices:
            out.append((m, _pooled_channels_last(m)))
    return out


def _pooled_channels_last(pool: nn.MaxPool2d) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        # forward only: with its backward in a whole saliency pass the copies cost what the pool gained
        if x.device.type == "cpu" and x.ndim == 4 and x.is_contiguous() and x.shape[1] > 1 \
                and not x.is_contiguous(memory_format=torch.channels_last) \
                and not (x.requires_grad and torch.is_grad_enabled()):
            return nn.MaxPool2d.forward(pool, x.contiguous(memory_format=torch.channels_last)).contiguous()
        return nn.MaxPool2d.forward(pool, x)
    return forward


def _unpadded(conv: nn.Conv2d) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, padding, lead = conv.weight, [], [0, 0]
        for axis, (size, k, s) in enumerate(zip(x.shape[-2:], conv.kernel_size, conv.stride)):
            total = max((-(size // -s) - 1) * s + k - size, 0)      # timm's get_same_padding, dilation 1
            low, high = total // 2, total - total // 2
            padding.append(high)
            lead[axis] = high - low                                 # 0, or one zero tap in front
        if any(lead):
            weight = F.pad(weight, (lead[1], 0, lead[0], 0))
        return F.conv2d(x, weight, conv.bias, conv.stride, tuple(padding), 1, conv.groups)
    return forward


@contextmanager
def substituted(pairs: list[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Each module runs the given forward until exit (``substitutes``' equivalents; hooks on them see the same
    inputs and outputs, so they need not be skipped). A forward already set on a module (an outer
    substitution) is put back on exit, not dropped."""
    saved = [(module, module.__dict__.get("forward")) for module, _ in pairs]    # all before any is set
    try:
        for module, forward in pairs:
            module.forward = forward
        yield
    finally:
        for module, forward in reversed(saved):
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
