"""The input memory format for a model's passes: channels-last where it is faster and gives the same logits."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .calls import logits_of
from .hygiene import borrowed

_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_MAX_SHAPES = 8          # per model: the choice is per input shape, and shapes seen are few


def input_format(model: nn.Module, x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a CNN on the CPU, else ``torch.contiguous_format``.

    oneDNN's NHWC convolution kernels run a forward + input backward of a CNN 1.1-1.3x faster than
    NCHW on the CPU (resnet50, EfficientNet at batch 8-16; measured in benchmarks/run.py). Only the
    *input* is converted, so the user's model is untouched; PyTorch propagates the format through
    the network. A model whose code assumes NCHW strides (``.view`` on a feature map) would fail or
    differ, so the choice is probed once per model and input shape: both formats must give the same
    logits, else the model keeps NCHW. CUDA keeps NCHW until the gain is measured there (the GPU
    benchmark predates this path).
    """
    if x.device.type != "cpu" or x.ndim != 4:
        return torch.contiguous_format
    shapes = _CHOSEN.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype)
    if key not in shapes:
        if len(shapes) >= _MAX_SHAPES:
            shapes.clear()
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        # ViTs have one patch-embedding conv: nothing to gain
        shapes[key] = _probe(model, x[:1]) if convs >= 2 else torch.contiguous_format
    return shapes[key]


def _probe(model: nn.Module, x: torch.Tensor) -> torch.memory_format:
    try:
        with borrowed(model), torch.no_grad():
            ref = logits_of(model(x.contiguous()))
            got = logits_of(model(x.contiguous(memory_format=torch.channels_last)))
    except Exception:   # noqa: BLE001 - any failure means "not safe"; the real pass reports its own errors
        return torch.contiguous_format
    if not (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.shape == got.shape):
        return torch.contiguous_format
    rtol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 1e-2
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    same = bool(torch.isfinite(ref).all()) and torch.allclose(got, ref, rtol=rtol, atol=rtol * max(scale, 1.0))
    return torch.channels_last if same else torch.contiguous_format
