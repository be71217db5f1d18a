"""TensorFlow-"same" depthwise convs (timm's ``Conv2dSame``) run without padding their input, for one pass.

``Conv2dSame`` pads the input by ``(p, p + 1)`` where the stride leaves one more cell on the far side,
then convolves: the pad copies the whole activation tensor, and its backward copies the gradient out
of a padded one. A kernel of one more tap with a zero first tap, padded ``p + 1`` on both sides,
computes exactly the same output (same windows, the extra tap reads the extra pad cell and weighs it 0).
On a depthwise conv the extra taps cost next to nothing, the copies a lot: a stride-2 depthwise layer of
EfficientNet-Lite0 took 186 ms with the pad and 74 ms without (forward + input backward, batch 16,
CPU), the same output and gradient to the bit. A dense conv pays for its extra taps more than for the
pad (3-channel stem, 24 -> 48 channels: 20-50% slower), so it keeps timm's code.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


def depthwise_same_convs(modules: list[nn.Module]) -> list[nn.Conv2d]:
    """The modules that are exactly timm's ``Conv2dSame`` (a subclass may do more), depthwise, undilated."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:
        return []
    return [m for m in modules if type(m) is Conv2dSame and "forward" not in m.__dict__
            and m.groups == m.in_channels == m.out_channels and m.groups > 1 and tuple(m.dilation) == (1, 1)
            and not parametrize.is_parametrized(m)]


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
def unpadded(convs: list[nn.Conv2d]) -> Iterator[None]:
    """Each conv of ``depthwise_same_convs`` computes its output without the padded copy, until exit.
    Hooks on them see the same inputs and outputs, so they need not be skipped."""
    try:
        for conv in convs:
            conv.forward = _unpadded(conv)
        yield
    finally:
        for conv in convs:
            conv.__dict__.pop("forward", None)
