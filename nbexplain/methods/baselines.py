"""Reference inputs for Integrated Gradients and fills for occlusion, defined in pixel terms."""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

BASELINES = ("black", "zeros", "mean", "blur", "uniform", "white")
HELP = ("black/white: black/white pixels pushed through the model's preprocessing; zeros: all-zero model "
        "input; mean: the image's mean colour; blur: a heavy Gaussian blur of the image (σ = 1/16 of its "
        "size); uniform: uniform random pixels (seeded); or pass a tensor")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N,C,H,W) with reflect padding."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    pad_h, pad_w = min(radius, x.shape[2] - 1), min(radius, x.shape[3] - 1)
    y = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    y = F.conv2d(y, k[radius - pad_w:radius + pad_w + 1].view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else y
    return F.conv2d(y, k[radius - pad_h:radius + pad_h + 1].view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


class NeedsPreprocess(ValueError):
    """A pixel-defined baseline or fill on a model without mean/std. Its own type, because the fix
    depends on the route: the trust helpers take no ``preprocess=`` and reword it (trust/agreement.py)."""

    def __init__(self, param: str, kind: str) -> None:
        self.param, self.kind = param, kind
        super().__init__(f"{param}={kind!r} is defined in pixels, but this model carries no preprocessing "
                         "(mean/std); pass preprocess=nbx.Preprocess(...) (or load the model with "
                         f"nbx.load_model(model, preprocess=nbx.Preprocess(...))), or use {param}='zeros'")


def make_baseline(x: torch.Tensor, kind, preprocess, seed: int = 0, param: str = "baseline") -> torch.Tensor:
    """A baseline shaped like ``x`` (model-input space); ``param``: the argument it came from, for errors."""
    if isinstance(kind, torch.Tensor):
        try:
            return torch.broadcast_to(kind.to(x.device, x.dtype), x.shape).clone()
        except RuntimeError as e:
            raise ValueError(f"baseline: a tensor baseline must broadcast to the input {tuple(x.shape)}, "
                             f"got {tuple(kind.shape)}") from e
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    if kind == "blur":
        return gaussian_blur(x, max(x.shape[2:]) / 16)
    if preprocess is None:
        raise NeedsPreprocess(param, kind)
    if kind in ("black", "white"):
        return preprocess.normalize(torch.full_like(x[:1], 0.0 if kind == "black" else 1.0)).expand_as(x).clone()
    if kind == "uniform":
        g = torch.Generator().manual_seed(seed)          # CPU draw: device-independent
        pixels = torch.rand((1, *x.shape[1:]), generator=g, dtype=x.dtype).to(x.device)
        return preprocess.normalize(pixels).expand_as(x).clone()
    raise ValueError(f"baseline: unknown {kind!r}; use one of {', '.join(BASELINES)} or a tensor")


def baseline_key(kind, seed: int) -> tuple:
    """A hashable identity for a baseline (tensor baselines by content)."""
    if isinstance(kind, torch.Tensor):
        return ("tensor", hashlib.sha1(kind.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
    return (kind, seed) if kind == "uniform" else (kind,)
