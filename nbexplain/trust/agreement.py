"""Agreement between methods on the same image and target: a rank-correlation matrix and a warning."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..api import attribute
from .similarity import spearman

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
              target: Any = None, params: dict[str, dict] | None = None) -> Agreement:
    """Explain the same image and target with several methods and correlate their maps."""
    params = params or {}
    exps = []
    for m in methods:
        exps.append(attribute(model, image, m, target=target if not exps else exps[0].target,
                              **params.get(m, {})))
    n = len(methods)
    matrix = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = spearman(np.abs(exps[i].map), np.abs(exps[j].map))
    result = Agreement(list(methods), matrix, exps[0].target)
    if result.disagree:
        warnings.warn(f"methods disagree: mean rank correlation {result.mean_offdiagonal:.2f} < {DISAGREE_BELOW} "
                      f"for {', '.join(methods)}; no single map should be trusted here", stacklevel=2)
    return result
