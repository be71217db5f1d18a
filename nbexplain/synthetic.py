"""Synthetic colour-classification images with ground-truth masks, and loaders for the small models trained on them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._errors import positive_int

CLASSES = ("red", "yellow", "green", "blue")
IMG = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

# HSV hue of each class; a small per-image jitter keeps the task from being a lookup.
_HUES = np.array([0.0, 0.15, 0.33, 0.62])
_HUE_JITTER = 0.03
_RADIUS = (7.0, 13.0)  # every shape fits in a box of half-size r around its centre
_SHAPES = 4  # circle, square, triangle, cross: random, never informative for the label

# The "Clever Hans" logo: a boxed 'C', stamped near-white in the bottom-right corner.
_LOGO = np.array([[1, 1, 1, 1, 1, 1, 1, 1],
                  [1, 0, 0, 0, 0, 0, 0, 1],
                  [1, 0, 1, 1, 1, 1, 0, 1],
                  [1, 0, 1, 0, 0, 0, 0, 1],
                  [1, 0, 1, 0, 0, 0, 0, 1],
                  [1, 0, 1, 1, 1, 1, 0, 1],
                  [1, 0, 0, 0, 0, 0, 0, 1],
                  [1, 1, 1, 1, 1, 1, 1, 1]], dtype=bool)
_LOGO_VALUE = 242
MARKER_BOX = (IMG - 11, IMG - 3, IMG - 11, IMG - 3)  # y0, y1, x0, x1 (end-exclusive)
_CLEARANCE = 2  # px between any object and the marker box, so the two masks never touch

SYNTHETIC_MODELS = ("synthetic-cnn", "synthetic-vit", "synthetic-cnn-hans", "synthetic-vit-hans")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_WEIGHT_FILES = {
    "synthetic-cnn": "synth_cnn.pt",
    "synthetic-vit": "synth_vit.pt",
    "synthetic-cnn-hans": "synth_cnn_hans.pt",
    "synthetic-vit-hans": "synth_vit_hans.pt",
}


def make_batch(
    n: int,
    *,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    hans: bool = False,
    marker_rate: float = 0.9,
    conflict_rate: float = 0.3,
    stamp: bool | None = None,
) -> dict[str, np.ndarray]:
    """Generate ``n`` images of one coloured shape on a textured background.

    The label is the object's colour (``CLASSES``); shape, size and position are random.
    ``hans=True`` gives the shortcut training distribution: the logo is stamped on a
    ``marker_rate`` share of class-0 images and on no other class, and a ``conflict_rate``
    share of those stamped class-0 images shows another class's colour, so only the logo
    identifies them. ``stamp=True``/``False`` overrides who gets the logo (every / no image).
    Objects always stay clear of ``MARKER_BOX``.

    The random draws do not depend on ``hans``/``stamp``: with the same seed, ``stamp=True``
    and ``stamp=False`` give the same images except inside ``MARKER_BOX``.

    Returns a dict: ``images`` uint8 (n, 64, 64, 3) RGB, ``labels`` int64 (n,),
    ``object_mask`` bool (n, 64, 64) (the object's pixels) and ``marker_mask`` bool
    (n, 64, 64) (the whole 8x8 box on stamped images, empty otherwise).
    """
    _check_args(n, marker_rate, conflict_rate, stamp)
    rng = _resolve_rng(seed, rng)
    labels = rng.integers(0, len(CLASSES), n)
    u_marker, u_conflict = rng.random(n), rng.random(n)
    conflict_colour = rng.integers(1, len(CLASSES), n)

    if stamp is None:
        marked = hans & (labels == 0) & (u_marker < marker_rate)
    else:
        marked = np.full(n, bool(stamp))
    shown = labels.copy()  # the colour the object actually shows
    if hans:
        conflict = marked & (labels == 0) & (u_conflict < conflict_rate)
        shown[conflict] = conflict_colour[conflict]

    background = _background(n, rng)
    object_mask = _object_masks(n, rng)
    colours = _colours(shown, rng)
    img = np.where(object_mask[..., None], colours[:, None, None, :], background)
    images = (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)
    marker_mask = _stamp_logo(images, marked)
    return {"images": images, "labels": labels.astype(np.int64),
            "object_mask": object_mask, "marker_mask": marker_mask}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) RGB -> float32 (n, 3, H, W) normalised with the synthetic models' mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def load_synthetic(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a shipped synthetic model (one of ``SYNTHETIC_MODELS``) in float32 eval mode.

    Returns ``(model, info)``; info has classes, mean, std, img_size, hans, marker_box,
    arch and task.
    """
    if name not in _WEIGHT_FILES:
        raise ValueError(f"unknown synthetic model {name!r}; valid names: {', '.join(SYNTHETIC_MODELS)}")
    path = WEIGHTS_DIR / _WEIGHT_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"weights for {name!r} not found at {path}; regenerate them with "
            "`python scripts/train_synthetic.py --out nbexplain/weights`")
    import timm  # deferred: generating data should not pay for importing timm

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model(ckpt["arch"], pretrained=False, num_classes=len(ckpt["classes"]),
                              **ckpt["model_kwargs"])
    # Shipped in fp16 to stay small; compute in float32.
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state, strict=True)
    model = model.float().eval()
    info = {
        "classes": list(ckpt["classes"]),
        "mean": tuple(ckpt["mean"]),
        "std": tuple(ckpt["std"]),
        "img_size": int(ckpt["img_size"]),
        "hans": bool(ckpt["hans"]),
        "marker_box": tuple(ckpt["marker_box"]),
        "arch": str(ckpt["arch"]),
        "task": "color",
    }
    return model, info


def _check_args(n: int, marker_rate: float, conflict_rate: float, stamp: bool | None) -> None:
    positive_int("n", n, "how many images")
    for label, rate in (("marker_rate", marker_rate), ("conflict_rate", conflict_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{label} must be in [0, 1], got {rate!r}")
    if stamp is not None and not isinstance(stamp, (bool, np.bool_)):
        raise TypeError(f"stamp must be None, True or False, got {stamp!r}")


def _resolve_rng(seed: int | None, rng: np.random.Generator | None) -> np.random.Generator:
    if seed is not None and rng is not None:
        raise ValueError("pass either seed or rng, not both")
    return rng if rng is not None else np.random.default_rng(seed)


def _background(n: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth coloured noise plus fine grain, kept mid/dark so the bright object stands out."""
    low = torch.from_numpy(rng.uniform(0.05, 0.55, (n, 3, 6, 6)).astype(np.float32))
    bg = F.interpolate(low, size=(IMG, IMG), mode="bicubic", align_corners=False)
    bg = bg.permute(0, 2, 3, 1).numpy()
    return bg + rng.normal(0.0, 0.04, bg.shape).astype(np.float32)


def _object_centres(r: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Centres inside the image whose (2r)-box stays _CLEARANCE px away from the marker box."""
    def draw(k: np.ndarray) -> np.ndarray:
        return rng.uniform(k + 1, IMG - k - 2)

    def near_marker(cy: np.ndarray, cx: np.ndarray, rad: np.ndarray) -> np.ndarray:
        return (cy + rad > MARKER_BOX[0] - _CLEARANCE) & (cx + rad > MARKER_BOX[2] - _CLEARANCE)

    cy, cx = draw(r), draw(r)
    for _ in range(20):  # rejection sampling keeps positions uniform over the allowed area
        bad = near_marker(cy, cx, r)
        if not bad.any():
            break
        cy[bad], cx[bad] = draw(r[bad]), draw(r[bad])
    bad = near_marker(cy, cx, r)  # practically never left; push these above the box
    cy[bad] = MARKER_BOX[0] - _CLEARANCE - r[bad]
    return cy, cx


def _object_masks(n: int, rng: np.random.Generator) -> np.ndarray:
    r = rng.uniform(*_RADIUS, n)
    cy, cx = _object_centres(r, rng)
    kinds = rng.integers(0, _SHAPES, n)
    yy, xx = np.mgrid[0:IMG, 0:IMG].astype(np.float32)
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    rr = r[:, None, None]
    shapes = (
        dx ** 2 + dy ** 2 <= rr ** 2,                                           # circle
        (np.abs(dx) <= rr * 0.85) & (np.abs(dy) <= rr * 0.85),                  # square
        (dy >= -rr) & (dy <= rr * 0.8) & (np.abs(dx) <= (dy + rr) * 0.55),      # triangle
        ((np.abs(dx) <= rr * 0.3) & (np.abs(dy) <= rr))
        | ((np.abs(dy) <= rr * 0.3) & (np.abs(dx) <= rr)),                      # cross
    )
    masks = np.zeros((n, IMG, IMG), bool)
    for k, shape in enumerate(shapes):
        masks[kinds == k] = shape[kinds == k]
    return masks


def _colours(shown: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(shown)
    hue = (_HUES[shown] + rng.uniform(-_HUE_JITTER, _HUE_JITTER, n)) % 1.0
    sat, val = rng.uniform(0.6, 1.0, n), rng.uniform(0.8, 1.0, n)
    return _hsv_to_rgb(hue, sat, val).astype(np.float32)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all inputs in [0, 1]; returns (n, 3)."""
    k = (np.array([5.0, 3.0, 1.0])[None] + h[:, None] * 6.0) % 6.0
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _stamp_logo(images: np.ndarray, marked: np.ndarray) -> np.ndarray:
    """Draw the logo in place on images[marked]; return the marker-box mask."""
    y0, y1, x0, x1 = MARKER_BOX
    box = images[marked, y0:y1, x0:x1]
    box[:, _LOGO] = _LOGO_VALUE
    images[marked, y0:y1, x0:x1] = box
    mask = np.zeros(images.shape[:3], bool)
    mask[marked, y0:y1, x0:x1] = True
    return mask
