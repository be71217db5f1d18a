"""SmoothGrad, SmoothGrad² and VarGrad: one noise tunnel around any pixel method, reusing samples."""
from __future__ import annotations

import torch

from ..context import Context
from ..pipeline import ByteLRU
from . import SEED, Param, register
from .gradients import BASES

_PARAMS = (
    Param("base", "choice", "saliency", "the gradient method averaged over noisy copies", choices=tuple(BASES)),
    Param("samples", "int", 25, "number of noisy copies", 1, 1000, 1),
    Param("noise", "float", 0.15, "noise σ as a fraction of the input's range (max − min), as in the paper",
          0.0, 1.0, 0.01),
    SEED,
)
# per base method: how the averaged map is shown (saliency-like maps are magnitudes)
_DISPLAY = {"saliency": ("absmax", False), "guided_backprop": ("absmax", False),
            "gradient_x_input": ("sum", True)}


# unit noise depends on (seed, index, shape) alone, not on the image: explaining many images, or the same
# one again, reuses it where it already lies instead of drawing on the CPU and copying it over each time
# (on an H100, SmoothGrad ran at 0.2-0.4 of the bare passes' speed, and this draw and copy per sample is
# the step those passes lack)
_UNIT_NOISE = ByteLRU(64 << 20)


def sample_noise(x: torch.Tensor, sigma: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """Noise of sample ``index``: fixed by (seed, index) alone, so adding samples keeps the old ones.

    One (C,H,W) draw scaled per image by ``sigma`` (N,1,1,1): an image's map does not depend on which
    other images share its batch.
    """
    key = (seed, index, tuple(x.shape[1:]), x.dtype, str(x.device))
    unit = _UNIT_NOISE.get(key)
    if unit is None:
        # drawn on the CPU: the same seed gives the same map on any device (and in nbx.replay)
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        unit = torch.randn(x.shape[1:], generator=g, dtype=x.dtype).to(x.device)
        _UNIT_NOISE.put(key, unit)
    return unit * sigma


def noise_sums(ctx: Context, base: str, samples: int, noise: float, seed: int, squares: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σa, Σa²) over ``samples`` noisy attributions, continuing from the largest cached count.

    Without ``squares`` (SmoothGrad outside the widget) a saliency base needs only the gradients' sum,
    which ``Context.input_grad_sum`` forms more cheaply than each sample's gradient; Σa² is then None.
    """
    squares = squares or ctx.keep_intermediates or base != "saliency"   # the widget may switch variant later
    key = ("noise_tunnel", base, noise, seed, tuple(ctx.targets.tolist()), squares)
    done = max((k[-1] for k in ctx.memo if k[:-1] == key and k[-1] <= samples), default=0)
    total, sq = ctx.memo[key + (done,)] if done else (torch.zeros_like(ctx.x), torch.zeros_like(ctx.x))
    span = ctx.x.flatten(1).amax(1) - ctx.x.flatten(1).amin(1)
    sigma = (noise * span).view(-1, *[1] * (ctx.x.ndim - 1))
    for idx in ctx.chunks(done, samples):
        xs = torch.cat([ctx.x + sample_noise(ctx.x, sigma, seed, i) for i in idx])
        targets = ctx.targets.repeat(len(idx))
        with ctx.quietly():
            if squares:
                a = BASES[base](ctx, xs, targets).view(len(idx), *ctx.x.shape)
                total, sq = total + a.sum(0), sq + (a * a).sum(0)
            else:
                total = total + ctx.input_grad_sum(xs, targets, [1.0] * len(idx))[0]
        if ctx.keep_intermediates:   # the widget: a smaller count later resumes from the nearest chunk end
            ctx.memo[key + (idx[-1] + 1,)] = (total, sq)
        ctx.report((idx.stop - done) / max(1, samples - done))
    sq = sq if squares else None
    ctx.memo[key + (samples,)] = (total, sq)
    return total, sq


def _tunnel(variant: str):
    def run(ctx: Context, base: str, samples: int, noise: float, seed: int) -> torch.Tensor:
        total, squares = noise_sums(ctx, base, samples, noise, seed, squares=variant != "smoothgrad")
        mean = total / samples
        if variant == "smoothgrad":
            ctx.meta["display"] = _DISPLAY[base]
            return mean
        ctx.meta["display"] = ("sum", False)
        if variant == "smoothgrad_sq":
            return squares / samples
        # E[a²] − E[a]² rounds to ±1e-13 where the variance is 0 (noise 0, a constant image): not a map
        return (squares / samples - mean * mean).clamp_min(0)
    return run


register("smoothgrad", kind="pixel", signed=False, reduce="absmax", params=_PARAMS,
         summary="Average of a gradient method over noisy copies of the image (sharper, less noisy).",
         reference="Smilkov et al. 2017")(_tunnel("smoothgrad"))
register("smoothgrad_sq", kind="pixel", signed=False, params=_PARAMS,
         summary="Average of the squared attributions over noisy copies (SmoothGrad²).",
         reference="Hooker et al. 2019")(_tunnel("smoothgrad_sq"))
register("vargrad", kind="pixel", signed=False, params=_PARAMS,
         summary="Variance of the attributions over noisy copies.",
         reference="Adebayo et al. 2018")(_tunnel("vargrad"))
