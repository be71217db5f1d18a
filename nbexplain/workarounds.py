"""PyTorch kernel bugs that a pass steps around (each checked against finite differences in the tests).

**BatchNorm's input gradient for one image whose output gradient arrives with odd strides** (CPU, torch
2.14.1). A conv stem's BatchNorm2d before ``x.flatten(2).transpose(1, 2)`` (XCiT, LeViT: the patch tokens)
gets back a gradient of shape (1, C, H, W) whose channels are innermost and whose size-1 batch dimension has
an odd stride; for an NCHW input, BatchNorm's backward then reads it in the wrong order: XCiT's saliency came
out 100% off, LeViT's 120%. A batch of two, or the gradient made contiguous, gives the exact one. So in
one-image passes on the CPU each plain BatchNorm2d hands its backward a contiguous gradient (a copy only
where it was not: a conv's gradient already is). CUDA's kernel reads it right (XCiT on an H100: 1e-6 off
without the fix), so a GPU's passes skip the Python wrapper around each BatchNorm.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def batchnorm_fixes(modules: list[nn.Module], device: torch.device) -> list[tuple[nn.Module, Callable]]:
    """(module, forward) for every BatchNorm2d that runs ``nn.BatchNorm2d.forward`` and has no forward of
    its own already (``kernels.substituted`` sets them for a pass), in passes on the CPU (only its kernel
    has the bug)."""
    if device.type != "cpu":
        return []
    return [(m, _contiguous_gradient(m)) for m in modules
            if isinstance(m, nn.BatchNorm2d) and type(m).forward is nn.BatchNorm2d.forward
            and "forward" not in m.__dict__]


def _contiguous_gradient(bn: nn.BatchNorm2d) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = nn.BatchNorm2d.forward(bn, x)
        if out.requires_grad and x.ndim == 4 and x.shape[0] == 1 and x.is_contiguous():
            out.register_hook(_contiguous)
        return out
    return forward


def _contiguous(grad: torch.Tensor) -> torch.Tensor | None:
    return None if grad.is_contiguous() else grad.contiguous()
