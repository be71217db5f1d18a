"""Overlay rendering for exports, drawing exactly what the widget draws (same LUTs, sign and clip rules)."""
from __future__ import annotations

import json
import pathlib
from functools import lru_cache

import numpy as np

SIGNS = ("positive", "negative", "absolute", "signed")
_LUTS = pathlib.Path(__file__).parent / "static" / "colormaps.json"


@lru_cache(maxsize=None)
def lut(name: str) -> np.ndarray:
    """(256, 3) uint8 LUT, written from js/colormaps.js by the frontend build."""
    if not _LUTS.exists():
        raise FileNotFoundError(f"{_LUTS} is missing: run `npm run build` (make test does)")
    tables = json.loads(_LUTS.read_text())
    if name not in tables:
        raise ValueError(f"colormap: unknown {name!r}; use one of {', '.join(tables)}")
    return np.frombuffer(bytes.fromhex(tables[name]), np.uint8).reshape(256, 3)


def resolve(sign: str, colormap: str, signed_method: bool) -> tuple[str, str]:
    sign = ("signed" if signed_method else "positive") if sign == "auto" else sign
    if sign not in SIGNS:
        raise ValueError(f"sign: unknown {sign!r}; use auto or one of {', '.join(SIGNS)}")
    colormap = ("blue_orange" if sign == "signed" else "cividis") if colormap == "auto" else colormap
    return sign, colormap


def prepare(values: np.ndarray, sign: str, clip: float) -> np.ndarray:
    """Map values to [0, 1] for the LUT: the chosen sign, saturating at the clip percentile of |value|."""
    v = values.astype(np.float64)                     # NaN = no attribution there; it stays NaN
    shown = {"positive": np.maximum(v, 0), "negative": np.maximum(-v, 0), "absolute": np.abs(v)}.get(sign, v)
    finite = np.abs(shown[np.isfinite(shown)])
    scale = float(np.percentile(finite, clip)) if finite.size else 0.0
    if scale <= 0:
        return np.where(np.isnan(v), np.nan, 0.5 if sign == "signed" else 0.0)
    if sign == "signed":
        return 0.5 + 0.5 * np.clip(shown / scale, -1, 1)
    return np.clip(shown / scale, 0, 1)


def overlay(image: np.ndarray, values: np.ndarray, *, opacity: float = 0.5, colormap: str = "auto",
            sign: str = "auto", clip: float = 99.0, signed_method: bool = True) -> np.ndarray:
    """(H,W,3) uint8 image + (H,W) map -> blended (H,W,3) uint8."""
    for name, value in (("opacity", opacity), ("clip", clip)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    if not 0.0 <= opacity <= 1.0:                     # also refuses NaN
        raise ValueError(f"opacity={opacity!r}: must be within [0, 1] (0 shows the image only)")
    if not 0.0 <= clip <= 100.0:
        raise ValueError(f"clip={clip!r}: a percentile within [0, 100] (100: no clipping)")
    sign, colormap = resolve(sign, colormap, signed_method)
    t = prepare(values, sign, clip)
    none = np.isnan(t)                                  # pixels without attribution are left as they are
    colours = lut(colormap)[np.clip((np.nan_to_num(t) * 255).round().astype(int), 0, 255)].astype(np.float64)
    alpha = np.where(none, 0.0, opacity)[..., None]
    out = (1 - alpha) * image[..., :3].astype(np.float64) + alpha * colours
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
