"""Turn whatever the user calls an image into a PIL RGB image, and into the model's input tensor."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERP = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
           "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


MAX_SIDE = 8192          # a model input's side: larger is a typo (its tensor would not fit in memory)


@dataclass(frozen=True)
class Preprocess:
    """How a PIL image becomes the model's input; mirrors timm's eval transform."""

    size: tuple[int, int] = (224, 224)
    crop_pct: float = 0.875
    crop_mode: str = "center"          # center | squash | border, as in timm
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        size = (self.size,) * 2 if isinstance(self.size, (int, np.integer)) else self.size
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and 0 < s <= MAX_SIDE
                           for s in size)):
            raise ValueError(f"Preprocess(size={self.size!r}): the model input's side, or (height, width), in "
                             f"whole pixels from 1 to {MAX_SIDE}")
        object.__setattr__(self, "size", tuple(int(s) for s in size))
        if (isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float, np.number))
                or not 0.1 <= float(self.crop_pct) <= 4):
            raise ValueError(f"Preprocess(crop_pct={self.crop_pct!r}): the crop's share of the resized picture, "
                             "a number from 0.1 to 4 (timm's default 0.875; 1.0 keeps it all; VOLO's 1.15 pads)")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                numbers = tuple(float(v) for v in (value if np.ndim(value) else (value,)))
            except (TypeError, ValueError):
                numbers = ()
            if isinstance(value, str) or not numbers or not all(math.isfinite(v) for v in numbers):
                raise ValueError(f"Preprocess({name}={value!r}): one finite number per input channel, e.g. "
                                 f"{name}={IMAGENET_MEAN if name == 'mean' else IMAGENET_STD}")
            object.__setattr__(self, name, numbers)
        if self.interpolation not in _INTERP:
            raise ValueError(f"Preprocess(interpolation={self.interpolation!r}): use one of {sorted(_INTERP)}")
        if self.crop_mode not in ("center", "squash", "border"):
            raise ValueError(f"Preprocess(crop_mode={self.crop_mode!r}): use 'center', 'squash' or 'border'")
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError("Preprocess: mean and std need one positive value per channel")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def as_dict(self) -> dict:
        return {"size": list(self.size), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N,C,H,W) pixels in [0, 1] -> model input space."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x * std + mean

    def geometry(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(resized w, h) and the (left, top) of the crop window in resized pixels (negative = padding)."""
        th, tw = self.size
        sh, sw = (math.floor(s / self.crop_pct) for s in self.size)
        if self.crop_mode == "squash":
            rw, rh = sw, sh
        elif self.crop_mode == "border":
            r = min(sh / height, sw / width)
            rw, rh = round(width * r), round(height * r)
        elif sh == sw:                      # torchvision Resize(int): shorter side to `sh`
            if width <= height:
                rw, rh = sw, int(sw * height / width)
            else:
                rw, rh = int(sh * width / height), sh
        else:                               # timm ResizeKeepRatio
            r = max(sh / height, sw / width)
            rw, rh = round(width * r), round(height * r)
        return (rw, rh), (int(round((rw - tw) / 2.0)), int(round((rh - th) / 2.0)))

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
        """PIL RGB -> ((C,H,W) normalised tensor, crop box in original-image pixels); a one-channel
        model gets the image's luminance (PIL's "L")."""
        if self.channels not in (1, 3):
            raise ValueError(f"images: the model takes {self.channels}-channel input, which a picture does not "
                             f"have; pass an already preprocessed (N,{self.channels},H,W) tensor")
        (rw, rh), (left, top) = self.geometry(*img.size)
        th, tw = self.size
        resized = img.resize((rw, rh), _INTERP[self.interpolation])
        fill = tuple(round(255 * self.mean[i % self.channels]) for i in range(3)) if self.crop_mode == "border" else 0
        canvas = Image.new("RGB", (tw, th), fill)
        canvas.paste(resized, (-left, -top))
        if self.channels == 1:
            canvas = canvas.convert("L")
        x = torch.from_numpy(np.asarray(canvas, dtype=np.float32).reshape(th, tw, -1) / 255.0).permute(2, 0, 1)
        sx, sy = rw / img.size[0], rh / img.size[1]
        box = (left / sx, top / sy, (left + tw) / sx, (top + th) / sy)
        return self.normalize(x[None])[0], box


def to_pil(image: Any) -> Image.Image:
    """Path, PIL image (any mode, EXIF-rotated) or HWC numpy array -> PIL RGB."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            url = str(image).lower().startswith(("http://", "https://", "ftp://"))
            raise FileNotFoundError(f"image: no file at {os.fspath(image)!r}" + (
                "; nbexplain reads local files only: download the picture first and pass its path" if url else ""))
        if os.path.isdir(image):
            raise ValueError(f"image: {os.fspath(image)!r} is a folder; pass one picture's path, or explain a "
                             "whole folder with nbx.explain_batch(model, folder)")
        try:
            with Image.open(image) as f:
                f.load()
                return to_pil(f)
        except PermissionError:
            raise
        except (OSError, SyntaxError) as e:        # not a picture, or a truncated one (PIL names neither file nor fix)
            raise ValueError(f"image: {os.fspath(image)!r} could not be read as a picture ({type(e).__name__}: {e}); "
                             "check the file (a truncated download?) or save it again as PNG or JPEG") from e
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image: the picture is empty ({image.width}x{image.height} pixels)")
        return _pil_to_rgb(ImageOps.exif_transpose(image) or image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_uint8(image))
    raise TypeError(f"image: expected a path, a PIL image, an HWC numpy array or an (N,C,H,W) tensor, "
                    f"got {type(image).__name__}")


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert('RGB') clips high-bit-depth values at 255: rescale by the type's range instead
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError(f"image: the {img.mode}-mode picture holds NaN or Inf values")
        if arr.min() < -1e-6:
            # normalised data (a float image in [-1, 1]): clipping would silently black out its lower half
            raise ValueError(f"image: the {img.mode}-mode picture holds negative values ({arr.min():.3g}.."
                             f"{arr.max():.3g}); pixels run 0..1, 0..255 or 0..65535: rescale them, or pass the "
                             "normalised data as a preprocessed (N,C,H,W) tensor")
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode == "La":                       # premultiplied: PIL converts it to LA only
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        # transparent pixels are shown on white, as an image viewer would
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.size == 0:
        raise ValueError("image: the array is empty")
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image: array of shape {a.shape} looks channels-first; pass HWC "
                         f"(np.transpose(a, (1, 2, 0)))")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"image: expected an HxW or HxWx3/4 array, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("image: the array contains NaN or infinite values")
        if a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise ValueError(f"image: float arrays must hold pixels in [0, 1] (got {a.min():.3g}..{a.max():.3g}); "
                             "divide uint8-range data by 255")
        a = np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise TypeError(f"image: unsupported array dtype {a.dtype}; use uint8 or float in [0, 1]")
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    if a.shape[-1] == 4:
        return np.asarray(_pil_to_rgb(Image.fromarray(np.ascontiguousarray(a), "RGBA")))
    return np.ascontiguousarray(a)


@dataclass
class Prepared:
    """A batch ready for the model, and what is needed to show maps on the user's own pixels."""

    x: torch.Tensor                                   # (N,C,H,W) model input, detached copy
    originals: list[np.ndarray | None]                # (h,w,3) uint8 per image, None for tensor inputs
    boxes: list[tuple[float, float, float, float] | None] = field(default_factory=list)


def prepare(images: Any, preprocess: Preprocess | None) -> Prepared:
    """Images (one or a list) or an already preprocessed tensor -> a Prepared batch."""
    if isinstance(images, torch.Tensor):
        return _prepare_tensor(images, preprocess)
    items: Sequence = images if isinstance(images, (list, tuple)) else [images]
    if len(items) == 0:
        raise ValueError("images: the list is empty")
    if any(isinstance(i, torch.Tensor) for i in items):
        return _prepare_tensor(_stack_tensors(items), preprocess)
    if preprocess is None:
        raise ValueError("preprocess: this model carries no preprocessing config; pass "
                         "preprocess=nbx.Preprocess(size=224, mean=..., std=...), or pass an already "
                         "preprocessed (N,C,H,W) tensor")
    pils = [to_pil(i) for i in items]
    pairs = [preprocess(p) for p in pils]
    x = torch.stack([t for t, _ in pairs])
    return Prepared(x, [np.asarray(p) for p in pils], [b for _, b in pairs])


def _stack_tensors(items: Sequence) -> torch.Tensor:
    """A list of preprocessed (C,H,W) tensors as one batch: a tensor is already model input, pictures are
    not, so the two kinds cannot share a batch."""
    others = [type(i).__name__ for i in items if not isinstance(i, torch.Tensor)]
    if others:
        raise TypeError(f"images: the list mixes tensors (preprocessed model input) with {others[0]} (a picture); "
                        "pass all pictures (paths, PIL images, HWC arrays) or all tensors")
    shapes = {tuple(i.shape) for i in items}
    if len(shapes) > 1:
        raise ValueError(f"images: tensors of different shapes {sorted(shapes)} cannot form one batch; resize "
                         "them to one size, or pass the pictures themselves to have them resized")
    return torch.stack(list(items))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: a finite sum says so at a tenth of the cost of an elementwise check (a NaN or
    an infinity makes the sum non-finite); only a sum that overflowed needs that check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _prepare_tensor(t: torch.Tensor, preprocess: Preprocess | None) -> Prepared:
    if t.layout != torch.strided:
        raise ValueError(f"images: a {t.layout} tensor holds its values sparsely; pass t.to_dense()")
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"images: a tensor must be (N,C,H,W) or (C,H,W), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"images: the tensor is empty (shape {tuple(t.shape)})")
    if t.device.type == "meta":
        raise ValueError("images: the tensor is on the meta device, so it holds no values to explain; pass one "
                         "with data (on the CPU or the model's device)")
    if not t.is_floating_point():
        raise TypeError(f"images: a tensor input must be float (already preprocessed), got {t.dtype}; "
                        "pass uint8 pixels as a numpy HWC array instead")
    if not all_finite(t):
        raise ValueError("images: the tensor contains NaN or infinite values")
    n = preprocess.channels if preprocess is not None else None
    if n is not None and t.shape[1] != n:
        # the permute is the fix only when the channels sit last; otherwise it would mislead
        fix = "is it NHWC? use t.permute(0, 3, 1, 2)" if t.shape[-1] == n else \
            f"pass a (N,{n},H,W) tensor" + (", or the picture itself to have it converted" if n in (1, 3) else "")
        raise ValueError(f"images: the model expects {n} channel{'s' if n != 1 else ''}, the tensor has "
                         f"{t.shape[1]} (shape {tuple(t.shape)}); {fix}")
    t = t.detach().clone() if t.dtype in (torch.float32, torch.float64) else t.detach().float()
    return Prepared(t, [None] * t.shape[0], [None] * t.shape[0])


def to_original_grid(m: np.ndarray, box: tuple[float, float, float, float] | None,
                     shape: tuple[int, int]) -> np.ndarray:
    """Place a map computed on the model's crop back onto the original image (zero outside the crop)."""
    if box is None:
        return m
    h, w = shape
    x0, y0, bw, bh = _placed(box)
    # shrinking (a picture smaller than the model's input) averages what each pixel covers: plain bilinear
    # reads 4 points of the map per pixel, and a 1x1 picture's map was then one point, often 0
    resized = F.interpolate(torch.from_numpy(m)[None, None], size=(bh, bw), mode="bilinear", align_corners=False,
                            antialias=bh < m.shape[0] or bw < m.shape[1])[0, 0].numpy()
    out = np.zeros((h, w), np.float32)
    sx0, sy0 = max(0, -x0), max(0, -y0)
    x1, y1 = min(w, x0 + bw), min(h, y0 + bh)
    out[max(0, y0):y1, max(0, x0):x1] = resized[sy0:sy0 + y1 - max(0, y0), sx0:sx0 + x1 - max(0, x0)]
    return out


def shrunk_size(h: int, w: int, max_side: int) -> tuple[int, int]:
    """(h, w) scaled down so the longer side is at most ``max_side``; unchanged when it already is."""
    f = min(1.0, max_side / max(h, w))
    return max(1, round(h * f)), max(1, round(w * f))


def area_resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) or (h, w, c) array -> float32 at ``size``, each output pixel the mean of those it covers."""
    t = torch.from_numpy(np.ascontiguousarray(a, np.float32))
    t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
    out = F.interpolate(t, size=tuple(size), mode="area")[0]
    return out[0].numpy() if a.ndim == 2 else out.permute(1, 2, 0).numpy()


def crop_slices(box: tuple[float, float, float, float] | None) -> tuple[slice, slice]:
    """Rows and columns of the original image inside the model's crop (all of them without a crop)."""
    if box is None:
        return slice(None), slice(None)
    x0, y0, bw, bh = _placed(box)
    return slice(max(0, y0), max(0, y0 + bh)), slice(max(0, x0), max(0, x0 + bw))


def _placed(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """(left, top, width, height) in whole pixels of a crop box: one rounding for where a map is placed on the
    photo and for the region compared (rounding each edge on its own put them a pixel apart)."""
    left, top, right, bottom = box
    return round(left), round(top), max(1, round(right - left)), max(1, round(bottom - top))
