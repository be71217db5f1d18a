"""The result of an attribution: display map, method-native raw tensor, target, probabilities, provenance."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._errors import positive_int
from .images import area_resize, shrunk_size, to_original_grid


@dataclass
class Attribution:
    """One image's explanation.

    ``map`` is (H, W) float32 at the input image's resolution, scaled to [-1, 1] (signed methods)
    or [0, 1]; ``raw`` is the method-native tensor on CPU with a leading batch dim of 1.
    """

    map: np.ndarray
    raw: torch.Tensor
    target: int
    label: str | None
    probs: list[tuple[int, str | None, float]]
    meta: dict
    image: np.ndarray | None = field(default=None, repr=False)   # the pixels the map lies over (uint8 HWC)
    scale: float = 1.0                                            # map = unscaled / scale
    input: torch.Tensor | None = field(default=None, repr=False)  # the (1,C,H,W) model input, on CPU
    tensors: dict = field(default_factory=dict, repr=False)      # tensor parameters (a custom IG baseline)

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def signed(self) -> bool:
        return bool(self.meta["signed"])

    @property
    def delta(self) -> float | None:
        """Integrated Gradients' completeness delta: Σ attributions − (f(x) − f(baseline))."""
        return self.meta.get("delta")

    def shown(self) -> np.ndarray:
        """The map in method-native units with NaN where there is no attribution (outside the model's
        crop of the original image), as the widget and the exports draw it."""
        from .images import crop_slices
        box = self.meta.get("crop_box")
        inside = crop_slices(tuple(box) if box else None)
        out = np.full(self.map.shape, np.nan, np.float32)
        out[inside] = self.map[inside] * self.scale
        return out

    def downsized(self, max_side: int) -> "Attribution":
        """This attribution with its image and map shrunk so the longer side is at most ``max_side``
        (area-averaged); itself when already that small. A 12-megapixel photo's image and map take
        84 MB, so a batch over a folder of photos keeps them at display size instead."""
        max_side = positive_int("max_side", max_side, "the longer side in pixels, e.g. 512")
        h, w = self.map.shape
        size = shrunk_size(h, w, max_side)
        if size == (h, w):
            return self
        m = area_resize(self.map, size)
        image = None if self.image is None else (area_resize(self.image, size) + 0.5).astype(np.uint8)
        meta = dict(self.meta, original_size=[h, w])
        if meta.get("crop_box"):
            meta["crop_box"] = [v * size[1] / w if i % 2 == 0 else v * size[0] / h
                                for i, v in enumerate(meta["crop_box"])]
        return replace(self, map=m, image=image, meta=meta)

    def to_json(self) -> str:
        """Provenance and input as JSON; ``nbx.replay(json, model)`` recomputes the same map."""
        from .export import to_json
        return to_json(self)

    def save(self, path, **view) -> str:
        """Write .png (overlay, provenance in text chunks), .npz, .json or .html (static report)."""
        from .export import save
        return save(self, path, **view)

    def __repr__(self) -> str:
        extra = f", delta={self.delta:.3g}" if self.delta is not None else ""
        return (f"Attribution(method={self.method!r}, target={self.target} ({self.label}), "
                f"map={self.map.shape}{extra})")


def display_map(raw: torch.Tensor, kind: str, reduce: str, input_hw: tuple[int, int],
                extent: Sequence[int] | None = None) -> torch.Tensor:
    """Method-native (1, ...) tensor -> (H, W) map at the model input's resolution, not yet normalised.

    ``extent``: the pixels a ViT's patch grid covers from the top-left corner when they differ from
    the input's (see ``layers.grid_extent``); the grid is laid over them, then cropped or zero-padded.
    """
    if kind == "pixel":
        r = raw[0]
        if reduce == "absmax":
            return r.abs().amax(0)
        return r.mean(0) if reduce == "mean" else r.sum(0)
    m = raw[0].float()
    eh, ew = extent if extent else input_hw
    m = F.interpolate(m[None, None], size=(eh, ew), mode="bilinear", align_corners=False)[0, 0]
    h, w = input_hw
    return F.pad(m[:h, :w], (0, max(0, w - ew), 0, max(0, h - eh)))


def normalise(m: np.ndarray) -> tuple[np.ndarray, float]:
    """Divide by max |value| (sign kept); an all-zero map stays zero."""
    scale = float(np.maximum(m.max(), -m.min())) if m.size else 0.0    # max |m| without an |m| copy
    return (m / np.float32(scale) if scale > 0 else m).astype(np.float32, copy=False), scale


def on_image(m: np.ndarray, original: np.ndarray | None, box) -> np.ndarray:
    return m if original is None else to_original_grid(m, box, original.shape[:2])
