"""Shortcut ("Clever Hans") detection: attribution outside the object, and hotspots that do not move."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OUTSIDE_FLAG = 0.5       # flag when most of the strongest evidence lies off the object
TOP_SHARE = 0.05         # "strongest evidence": the top 5% of pixels by positive attribution
GROW = 4                 # the object mask grows by this many pixels (smooth maps spill over edges)
HOTSPOT_RADIUS = 0.1     # fraction of the image diagonal
HOTSPOT_SHARE = 0.3      # a location is a fixed hotspot when at least this share of images peak there


def outside_share(saliency: np.ndarray, mask: np.ndarray, top: float = TOP_SHARE, grow: int = GROW) -> float:
    """Share of the most relevant pixels (top ``top`` by positive attribution) outside the object mask
    grown by ``grow`` pixels. Near 0: the evidence is the object; near 1: it is somewhere else."""
    if saliency.shape != mask.shape:
        raise ValueError(f"mask: shape {mask.shape} differs from the map's {saliency.shape}")
    pos = np.maximum(saliency, 0)
    if pos.max() <= 0:
        return 0.0
    strongest = pos >= max(np.quantile(pos, 1 - top), np.finfo(np.float32).tiny)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    grown = F.max_pool2d(m, 2 * grow + 1, stride=1, padding=grow)[0, 0].numpy() > 0
    return float((strongest & ~grown).sum() / strongest.sum())


def flag_outside(maps: list[np.ndarray], masks: list[np.ndarray], threshold: float = OUTSIDE_FLAG) -> np.ndarray:
    """Per image: does the strongest evidence sit mostly off the object?"""
    maps, masks = _maps(maps), [np.asarray(k) for k in masks]
    if len(maps) != len(masks):
        # zip would drop the unmatched maps and return fewer flags than images
        raise ValueError(f"masks: got {len(masks)} masks for {len(maps)} maps; pass one mask per map, in order")
    return np.array([outside_share(m, k) > threshold for m, k in zip(maps, masks)])


def _maps(maps) -> list[np.ndarray]:
    """Each map as a 2-D array: an Attribution gives its ``.map``."""
    out = [np.asarray(getattr(m, "map", m), dtype=np.float32) for m in maps]
    for i, m in enumerate(out):
        if m.ndim != 2 or not m.size:
            raise ValueError(f"maps[{i}]: expected a 2-D (H, W) map with pixels, got shape {m.shape}; pass the "
                             "Attributions nbx.attribute returns, or their .map")
    return out


def fixed_hotspots(maps: list[np.ndarray], radius: float = HOTSPOT_RADIUS,
                   share: float = HOTSPOT_SHARE) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Mask-free signal: per image, does its peak sit at a location where many images peak, although the
    objects move between images? Returns the per-image flags and that location (row, col) or None."""
    maps = _maps(maps)
    if not maps:
        raise ValueError("maps: the list is empty; pass the maps of several images")
    shapes = list(dict.fromkeys(m.shape for m in maps))
    if len(shapes) > 1:
        raise ValueError(f"maps: shapes differ ({', '.join(map(str, shapes[:4]))}); peaks are compared in pixels, "
                         "so resample the maps to one shape first (explain_batch does this for you)")
    # a constant map has no peak (argmax would say pixel (0, 0)): it takes no part
    peaked = np.array([m.max() > m.min() for m in maps])
    peaks = np.array([np.unravel_index(np.argmax(m), m.shape) if p else (np.nan, np.nan)
                      for m, p in zip(maps, peaked)], dtype=np.float64)
    h, w = maps[0].shape
    r = radius * np.hypot(h, w)
    near = np.linalg.norm(peaks[:, None] - peaks[None], axis=-1) <= r
    support = near.sum(1)
    best = int(np.argmax(support))
    if support[best] < max(2, share * len(maps)):
        return np.zeros(len(maps), bool), None
    centre = peaks[near[best]].mean(0)
    flags = (np.linalg.norm(peaks - centre, axis=1) <= r) & peaked
    return flags, (float(centre[0]), float(centre[1]))
