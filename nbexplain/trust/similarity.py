"""Similarity of two attribution maps: Spearman rank correlation and SSIM."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"maps: shapes {a.shape} and {b.shape} differ; compare maps of one image at one "
                         "resolution (Attribution.map is at the picture's)")
    return a, b


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps (ties broken by position; constant maps give 0)."""
    a, b = _same_shape(a, b)
    ra = np.argsort(np.argsort(a.ravel(), kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b.ravel(), kind="stable"), kind="stable").astype(np.float64)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


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
