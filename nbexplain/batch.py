"""Explain a whole batch at once: attributions, faithfulness, shortcut flags, per-class mean maps.

``explain_batch(model, images, method)`` accepts a list of images, an (N,H,W,3) uint8 array, an
(N,C,H,W) preprocessed tensor, a folder of image files or a torch DataLoader, and returns a
``BatchResult`` that ``nbexplain.gallery.Gallery`` shows as a grid of thumbnails.
"""
from __future__ import annotations

import html
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._errors import positive_int
from .api import attribute, class_index
from .attribution import Attribution
from .calls import call, eager, inputs_for, probabilities
from .hygiene import borrowed, model_device
from .images import area_resize, to_pil
from .models import describe
from .trust.faithfulness import Curves, input_map, perturbed
from .trust.shortcuts import GROW, OUTSIDE_FLAG, fixed_hotspots, outside_share
from .trust.similarity import seen_region

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FLAG_RULES = ("auto", "outside", "hotspot", "any", "all")

# name -> (what it is, True when a high value is the suspicious / worse end)
METRICS = {
    "prob": ("probability of the explained class", False),
    "outside_share": ("share of the strongest evidence off the object (needs masks)", True),
    "deletion_auc": ("deletion AUC: lower is better", True),
    "insertion_auc": ("insertion AUC: higher is better", False),
}


@dataclass
class BatchItem:
    """One image of a batch: its attribution, metric values and shortcut flags."""

    index: int
    name: str
    attribution: Attribution
    metrics: dict[str, float]
    flags: dict[str, bool]                  # signal -> fired: 'outside' (with masks), 'hotspot'
    flagged: bool                           # the combined flag (see explain_batch's flag_rule)
    reasons: list[str] = field(default_factory=list)
    true_label: int | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    curves: Curves | None = field(default=None, repr=False)

    @property
    def map(self) -> np.ndarray:
        return self.attribution.map

    @property
    def image(self) -> np.ndarray | None:
        return self.attribution.image

    @property
    def target(self) -> int:
        return self.attribution.target

    @property
    def label(self) -> str | None:
        return self.attribution.label

    @property
    def prediction(self) -> int:
        return int(self.attribution.probs[0][0])


class BatchResult:
    """What ``explain_batch`` returns: one ``BatchItem`` per image, in input order."""

    def __init__(self, items: list[BatchItem], *, model: torch.nn.Module, method: str, params: dict,
                 class_names: Sequence[str] | None, flag_rule: str, hotspot: tuple[float, float] | None,
                 has_masks: bool, attribute_kwargs: dict | None = None,
                 outside_threshold: float = OUTSIDE_FLAG, skipped: Sequence[tuple[int, str, str]] = ()) -> None:
        self.items = items
        self.model = model
        self.method = method
        self.params = dict(params)
        self.class_names = tuple(class_names) if class_names else None
        self.flag_rule = flag_rule
        self.hotspot = hotspot              # (row, col) where many maps peak, on the common grid; or None
        self.has_masks = has_masks
        self.attribute_kwargs = dict(attribute_kwargs or {})   # preprocess=, labels= as given
        self.outside_threshold = outside_threshold
        self.skipped = list(skipped)        # (input position, file name, why) of image files that could not be read

    def rescore(self, masks: Sequence[np.ndarray] | np.ndarray | None = None, *, flag_rule: str = "auto",
                outside_threshold: float | None = None) -> "BatchResult":
        """The same maps scored again with other masks (``None``: mask-free, as if ``explain_batch`` had been
        called without ``masks=``), another flag rule or threshold; nothing is recomputed by the model."""
        if flag_rule not in FLAG_RULES:
            raise ValueError(f"flag_rule: use one of {', '.join(FLAG_RULES)}")
        threshold = self.outside_threshold if outside_threshold is None else outside_threshold
        mask_list = _mask_list(masks, len(self.items))
        curves = [it.curves for it in self.items] if all(it.curves is not None for it in self.items) else None
        items, hotspot = _score(self.attributions, [it.name for it in self.items],
                                [it.true_label for it in self.items], [it.metrics["prob"] for it in self.items],
                                curves, mask_list, flag_rule, threshold)
        return BatchResult(items, model=self.model, method=self.method, params=self.params,
                           class_names=self.class_names, flag_rule=flag_rule, hotspot=hotspot,
                           has_masks=mask_list is not None, attribute_kwargs=self.attribute_kwargs,
                           outside_threshold=threshold, skipped=self.skipped)

    # --- a sequence of items ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> BatchItem:
        return self.items[i]

    def __iter__(self) -> Iterator[BatchItem]:
        return iter(self.items)

    @property
    def attributions(self) -> list[Attribution]:
        return [it.attribution for it in self.items]

    @property
    def maps(self) -> list[np.ndarray]:
        return [it.map for it in self.items]

    @property
    def flagged(self) -> np.ndarray:
        """The combined flag per image (bool array)."""
        return np.array([it.flagged for it in self.items], bool)

    def flag_rate(self, signal: str | None = None, where: Sequence[bool] | np.ndarray | None = None) -> float:
        """Share of images flagged (by the combined flag, or one signal: 'outside' or 'hotspot'),
        optionally among the images selected by the boolean ``where``."""
        if signal not in (None, "outside", "hotspot"):
            raise ValueError(f"flag_rate: unknown signal {signal!r}; use 'outside', 'hotspot' or None (the combined flag)")
        values = np.array([it.flagged if signal is None else bool(it.flags.get(signal, False))
                           for it in self.items], bool)
        if where is not None:
            where = np.asarray(where, bool)
            if where.shape != values.shape:
                raise ValueError(f"flag_rate: where has {where.size} entries for {values.size} images; pass one "
                                 "boolean per image")
            values = values[where]
        return float(values.mean()) if values.size else 0.0

    @property
    def metric_names(self) -> list[str]:
        """The metrics every image has a value for, in a fixed order."""
        return [m for m in METRICS if self.items and all(m in it.metrics for it in self.items)]

    def class_name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)

    # --- sorting and tables -------------------------------------------------------------------------
    def order(self, by: str = "index", descending: bool | None = None) -> list[int]:
        """Image indices sorted by ``by`` ('index', 'flagged', or a metric name). ``descending=None`` puts
        the suspicious end first: flagged first, high outside share / deletion AUC, low insertion AUC
        or probability. Images without a value go last."""
        if by == "index":
            keys = [float(it.index) for it in self.items]
            desc = bool(descending)
        elif by == "flagged":
            keys = [float(it.flagged) + 1e-3 * it.metrics.get("outside_share", 0.0) for it in self.items]
            desc = True if descending is None else descending
        elif by in METRICS:
            if not any(by in it.metrics for it in self.items):
                how = "pass masks= to explain_batch or rescore()" if by == "outside_share" else \
                    "pass faithfulness=True to explain_batch"
                raise ValueError(f"sort: {by!r} was not computed for this batch; {how}")
            keys = [it.metrics.get(by, math.nan) for it in self.items]
            desc = METRICS[by][1] if descending is None else descending
        else:
            raise ValueError(f"sort: unknown key {by!r}; use index, flagged or one of {', '.join(self.metric_names)}")
        present = [i for i, k in enumerate(keys) if not math.isnan(k)]
        missing = [i for i, k in enumerate(keys) if math.isnan(k)]
        present.sort(key=lambda i: (-keys[i] if desc else keys[i], i))
        return [self.items[i].index for i in present + missing]

    def table(self, sort_by: str | None = None, descending: bool | None = None) -> list[dict]:
        """One row per image: index, name, explained class, probability, metrics, flags, reasons."""
        order = self.order(sort_by or "index", descending)
        rows = []
        for i in order:
            it = self.items[i]
            row = {"index": it.index, "name": it.name, "target": it.target,
                   "label": it.label if it.label is not None else str(it.target)}
            if it.true_label is not None:
                row["true_label"] = self.class_name(it.true_label)
            row.update({k: it.metrics[k] for k in METRICS if k in it.metrics})
            row.update({f"flag_{k}": v for k, v in it.flags.items()})
            row["flagged"] = it.flagged
            row["reasons"] = "; ".join(it.reasons)
            rows.append(row)
        return rows

    # --- summaries ----------------------------------------------------------------------------------
    def mean_map_per_class(self, by: str = "target") -> dict[int, np.ndarray]:
        """Mean heatmap per class: ``by='target'`` groups by the explained class, ``'true'`` by the
        true label (when known). Maps of different sizes are resampled to the most common size."""
        if by not in ("target", "true"):
            raise ValueError("by: use 'target' (the explained class) or 'true' (the true label)")
        shape = self.common_shape()
        groups: dict[int, list[np.ndarray]] = {}
        for it in self.items:
            key = it.target if by == "target" else it.true_label
            if key is None:
                continue
            groups.setdefault(int(key), []).append(_resample(it.map, shape))
        return {k: np.mean(v, 0).astype(np.float32) for k, v in sorted(groups.items())}

    def class_counts(self, by: str = "target") -> dict[int, int]:
        counts: dict[int, int] = {}
        for it in self.items:
            key = it.target if by == "target" else it.true_label
            if key is not None:
                counts[int(key)] = counts.get(int(key), 0) + 1
        return dict(sorted(counts.items()))

    def common_shape(self) -> tuple[int, int]:
        shapes = [tuple(it.map.shape) for it in self.items]
        return max(set(shapes), key=shapes.count) if shapes else (0, 0)

    def summary(self) -> str:
        n = len(self.items)
        k = int(self.flagged.sum())
        parts = [f"{n} image{'s' if n != 1 else ''}, {self.method}: {k} flagged ({k / max(n, 1):.0%}, "
                 f"rule {self.flag_rule!r})"]
        for signal in ("outside", "hotspot"):
            if any(signal in it.flags for it in self.items):
                parts.append(f"{signal}: {self.flag_rate(signal):.0%}")
        if self.hotspot is not None:
            parts.append(f"fixed hotspot at row {self.hotspot[0]:.0f}, col {self.hotspot[1]:.0f}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable file{'s' if len(self.skipped) != 1 else ''} skipped")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"BatchResult({self.summary()})"

    def _repr_html_(self) -> str:
        rows = self.table()
        if not rows:
            return "<p>empty batch</p>"
        cols = [c for c in rows[0] if c not in ("reasons",)] + ["reasons"]
        e = lambda v: html.escape(f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
        head = "".join(f"<th>{e(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{e(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
        return f"<p>{e(self.summary())}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def explain_batch(model: torch.nn.Module, images: Any, method: str = "integrated_gradients", *,
                  masks: Sequence[np.ndarray] | np.ndarray | None = None, target: Any = None,
                  batch_size: int = 16, progress: bool | Callable[[int, int], None] = True,
                  faithfulness: bool = False, faithfulness_steps: int = 20, fill: str = "blur",
                  flag_rule: str = "auto", outside_threshold: float = OUTSIDE_FLAG,
                  names: Sequence[str] | None = None, true_labels: Sequence[int | str] | None = None,
                  max_side: int | None = 1024, **params: Any) -> BatchResult:
    """Explain every image of ``images`` with ``method`` and score each map.

    ``images``: a list (paths, PIL images, HWC arrays, (C,H,W) tensors), an (N,H,W,3) uint8 array, an
    (N,C,H,W) preprocessed tensor, a folder of image files, a Dataset, or a DataLoader yielding ``images``,
    ``(images, labels)``, ``(images, labels, masks)`` or dicts with 'image'/'label'/'mask' keys; float
    tensors are taken as model input (already preprocessed), uint8 tensors as pixels. An image file that
    cannot be read is skipped with a warning and listed in the result's ``skipped``; per-image
    ``target``, ``masks``, ``true_labels`` and ``names`` are given for every input image, readable or not.
    ``progress``: True (a bar in a notebook, a line on stderr elsewhere), False, or ``f(done, total)``.
    ``masks``: per image an (H,W) bool object mask on the image's own grid; gives ``outside_share``
    (share of the top 5 % of positive evidence outside the grown mask) and the 'outside' flag.
    ``target``: None (predicted class), one class for all, or one per image.
    ``faithfulness=True`` adds deletion/insertion AUCs, computed batched across images.
    ``flag_rule``: how ``flagged`` combines the signals: 'auto' ('outside' with masks, else
    'hotspot'), 'outside', 'hotspot', 'any' or 'all'. The fixed-hotspot signal (the map's peak sits
    where many images of the batch peak) needs no masks, but only means something when the objects
    move between images: on centred photos every peak is in the middle.
    ``max_side``: each item keeps its image and map with the longer side at most this many pixels
    (masks may still be given on the full-size grid); None keeps full size (84 MB per 12 MP photo).
    Each item also keeps its model input and method-native tensor (for later trust checks and exports):
    about 1.5 MB per 224-px image for pixel methods, so explain tens of thousands of images in slices
    and keep each slice's ``table()``.
    Other keywords go to ``nbx.attribute`` (``steps=16``, ``layer=``, ``preprocess=``, ``labels=``…).
    """
    if flag_rule not in FLAG_RULES:
        raise ValueError(f"flag_rule: use one of {', '.join(FLAG_RULES)}")
    batch_size = positive_int("batch_size", batch_size, "images per call")
    faithfulness_steps = positive_int("faithfulness_steps", faithfulness_steps, "deletion/insertion steps")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 16):
        raise ValueError(f"max_side={max_side!r}: expected an integer of at least 16, or None for full size")
    model = eager(model)            # its own passes (probabilities, curves) too, not only attribute()'s
    source = _Source(images, batch_size)
    total = source.total
    mask_list = _mask_list(masks, total)
    if isinstance(target, (list, tuple, np.ndarray, torch.Tensor)) and total is not None and len(target) > total:
        raise ValueError(f"target: got {len(target)} targets for {total} images; pass one per image or one for all")
    work = total * (2 if faithfulness else 1) if total is not None else None
    bar = _Progress(work, f"{method}", progress)
    attribute_kwargs = {k: params[k] for k in ("preprocess", "labels") if k in params}
    exps: list[Attribution] = []
    item_names: list[str] = []
    truths: list[int | None] = []
    loader_masks: list[np.ndarray | None] = []
    positions: list[int] = []
    try:
        for chunk in source:
            chunk_target = _pick_target(target, chunk.positions)
            done = bar.value

            def report(fraction: float, _done=done, _n=len(chunk.images)) -> None:
                bar.update(_done + fraction * _n)

            out = attribute(model, chunk.images, method, target=chunk_target, progress=report, **params)
            out = out if isinstance(out, list) else [out]
            exps.extend(out if max_side is None else [e.downsized(max_side) for e in out])
            item_names.extend(chunk.names)
            truths.extend(chunk.labels)
            loader_masks.extend(chunk.masks)
            positions.extend(chunk.positions)
            bar.update(len(exps) + len(source.skipped))     # input images handled so far
        given = len(exps) + len(source.skipped)        # images in the input, readable or not
        if not exps:
            if source.skipped:
                raise ValueError(f"images: none of the {given} image files could be read; first: "
                                 f"{source.skipped[0][1]!r} ({source.skipped[0][2]})")
            raise ValueError("images: nothing to explain (the input yielded no images)")
        if mask_list is None and any(m is not None for m in loader_masks):
            mask_list = loader_masks
        elif mask_list is not None:
            if len(mask_list) != given:
                raise ValueError(f"masks: got {len(mask_list)} masks for {given} images")
            mask_list = [mask_list[p] for p in positions]
        if true_labels is not None:
            if len(true_labels) != given:
                raise ValueError(f"true_labels: got {len(true_labels)} for {given} images")
            truths = [true_labels[p] for p in positions]
        truths = _checked_truths(model, exps, truths, positions, params)
        if names is not None:
            if len(names) != given:
                raise ValueError(f"names: got {len(names)} for {given} images")
            item_names = [str(names[p]) for p in positions]
        if source.skipped:
            listed = "; ".join(f"{name} ({why})" for _, name, why in source.skipped[:3])
            more = f" and {len(source.skipped) - 3} more" if len(source.skipped) > 3 else ""
            warnings.warn(f"explain_batch: skipped {len(source.skipped)} of {given} image files that could not "
                          f"be read: {listed}{more}. The result's .skipped lists them all; fix or remove them "
                          "to include them.", stacklevel=2)
        if bar.total is None or source.skipped:
            bar.set_total(given + (len(exps) if faithfulness else 0))
        probs = _target_probabilities(model, exps)
        curves = None
        if faithfulness:
            base = given
            curves = batched_curves(model, exps, steps=faithfulness_steps, fill=fill,
                                    batch_size=max(4 * batch_size, 2 * (faithfulness_steps + 1)),
                                    progress=lambda k: bar.update(base + k))
    finally:
        bar.close()

    items, hotspot = _score(exps, item_names, truths, probs, curves, mask_list, flag_rule, outside_threshold)
    return BatchResult(items, model=model, method=method, params={k: v for k, v in params.items()
                                                                   if k not in ("preprocess", "labels")},
                       class_names=describe(model, params.get("preprocess"), params.get("labels")).labels,
                       flag_rule=flag_rule, hotspot=hotspot, has_masks=mask_list is not None,
                       attribute_kwargs=attribute_kwargs, outside_threshold=outside_threshold,
                       skipped=source.skipped)


def _score(exps: list[Attribution], names: list[str], truths: list, probs: list[float],
           curves: list[Curves] | None, mask_list: list | None, flag_rule: str,
           outside_threshold: float) -> tuple[list[BatchItem], tuple[float, float] | None]:
    """Metrics and flags for each attribution; the fixed hotspot is found across the whole batch."""
    shape = _common_shape([e.map for e in exps])
    hot_flags, hotspot = fixed_hotspots([_resample(e.map, shape) for e in exps])
    items = []
    for i, exp in enumerate(exps):
        metrics = {"prob": probs[i]}
        flags: dict[str, bool] = {}
        reasons: list[str] = []
        mask = None
        if mask_list is not None:
            mask = _check_mask(mask_list[i], exp, i)
            # the mask grows by GROW pixels of the image as given, fewer on a map kept smaller
            full = max(exp.meta.get("original_size") or exp.map.shape)
            seen = seen_region(exp)         # the strongest 5 % of what the model saw, not of the whole photo
            share = outside_share(exp.map[seen], mask[seen], grow=max(1, round(GROW * max(exp.map.shape) / full)))
            metrics["outside_share"] = share
            flags["outside"] = bool(share > outside_threshold)
            if flags["outside"]:
                reasons.append(f"{share:.0%} of the strongest evidence lies off the object "
                               f"(threshold {outside_threshold:.0%})")
        flags["hotspot"] = bool(hot_flags[i])
        if flags["hotspot"] and hotspot is not None:
            reasons.append(f"the map peaks at a fixed hotspot (row {hotspot[0]:.0f}, col {hotspot[1]:.0f}) "
                           "shared by many images")
        if curves is not None:
            metrics["deletion_auc"] = curves[i].deletion_auc
            metrics["insertion_auc"] = curves[i].insertion_auc
        items.append(BatchItem(i, names[i], exp, metrics, flags, _combine(flags, flag_rule),
                               reasons, truths[i] if i < len(truths) else None, mask,
                               curves[i] if curves is not None else None))
    return items, hotspot


def _combine(flags: dict[str, bool], rule: str) -> bool:
    if rule == "auto":
        rule = "outside" if "outside" in flags else "hotspot"
    if rule in ("outside", "hotspot"):
        if rule not in flags:
            raise ValueError(f"flag_rule={rule!r} needs masks= (the object masks)")
        return flags[rule]
    values = list(flags.values())
    return any(values) if rule == "any" else all(values)


# --- inputs ---------------------------------------------------------------------------------------------
@dataclass
class _Chunk:
    images: Any                     # what nbx.attribute accepts: a list, or an (n,C,H,W) tensor
    names: list[str]
    labels: list[int | None]
    masks: list[np.ndarray | None]
    positions: list[int]            # each image's place in the input (per-image targets, masks, labels)


class _Source:
    """Whatever the user passed, as chunks of at most ``batch_size`` images."""

    def __init__(self, images: Any, batch_size: int) -> None:
        self.batch_size = batch_size
        self.loader = None
        self.items: list | None = None
        self.tensor: torch.Tensor | None = None
        self.names: list[str] | None = None
        self.skipped: list[tuple[int, str, str]] = []     # (input position, name, why) of unreadable files
        if isinstance(images, (str, os.PathLike)):
            path = os.fspath(images)
            if os.path.isdir(path):
                files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS)
                               and not f.startswith("."))
                if not files:
                    raise ValueError(f"images: no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path!r}")
                self.items = [os.path.join(path, f) for f in files]
                self.names = files
            else:
                self.items, self.names = [path], [os.path.basename(path)]
        elif isinstance(images, torch.Tensor) and images.ndim in (3, 4) and not images.is_floating_point():
            self.items = _as_images(images)     # uint8 pixels (NCHW or NHWC), as in a DataLoader batch
        elif isinstance(images, torch.Tensor):
            self.tensor = images if images.ndim == 4 else images[None]
        elif isinstance(images, np.ndarray):
            self.items = list(images) if images.ndim == 4 else [images]
        elif isinstance(images, (list, tuple)):
            self.items = list(images)
        elif isinstance(images, torch.utils.data.Dataset) and not isinstance(images, Iterable):
            # a map-style Dataset; pictures (an ImageFolder without a transform) are kept as lists
            self.loader = torch.utils.data.DataLoader(images, batch_size=batch_size, collate_fn=_collate)
        elif isinstance(images, Iterable):
            self.loader = images
        else:
            self.items = [images]               # one PIL image, or something attribute() explains
        if self.items is not None and not self.items:
            raise ValueError("images: the list is empty")
        if self.names is None and self.items is not None:
            self.names = [os.path.basename(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else f"image {i}"
                          for i, x in enumerate(self.items)]

    @property
    def total(self) -> int | None:
        if self.items is not None:
            return len(self.items)
        if self.tensor is not None:
            return int(self.tensor.shape[0])
        try:
            return len(self.loader.dataset)     # a DataLoader
        except (AttributeError, TypeError):
            return None

    def __iter__(self) -> Iterator[_Chunk]:
        b = self.batch_size
        if self.items is not None:
            for s in range(0, len(self.items), b):
                part, pos = self._readable(s, self.items[s:s + b])
                if part:
                    yield _Chunk(part, [self.names[p] for p in pos], [None] * len(part), [None] * len(part), pos)
        elif self.tensor is not None:
            for s in range(0, self.tensor.shape[0], b):
                part = self.tensor[s:s + b]
                pos = list(range(s, s + len(part)))
                yield _Chunk(part, [f"image {p}" for p in pos], [None] * len(part), [None] * len(part), pos)
        else:
            seen = 0
            for batch in self.loader:
                images, labels, masks = _unpack(batch)
                for s in range(0, len(images), b):
                    part = images[s:s + b]
                    n = len(part)
                    pos = list(range(seen, seen + n))
                    yield _Chunk(part, [f"image {p}" for p in pos],
                                 labels[s:s + b] if labels is not None else [None] * n,
                                 masks[s:s + b] if masks is not None else [None] * n, pos)
                    seen += n

    def _readable(self, start: int, part: list) -> tuple[list, list[int]]:
        """The chunk with its image files opened; a file that cannot be read is listed in ``skipped``
        (one bad JPEG in a folder of thousands should not cost the whole run)."""
        kept, pos = [], []
        for j, item in enumerate(part):
            if isinstance(item, (str, os.PathLike)):
                try:
                    item = to_pil(item)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    self.skipped.append((start + j, self.names[start + j], f"{type(e).__name__}: {e}"))
                    continue
            kept.append(item)
            pos.append(start + j)
        return kept, pos


def _collate(items: list) -> Any:
    """torch's collate, or plain lists where it cannot stack (PIL pictures, mixed sizes)."""
    try:
        return torch.utils.data.default_collate(items)
    except (TypeError, RuntimeError):
        if isinstance(items[0], (tuple, list)):
            return [list(column) for column in zip(*items)]
        return list(items)


def _unpack(batch: Any) -> tuple[Any, list[int] | None, list[np.ndarray] | None]:
    """A DataLoader batch -> (images for attribute(), labels, masks). An iterable of single pictures, or of
    (picture, label) pairs, is read as batches of one."""
    labels = masks = None
    if _single(batch):
        batch = [batch]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2 and _single(batch[0]) and _scalar(batch[1]):
        batch = ([batch[0]], [batch[1]], *([[batch[2]]] if len(batch) > 2 else []))
    if isinstance(batch, dict):
        images = batch.get("image", batch.get("images"))
        labels, masks = batch.get("label", batch.get("labels")), batch.get("mask", batch.get("masks"))
        if images is None:
            raise ValueError("DataLoader: a dict batch needs an 'image' or 'images' key")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2 and _batched(batch[0]):
        # (images, labels[, masks][, anything else]): a third item that is no map per image (an index or
        # a file name column) is not a mask
        images, labels = batch[0], batch[1]
        masks = batch[2] if len(batch) > 2 and _mask_batch(batch[2]) else None
    else:
        images = batch
    images = _as_images(images)
    if labels is not None:
        labels = _class_indices(labels)
    if masks is not None:
        masks = [np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m).astype(bool).squeeze() for m in masks]
    return images, labels, masks


def _single(x: Any) -> bool:
    """One picture (not a batch): a PIL image, a file path, or an (H,W), (C,H,W) or (H,W,C) array."""
    from PIL import Image
    return isinstance(x, (Image.Image, str, os.PathLike)) or \
        (isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim in (2, 3))


def _scalar(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) or (isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 0)


def _mask_batch(x: Any) -> bool:
    """One 2-D map per image: (N,H,W) or (N,1,H,W), or a list of 2-D arrays."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return x.ndim in (3, 4)
    return isinstance(x, (list, tuple)) and bool(x) and all(
        isinstance(m, (torch.Tensor, np.ndarray)) and m.ndim >= 2 for m in x)


def _class_indices(labels: Any) -> list[int]:
    """A loader's labels as class indices: ints, or one-hot rows (their argmax)."""
    if isinstance(labels, (torch.Tensor, np.ndarray)) and labels.ndim == 2:
        labels = labels.argmax(1)
    values = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"DataLoader: labels must be class indices (or one-hot rows), got {values[:3]!r}; "
                         "map names to indices in the dataset, or pass a dict batch without 'label'") from None


def _batched(x: Any) -> bool:
    return (isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 4) or isinstance(x, (list, tuple))


def _as_images(images: Any) -> Any:
    """A loader's image batch -> a float (N,C,H,W) tensor (already preprocessed) or a list of images."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.is_floating_point():
            return images.detach().cpu()
        arr = images.cpu().numpy()                 # uint8 pixels: NHWC, or NCHW turned into NHWC
        if arr.shape[-1] not in (1, 3, 4) and arr.shape[1] in (1, 3, 4):
            arr = np.transpose(arr, (0, 2, 3, 1))
        return list(arr)
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def _pick_target(target: Any, positions: list[int]) -> Any:
    """The targets of the images at these input positions (one per image given), or the one for all."""
    if isinstance(target, (list, tuple, np.ndarray, torch.Tensor)):
        seq = target.tolist() if hasattr(target, "tolist") else list(target)
        if positions and positions[-1] >= len(seq):
            raise ValueError(f"target: got {len(seq)} targets, fewer than the images; pass one per image "
                             "or one for all")
        return [seq[p] for p in positions]
    return target


def _mask_list(masks: Any, total: int | None) -> list[np.ndarray] | None:
    if masks is None:
        return None
    out = [np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m) for m in masks]
    if total is not None and len(out) != total:
        raise ValueError(f"masks: got {len(out)} masks for {total} images")
    return out


def _check_mask(mask: np.ndarray, exp: Attribution, i: int) -> np.ndarray:
    """The mask on the map's grid: as given, or shrunk (area > ½) from the full-size image's grid."""
    mask, shape = np.asarray(mask).astype(bool), tuple(exp.map.shape)
    if mask.shape == tuple(exp.meta.get("original_size") or ()) and mask.shape != shape:
        return area_resize(mask, shape) > 0.5
    if mask.shape != shape:
        full = exp.meta.get("original_size")
        raise ValueError(f"masks[{i}]: shape {mask.shape} differs from the image's "
                         f"{tuple(full) if full else shape}; masks lie on the image's own pixel grid")
    return mask


# --- metrics --------------------------------------------------------------------------------------------
def _checked_truths(model: torch.nn.Module, exps: list[Attribution], truths: list, positions: list[int],
                    params: dict) -> list[int | None]:
    """The true labels (indices or class names, from ``true_labels`` or the data loader) as checked indices."""
    if all(t is None for t in truths):
        return truths
    labels = describe(model, params.get("preprocess"), params.get("labels")).labels
    if labels:
        classes = len(labels)
    else:                                 # the model's own output says how many classes it has
        with borrowed(model), torch.no_grad():
            classes = call(model, inputs_for(model, exps[0].input)).shape[1]
    return [None if t is None else class_index(t, classes, labels, f"true_labels[{p}]")
            for t, p in zip(truths, positions)]


def _target_probabilities(model: torch.nn.Module, exps: list[Attribution]) -> list[float]:
    """Probability of each explained class: from the stored top-k, else one forward pass."""
    out: list[float | None] = []
    missing = []
    for i, e in enumerate(exps):
        p = next((p for j, _, p in e.probs if j == e.target), None)
        out.append(p)
        if p is None:
            missing.append(i)
    if missing and all(exps[i].input is not None for i in missing):
        with borrowed(model), torch.no_grad():
            for s in range(0, len(missing), 32):
                idx = missing[s:s + 32]
                x = inputs_for(model, torch.cat([exps[i].input for i in idx]))
                probs = probabilities(call(model, x)).cpu()
                for k, i in enumerate(idx):
                    out[i] = float(probs[k, exps[i].target])
    return [float(p) if p is not None else math.nan for p in out]


def batched_curves(model: torch.nn.Module, exps: list[Attribution], *, steps: int = 20, fill: str = "blur",
                   batch_size: int = 64, progress: Callable[[int], None] | None = None) -> list[Curves]:
    """Deletion/insertion curves for many attributions, as ``trust.deletion_insertion`` computes them
    one by one, with the perturbed images of several attributions sharing each forward pass."""
    if fill not in ("blur", "mean"):
        raise ValueError("fill: use 'blur' or 'mean'")
    fractions = np.linspace(0, 1, steps + 1)
    per_image = 2 * (steps + 1)
    model = eager(model)
    device = model_device(model)
    results: list[np.ndarray | None] = [None] * len(exps)
    pending: list[tuple[int, torch.Tensor]] = []      # (image index, its perturbed stack)
    got: dict[int, list[torch.Tensor]] = {}

    def flush(force: bool = False) -> None:
        while pending and (force or sum(len(s) for _, s in pending) >= batch_size):
            rows, owners, used = [], [], 0
            while pending and used < batch_size:
                k, stack = pending[0]
                take = min(batch_size - used, len(stack))
                rows.append(stack[:take])
                owners.extend([k] * take)
                used += take
                if take == len(stack):
                    pending.pop(0)
                else:
                    pending[0] = (k, stack[take:])
            x = inputs_for(model, torch.cat(rows))
            targets = torch.tensor([exps[k].target for k in owners], device=device)
            with torch.no_grad():
                p = probabilities(call(model, x)).gather(1, targets[:, None])[:, 0].cpu()
            for k, v in zip(owners, p):
                got.setdefault(k, []).append(v)
            for k in sorted(set(owners)):
                if len(got[k]) == per_image and results[k] is None:
                    results[k] = torch.stack(got.pop(k)).numpy()
                    if progress:
                        progress(sum(r is not None for r in results))

    with borrowed(model):
        for k, exp in enumerate(exps):
            if exp.input is None:
                raise ValueError(f"faithfulness: image {k}'s attribution carries no model input")
            pending.append((k, perturbed(exp.input, input_map(exp), fractions, fill)))
            flush()
        flush(force=True)
    return [Curves(fractions, r[:steps + 1], r[steps + 1:], fill) for r in results]


def _common_shape(maps: list[np.ndarray]) -> tuple[int, int]:
    shapes = [tuple(m.shape) for m in maps]
    return max(set(shapes), key=shapes.count)


def _resample(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if tuple(m.shape) == tuple(shape):
        return m
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()


# --- progress -------------------------------------------------------------------------------------------
def in_notebook() -> bool:
    """True inside a Jupyter kernel (where an ipywidgets progress bar can be shown)."""
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)


class _Progress:
    """An ipywidgets.IntProgress in a notebook, a one-line counter on stderr elsewhere, or a callback."""

    def __init__(self, total: int | None, what: str, mode: bool | Callable[[int, int], None]) -> None:
        self.total, self.what, self.value = total, what, 0
        self.callback = mode if callable(mode) else None
        self.widget = None
        self.stream = None
        self._last = 0.0
        if mode is True:
            if in_notebook():
                import ipywidgets
                from IPython.display import display
                self.widget = ipywidgets.IntProgress(value=0, min=0, max=max(1, total or 1),
                                                     description=what[:12], bar_style="info")
                self.label = ipywidgets.Label(self._text())
                self.box = ipywidgets.HBox([self.widget, self.label])
                display(self.box)
            else:
                self.stream = sys.stderr
                self.live = bool(getattr(sys.stderr, "isatty", lambda: False)())

    def _text(self) -> str:
        return f"{int(self.value)}/{self.total if self.total is not None else '?'}"

    def set_total(self, total: int) -> None:
        self.total = total
        if self.widget is not None:
            self.widget.max = max(1, total)

    def update(self, value: float) -> None:
        self.value = value
        if self.callback is not None:
            self.callback(int(value), self.total or 0)
        if self.widget is not None:
            self.widget.value = int(min(value, self.widget.max))
            self.label.value = self._text()
        elif self.stream is not None and self.live:
            now = time.monotonic()
            if now - self._last > 0.2:
                self._last = now
                self.stream.write(f"\rexplain_batch ({self.what}): {self._text()}")
                self.stream.flush()

    def close(self) -> None:
        if self.widget is not None:
            self.widget.bar_style = "success"
            self.label.value = self._text()
        elif self.stream is not None:
            self.stream.write(f"{chr(13) if self.live else ''}explain_batch ({self.what}): {self._text()} done\n")
            self.stream.flush()
