"""Model-parameter randomisation test (Adebayo et al. 2018), on a copy of the model."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .._errors import closest
from ..api import attribute
from ..calls import eager
from ..layers import core
from ..models import describe, register
from .agreement import explain_one, method_names, one_image
from .similarity import compare, on_crop

THRESHOLD = 0.5          # a method passes when |map| rank correlation after full randomisation is below this


@dataclass
class RandomizationReport:
    """Similarity to the original map after each randomisation step, per method and metric."""

    mode: str
    steps: list[str]
    scores: dict[str, dict[str, list[float]]]
    threshold: float = THRESHOLD
    passed: dict[str, bool] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)    # methods whose original map is constant: no verdict

    def reading(self) -> str:
        when = "once every layer is randomised" if self.mode == "cascading" else "for at least one layer"
        lines = [f"{self.mode} randomisation; a method passes when the Spearman correlation of |map| with "
                 f"the original drops below {self.threshold} {when}"]
        for m, ok in self.passed.items():
            if m in self.empty:
                lines.append(f"  {m}: FAIL ({self.why(m)})")
                continue
            final = self.scores[m]["spearman_abs"][-1 if self.mode == "cascading" else
                                                    int(np.argmin(self.scores[m]["spearman_abs"]))]
            lines.append(f"  {m}: {'PASS' if ok else 'FAIL'} (Spearman of |map| = {final:.2f})"
                         + ("" if ok else f" — {self.why(m)}"))
        return "\n".join(lines)

    def why(self, method: str) -> str:
        """Why ``method`` failed ('' when it passed); the trust panel shows the same words."""
        if method in self.empty:
            return ("its map of the trained model is constant, so there is nothing to compare: check the "
                    "method's settings or layer first")
        return "" if self.passed.get(method) else "the map barely depends on the weights: treat it with suspicion"

    def plot(self, metric: str = "spearman_abs"):
        """A bqplot line chart: similarity per randomised layer, one line per method."""
        import bqplot as bq
        x, y = bq.OrdinalScale(), bq.LinearScale(min=-1.0, max=1.0)
        lines = bq.Lines(x=self.steps, y=[self.scores[m][metric] for m in self.scores], scales={"x": x, "y": y},
                         labels=list(self.scores), display_legend=True, marker="circle")
        return bq.Figure(marks=[lines], axes=[bq.Axis(scale=x, tick_rotate=-30, label="randomised up to"),
                                              bq.Axis(scale=y, orientation="vertical", label=metric)],
                         title=f"{self.mode} randomisation (threshold {self.threshold})")


def layer_groups(model: nn.Module) -> list[str]:
    """Parameterised blocks in forward order: top-level modules, with stage containers split into blocks."""
    prefix, net = core(eager(model))       # inside a wrapper (a LightningModule's self.model): its blocks
    groups = []
    for name, child in net.named_children():
        kids = list(child.named_children())
        numbered = kids and all(k.isdigit() for k, _ in kids)
        for sub, m in (kids if numbered else [("", child)]):
            if any(True for _ in m.parameters()):
                groups.append(prefix + (f"{name}.{sub}" if sub else name))
    return groups


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter with the spread it had (weights keep their scale, lose their content)."""
    with torch.no_grad():
        for p in module.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * (std or 0.02))


def randomization_test(model: nn.Module, image: Any, methods: Sequence[str] = ("gradcam", "saliency",
                       "integrated_gradients"), *, mode: str = "cascading", target: Any = None,
                       groups: Sequence[str] | None = None, seed: int = 0,
                       params: dict[str, dict] | None = None) -> RandomizationReport:
    """Randomise the model's layers top-down (cascading) or one at a time (independent) and measure how
    much each method's map changes. The user's model is never touched: every step uses a deep copy."""
    if mode not in ("cascading", "independent"):
        raise ValueError("mode: use 'cascading' (top-down, cumulative) or 'independent' (one layer at a time)")
    image = one_image(image, "randomization_test")
    methods = method_names(methods)
    if not methods:
        raise ValueError("methods: the list is empty; name at least one method, e.g. ['saliency']")
    params = params or {}
    model = eager(model)              # a torch.compile'd model: randomise (copies of) the module it wraps
    info = describe(model)
    groups = _check_groups(model, groups)[::-1]           # top (logits) first
    modules = dict(model.named_modules())
    originals = {m: explain_one(model, image, m, target, params) for m in methods}
    fixed_target = next(iter(originals.values())).target       # explain the original class throughout
    scores = {m: {k: [] for k in ("spearman", "spearman_abs", "ssim", "ssim_abs")} for m in methods}
    generator = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(model)
    register(work, info)
    for i, group in enumerate(groups):
        if mode == "independent":
            work = copy.deepcopy(model)
            register(work, info)
        _randomize(dict(work.named_modules())[group], generator)
        for m in methods:
            layer = originals[m].meta.get("layer") if originals[m].meta.get("layer") in modules else None
            kw = dict(params.get(m, {}), **({"layer": layer} if layer and _needs_layer(m) else {}))
            with warnings.catch_warnings():     # a randomised copy's warnings say nothing of the user's model
                warnings.simplefilter("ignore")
                again = attribute(work, image, m, target=fixed_target, **kw)
            for k, v in compare(on_crop(originals[m]), on_crop(again)).items():
                scores[m][k].append(v)
    report = RandomizationReport(mode, groups, scores)
    # cascading: judged once everything is random; independent: by the layer that matters most
    final = (lambda v: v[-1]) if mode == "cascading" else min
    # a constant map correlates with nothing (Spearman 0), which must not read as a pass
    report.empty = [m for m in methods if not np.ptp(np.nan_to_num(np.asarray(originals[m].map, dtype=float)))]
    report.passed = {m: m not in report.empty and bool(final(scores[m]["spearman_abs"]) < THRESHOLD)
                     for m in methods} if groups else {}
    return report


def _check_groups(model: nn.Module, groups: Sequence[str] | None) -> list[str]:
    """``groups`` (default: every layer group) as module names that each hold parameters."""
    if groups is None:
        groups = layer_groups(model)
    elif isinstance(groups, str):
        # a bare string would be iterated letter by letter
        raise TypeError(f"groups: expected a list of module names, got the string {groups!r}; wrap it: [{groups!r}]")
    groups, valid = list(groups), layer_groups(model)
    if not groups:
        raise ValueError(f"groups: nothing to randomise; pass module names with parameters, e.g. {valid[-3:]}")
    modules = dict(model.named_modules())
    for g in groups:
        if g not in modules:
            raise ValueError(f"groups: unknown module {g!r}.{closest(g, valid)} "
                             "Groups with parameters are listed by trust.layer_groups(model)")
        if not any(True for _ in modules[g].parameters()):
            # randomising it would change nothing, and every method would then read as FAIL
            raise ValueError(f"groups: {g!r} has no parameters, so randomising it changes nothing; "
                             f"use groups with parameters: {', '.join(map(repr, valid))}")
    return groups


def _needs_layer(method: str) -> bool:
    from ..methods import get
    return get(method).needs_layer
