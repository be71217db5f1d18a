"""Faithfulness: deletion/insertion curves and their AUC; pointing games against a ground-truth mask."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .._errors import positive_int
from ..attribution import Attribution, display_map
from ..calls import call, eager, inputs_for, probabilities
from ..hygiene import borrowed
from ..methods.baselines import gaussian_blur
from ..digest import weights_digest
from ..models import describe


@dataclass
class Curves:
    """Target probability as the most relevant pixels are deleted (from the image) or inserted (into the fill)."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    fill: str

    @property
    def deletion_auc(self) -> float:
        """Lower is better: the score collapses quickly when the relevant pixels go."""
        return float(np.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        """Higher is better: the score recovers quickly when the relevant pixels come back."""
        return float(np.trapezoid(self.insertion, self.fractions))


def input_map(exp: Attribution) -> torch.Tensor:
    """The attribution on the model-input grid (what ranks the pixels), from the raw tensor."""
    from ..methods import get
    spec = get(exp.method)
    return display_map(exp.raw, spec.kind, exp.meta.get("display_reduce", spec.reduce),
                       tuple(exp.input.shape[2:]) if exp.input is not None else exp.map.shape,
                       exp.meta.get("grid_extent"))


def deletion_insertion(model, exp: Attribution, *, saliency: np.ndarray | torch.Tensor | None = None,
                       steps: int = 20, fill: str = "blur", batch_size: int = 32) -> Curves:
    """Deletion and insertion curves (most relevant first) for ``exp``'s target, batched under no_grad.

    ``fill``: 'blur' (a heavy Gaussian blur of the image, σ = 1/16 of its size) or 'mean' (its mean
    colour). ``saliency`` overrides the ranking (e.g. a random map as a control).
    """
    if not isinstance(exp, Attribution):
        raise TypeError(f"exp: expected an Attribution from nbx.attribute, got {type(exp).__name__}; "
                        "pass one attribution, or use nbx.explain_batch(model, images, faithfulness=True) for many")
    positive_int("steps", steps, "how many steps from 0 to 100 % of the pixels, e.g. 20")
    positive_int("batch_size", batch_size, "images per forward pass, e.g. 32")
    if fill not in ("blur", "mean"):
        raise ValueError("fill: use 'blur' or 'mean'")
    if exp.input is None:
        raise ValueError("deletion_insertion: the attribution carries no model input")
    x = exp.input
    _check_model(eager(model), exp)
    rank_map = _saliency(saliency, tuple(x.shape[2:])) if saliency is not None else input_map(exp)
    fractions = np.linspace(0, 1, steps + 1)
    probs = _probabilities(model, perturbed(x, rank_map, fractions, fill), exp.target, batch_size)
    return Curves(fractions, probs[:steps + 1], probs[steps + 1:], fill)


def _check_model(model, exp: Attribution) -> None:
    """Is ``exp`` an attribution of ``model``? Same weights: yes. Other weights and another channel count:
    its input cannot enter the model (torch would fail deep inside the first conv). Other weights only
    (fine-tuned since, or a sibling model): the curves still mean something, but rarely what was meant."""
    recorded = exp.meta.get("weights_sha256")
    if recorded is None or recorded == weights_digest(model):
        return
    pre = describe(model).preprocess
    if pre is not None and pre.channels != exp.input.shape[1]:
        raise ValueError(f"exp: its input has {_count(exp.input.shape[1], 'channel')}, but this model takes "
                         f"{pre.channels}: the attribution was computed on another model ({exp.meta.get('model')}). "
                         "Pass the model it was computed on, or recompute it with nbx.attribute(model, ...)")
    warnings.warn(f"exp was computed with other weights than this model's ({exp.meta.get('model')}, sha256 "
                  f"{recorded[:12]}…): the curves show how this model responds to that map. Pass the model it "
                  "was computed on, or recompute it with nbx.attribute(model, ...)", stacklevel=3)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _saliency(saliency, shape: tuple[int, ...]) -> torch.Tensor:
    """A user's ranking map as a float tensor on the model-input grid, finite everywhere (NaN sorts
    arbitrarily, so the curves would rank pixels by noise)."""
    rank_map = torch.as_tensor(np.asarray(saliency, dtype=np.float32) if not isinstance(saliency, torch.Tensor)
                               else saliency.detach().cpu()).float()
    if tuple(rank_map.shape) != shape:
        raise ValueError(f"saliency: expected a map of shape {shape} (the model-input grid, exp.input's H x W), "
                         f"got {tuple(rank_map.shape)}; resize the map to that grid")
    if not torch.isfinite(rank_map).all():
        raise ValueError("saliency: the map contains NaN or infinite values; replace them "
                         "(e.g. np.nan_to_num) so every pixel has a rank")
    return rank_map


def perturbed(x: torch.Tensor, rank_map: torch.Tensor, fractions: np.ndarray, fill: str) -> torch.Tensor:
    """The deletion images (most relevant pixels replaced by the fill, one per fraction) followed by
    the insertion images (the fill with the most relevant pixels put back)."""
    order = torch.argsort(rank_map.flatten(), descending=True)
    base = gaussian_blur(x, max(x.shape[2:]) / 16) if fill == "blur" else x.mean((2, 3), keepdim=True).expand_as(x)
    n = order.numel()
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    rank = rank.view(1, 1, *x.shape[2:])
    counts = (fractions * n).round().astype(int)
    deleted = [torch.where(rank < k, base, x) for k in counts]
    inserted = [torch.where(rank < k, x, base) for k in counts]
    return torch.cat(deleted + inserted)


def _probabilities(model, xs: torch.Tensor, target: int, batch_size: int) -> np.ndarray:
    model, out = eager(model), []
    with borrowed(model), torch.no_grad():
        for i in range(0, len(xs), batch_size):
            scores = call(model, inputs_for(model, xs[i:i + batch_size])).float()
            if not i and not 0 <= target < scores.shape[-1]:
                # the first batch is the first to show the class count
                raise ValueError(f"exp: its target {target} is out of range for this model's {scores.shape[-1]} "
                                 "classes; was the attribution computed on another model? pass the model it was "
                                 "computed on, or recompute it with nbx.attribute(model, ...)")
            out.append(probabilities(scores)[:, target].cpu())      # a one-logit model's is its sigmoid
    return torch.cat(out).numpy()


def pointing_game(saliency: np.ndarray, mask: np.ndarray) -> bool:
    """Does the map's maximum fall inside the ground-truth mask? A constant map points nowhere: False."""
    saliency, mask = _check(saliency, mask)
    if saliency.max() == saliency.min():
        return False                      # argmax would pick pixel (0, 0)
    return bool(mask[np.unravel_index(np.argmax(saliency), saliency.shape)])


def energy_pointing_game(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive attribution energy inside the mask (Wang et al. 2020)."""
    saliency, mask = _check(saliency, mask)
    pos = np.maximum(saliency, 0)
    total = pos.sum()
    return float(pos[mask].sum() / total) if total > 0 else 0.0


def _check(saliency, mask) -> tuple[np.ndarray, np.ndarray]:
    """The map as an array and the mask as booleans (numpy or torch; values above 0 are inside)."""
    saliency = saliency.detach().cpu().numpy() if isinstance(saliency, torch.Tensor) else np.asarray(saliency)
    mask = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if saliency.shape != mask.shape:
        raise ValueError(f"mask: shape {mask.shape} differs from the map's {saliency.shape}")
    return saliency, mask > 0
