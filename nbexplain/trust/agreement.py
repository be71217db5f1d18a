"""Agreement between methods on the same image and target: a rank-correlation matrix and a warning."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..api import attribute
from ..methods import get as get_method
from ..methods.baselines import NeedsPreprocess
from .similarity import rank_agreement

DISAGREE_BELOW = 0.3


@dataclass
class Agreement:
    methods: list[str]
    matrix: np.ndarray            # Spearman rank correlation of |map|, methods x methods
    target: int

    @property
    def mean_offdiagonal(self) -> float:
        n = len(self.methods)
        return float((self.matrix.sum() - n) / (n * n - n)) if n > 1 else 1.0

    @property
    def disagree(self) -> bool:
        return self.mean_offdiagonal < DISAGREE_BELOW

    def plot(self):
        """A small bqplot heat map of the matrix."""
        import bqplot as bq
        x, y, c = bq.OrdinalScale(), bq.OrdinalScale(reverse=True), bq.ColorScale(min=-1, max=1, scheme="RdBu")
        grid = bq.GridHeatMap(color=self.matrix, row=self.methods, column=self.methods,
                              scales={"row": y, "column": x, "color": c})
        return bq.Figure(marks=[grid], axes=[bq.Axis(scale=x), bq.Axis(scale=y, orientation="vertical")],
                         title="method agreement (Spearman of |map|)")


def agreement(model, image: Any, methods: Sequence[str] = ("gradcam", "occlusion", "integrated_gradients"), *,
              target: Any = None, params: dict[str, dict] | None = None, preprocess=None) -> Agreement:
    """Explain one image and target with two or more methods and correlate their maps (``preprocess``: as
    ``nbx.attribute`` takes it, for a model that carries none)."""
    image = one_image(image, "agreement")
    methods = method_names(methods)
    if len(methods) < 2:
        raise ValueError(f"methods: agreement compares at least two methods, got {len(methods)}; "
                         "name two or more, e.g. ['gradcam', 'saliency']")
    params = with_preprocess(params or {}, methods, preprocess)
    exps = []
    for m in methods:
        exps.append(explain_one(model, image, m, target if not exps else exps[0].target, params))
    result = Agreement(list(methods), rank_agreement(exps), exps[0].target)
    if result.disagree:
        warnings.warn(f"methods disagree: mean rank correlation {result.mean_offdiagonal:.2f} < {DISAGREE_BELOW} "
                      f"for {', '.join(methods)}; no single map should be trusted here", stacklevel=2)
    return result


def with_preprocess(params: dict[str, dict], methods: list[str], preprocess) -> dict[str, dict]:
    """Each method's settings, with ``preprocess`` for every method that does not name its own (other keys
    are kept, for the caller's check of them)."""
    if preprocess is None:
        return params
    return {**params, **{m: {"preprocess": preprocess, **params.get(m, {})} for m in methods}}


def explain_one(model, image: Any, method: str, target: Any, params: dict[str, dict]):
    """``attribute`` as the trust helpers call it: method settings come from ``params``, and an error that
    needs preprocessing names the routes these helpers take."""
    try:
        return attribute(model, image, method, target=target, **params.get(method, {}))
    except NeedsPreprocess as e:
        raise ValueError(
            f"{method}: {e.param}={e.kind!r} is defined in pixels, but this model carries no preprocessing "
            "(mean/std): pass preprocess=nbx.Preprocess(...) to this check, or load the model with "
            f"nbx.load_model(model, preprocess=nbx.Preprocess(...)), or pass params={{{method!r}: "
            f"{{{e.param!r}: 'zeros'}}}}") from None


def one_image(image: Any, check: str) -> Any:
    """The image itself: these checks explain one image and target (a list or tensor batch of one is
    unwrapped); several would make ``attribute`` return a list, and each needs its own run."""
    if not (isinstance(image, (list, tuple)) or (isinstance(image, torch.Tensor) and image.ndim == 4)):
        return image
    if len(image) == 0:
        raise ValueError(f"image: the {type(image).__name__} is empty; pass one image")
    if len(image) > 1:
        raise ValueError(f"image: {check} takes one image, got {len(image)}; call it once per image in a loop")
    return image[0]


def method_names(methods: Any) -> list[str]:
    """``methods`` as a list of registered names, checked before any map is computed (a bad name
    would otherwise surface after the first, possibly slow, method has run)."""
    if isinstance(methods, str):
        # a bare string would be iterated letter by letter
        raise TypeError(f"methods: expected a list of method names, got the string {methods!r}; wrap it: [{methods!r}]")
    methods = list(methods)
    for m in methods:
        get_method(m)
    twice = next((m for i, m in enumerate(methods) if m in methods[:i]), None)
    if twice is not None:
        # results are keyed by method name: a repeat would overwrite or double its scores
        raise ValueError(f"methods: {twice!r} is listed twice; list each method once")
    return methods
