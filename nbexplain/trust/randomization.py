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
from ..replica import tree_copy
from .agreement import explain_one, method_names, one_image, with_preprocess
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
    dead: list[str] = field(default_factory=list)     # methods whose randomised map went constant: no verdict

    @property
    def when(self) -> str:
        """When a method is judged: the words the reading and the trust panel use."""
        return (f"once all {len(self.steps)} layer groups are randomised" if self.mode == "cascading"
                else "for at least one layer group")

    def verdict(self, method: str) -> str:
        return "NO VERDICT" if method in self.dead else "PASS" if self.passed.get(method) else "FAIL"

    def reading(self) -> str:
        lines = [f"{self.mode} randomisation; a method passes when the Spearman correlation of |map| with "
                 f"the original drops below {self.threshold} {self.when}"]
        for m, ok in self.passed.items():
            if m in self.empty or m in self.dead:
                lines.append(f"  {m}: {self.verdict(m)} ({self.why(m)})")
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
        if method in self.dead:
            return ("its map of the randomised model is constant (the randomised network passes no signal to "
                    "its layer or logits), so a correlation of 0 says nothing: try other groups or mode='independent'")
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


def _randomize(params: list[nn.Parameter], generator: torch.Generator) -> None:
    """Re-draw every parameter around the mean and with the spread it had: weights keep their scale and lose
    their content, as under a re-initialisation. Drawn around 0, a norm layer's gains (all near 1) became
    ~0 and silenced the network after them: every map went blank, which read as a pass."""
    with torch.no_grad():
        for p in params:
            # a single value has no spread to keep (a scalar gain or temperature): drawn around 0, as before
            std, mean = (float(p.std()), float(p.mean())) if p.numel() > 1 else (0.0, 0.0)
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) * (std or 0.02) + mean)


def _group_parameters(model: nn.Module, group: str) -> list[nn.Parameter]:
    """A group's parameters; the first group (the embedding) also takes those the network holds itself, not
    in a child (a ViT's class token and position embedding), which no group would otherwise re-draw."""
    params = list(dict(model.named_modules())[group].parameters())
    groups = layer_groups(model)
    if groups and group == groups[0]:
        _, net = core(eager(model))
        params += [p for p in net._parameters.values() if p is not None]
    return params


def _private_copy(model: nn.Module) -> nn.Module:
    """A copy with its own parameters, to re-draw; a model that cannot be deep-copied (a lock, an open file)
    gets its module tree copied instead (``replica.tree_copy``), with cloned parameters and shared buffers
    (nothing here writes them)."""
    try:
        return copy.deepcopy(model)
    except Exception:   # noqa: BLE001 - whatever deepcopy refuses, the tree copy does not need
        params = {id(p): nn.Parameter(p.detach().clone(), p.requires_grad) for p in model.parameters()}
        return tree_copy(model, params, {})


def randomization_test(model: nn.Module, image: Any, methods: Sequence[str] = ("gradcam", "saliency",
                       "integrated_gradients"), *, mode: str = "cascading", target: Any = None,
                       groups: Sequence[str] | None = None, seed: int = 0,
                       params: dict[str, dict] | None = None, preprocess=None) -> RandomizationReport:
    """Randomise the model's layers top-down (cascading) or one at a time (independent) and measure how
    much each method's map changes. The user's model is never touched: every step uses a deep copy.
    ``preprocess``: as ``nbx.attribute`` takes it, for a model that carries none."""
    if mode not in ("cascading", "independent"):
        raise ValueError("mode: use 'cascading' (top-down, cumulative) or 'independent' (one layer at a time)")
    image = one_image(image, "randomization_test")
    methods = method_names(methods)
    if not methods:
        raise ValueError("methods: the list is empty; name at least one method, e.g. ['saliency']")
    params = with_preprocess(_check_params(params, methods), methods, preprocess)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed: expected a non-negative whole number, got {seed!r}")
    model = eager(model)              # a torch.compile'd model: randomise (copies of) the module it wraps
    info = describe(model)
    groups = _check_groups(model, groups)[::-1]           # top (logits) first, whatever order they came in
    modules = dict(model.named_modules())
    originals = {m: explain_one(model, image, m, target, params) for m in methods}
    fixed_target = next(iter(originals.values())).target       # explain the original class throughout
    scores = {m: {k: [] for k in ("spearman", "spearman_abs", "ssim", "ssim_abs")} for m in methods}
    generator = torch.Generator().manual_seed(seed)
    work = _private_copy(model)
    register(work, info)
    last: dict[str, list[bool]] = {}    # per method and step: was the randomised map constant?
    for i, group in enumerate(groups):
        if mode == "independent":
            work = _private_copy(model)
            register(work, info)
        _randomize(_group_parameters(work, group), generator)
        for m in methods:
            layer = originals[m].meta.get("layer") if originals[m].meta.get("layer") in modules else None
            kw = dict(params.get(m, {}), **({"layer": layer} if layer and _needs_layer(m) else {}))
            with warnings.catch_warnings():     # a randomised copy's warnings say nothing of the user's model
                warnings.simplefilter("ignore")
                again = attribute(work, image, m, target=fixed_target, **kw)
            for k, v in compare(on_crop(originals[m]), on_crop(again)).items():
                scores[m][k].append(v)
            last.setdefault(m, []).append(_constant(again.map))
    report = RandomizationReport(mode, groups, scores)
    # cascading: judged once everything is random; independent: by the layer that matters most
    final = (lambda v: v[-1]) if mode == "cascading" else min
    # a constant map correlates with nothing (Spearman 0), which must not read as a pass
    report.empty = [m for m in methods if _constant(originals[m].map)]
    # the step that decides: the last (cascading) or the least similar (independent)
    judged = {m: len(groups) - 1 if mode == "cascading" else int(np.argmin(scores[m]["spearman_abs"]))
              for m in methods}
    report.dead = [m for m in methods if m not in report.empty and last[m][judged[m]]]
    report.passed = {m: m not in report.empty and m not in report.dead
                     and bool(final(scores[m]["spearman_abs"]) < THRESHOLD) for m in methods} if groups else {}
    return report


def _constant(m: np.ndarray) -> bool:
    return not np.ptp(np.nan_to_num(np.asarray(m, dtype=float)))


def _check_params(params: Any, methods: list[str]) -> dict[str, dict]:
    """``params``: {method: {parameter: value}} for some of ``methods``."""
    if params is None:
        return {}
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise TypeError(f"params: expected a dict of each method's parameters, e.g. "
                        f"{{'integrated_gradients': {{'steps': 16}}}}, got {type(params).__name__}")
    unknown = [k for k in params if k not in methods]
    if unknown:
        raise ValueError(f"params: {unknown[0]!r} is not among the methods tested ({', '.join(methods)})")
    return params


def _check_groups(model: nn.Module, groups: Sequence[str] | None) -> list[str]:
    """``groups`` (default: every layer group) as module names that each hold parameters."""
    if groups is None:
        groups = layer_groups(model)
    elif isinstance(groups, str):
        # a bare string would be iterated letter by letter
        raise TypeError(f"groups: expected a list of module names, got the string {groups!r}; wrap it: [{groups!r}]")
    groups, valid = list(dict.fromkeys(groups)), layer_groups(model)
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
    order = {name: i for i, name in enumerate(modules)}           # definition order: bottom to top
    return sorted(groups, key=order.__getitem__)


def _needs_layer(method: str) -> bool:
    from ..methods import get
    return get(method).needs_layer
