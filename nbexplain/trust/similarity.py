"""Similarity of two attribution maps: Spearman rank correlation and SSIM."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..attribution import Attribution
from ..images import crop_slices


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"maps: shapes {a.shape} and {b.shape} differ; compare maps of one image at one "
                         "resolution (Attribution.map is at the picture's)")
    return a, b


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (tied values share their average rank; constant maps give 0)."""
    a, b = _same_shape(a, b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(_ranks(a.ravel()), _ranks(b.ravel()))[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks: ties broken by position would rank a zero area the same way in any two maps (a CAM's
    ReLU'd half, say), and read as agreement."""
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts - 1) / 2.0)[inverse.ravel()]


def on_crop(exp: Attribution) -> np.ndarray:
    """The part of ``exp.map`` the model saw. A photo's map is zero outside the model's centre crop (half
    of a 3:2 photo), and those pixels would agree between any two maps of it."""
    return exp.map[seen_region(exp)]


def seen_region(exp: Attribution) -> tuple[slice, slice]:
    """Rows and columns of ``exp.map`` inside the model's crop of the picture (all of it without a crop, or
    when the crop misses the map)."""
    box = exp.meta.get("crop_box")
    region = crop_slices(tuple(box) if box else None)
    return region if exp.map[region].size else (slice(None), slice(None))


def rank_agreement(exps: list[Attribution]) -> np.ndarray:
    """Spearman correlation of |map| for each pair of explanations of one image, where the model saw it."""
    maps = [np.abs(on_crop(e)) for e in exps]
    matrix = np.eye(len(maps))
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            matrix[i, j] = matrix[j, i] = spearman(maps[i], maps[j])
    return matrix


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Structural similarity of two maps, each min-max scaled to [0, 1] (uniform window)."""
    a, b = _same_shape(a, b)
    def unit(m):
        m = m.astype(np.float64)
        return (m - m.min()) / (np.ptp(m) or 1.0)
    x = torch.from_numpy(unit(a))[None, None]
    y = torch.from_numpy(unit(b))[None, None]
    k = min(window, *a.shape)
    mean = lambda t: F.avg_pool2d(t, k, stride=1)  # noqa: E731
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def compare(original: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """The four scores of the randomisation test: Spearman and SSIM, with and without absolute value."""
    return {"spearman": spearman(original, other), "spearman_abs": spearman(np.abs(original), np.abs(other)),
            "ssim": ssim(original, other), "ssim_abs": ssim(np.abs(original), np.abs(other))}
