"""Integrated Gradients with captum's quadrature rules, completeness delta and steps='auto' refinement."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..context import Context
from ..hygiene import modules_of
from . import SEED, Param, register
from .baselines import BASELINES, HELP, baseline_key, make_baseline
from .panels import Panels

RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")
MAX_AUTO_STEPS = 1025
GL_AUTO_STEPS = 16        # steps='auto' with Gauss-Legendre: its largest grid before the adaptive rule
# steps='auto' past Gauss-Legendre: the adaptive rule's estimated map error, relative to the map. The estimate
# (Simpson vs trapezoid per panel) runs ~2x above the real error: at 0.03, on three sample photos with the
# bundled EfficientNet-Lite0, the maps were 1.2-1.5% from a 1024-point reference, as close as the uniform
# grids that reach a 1% delta there (Gauss-Legendre 256: 1.1-1.8%), with 210-280 points; doubling Gauss-Legendre
# grids, as steps='auto' did before, spent 500-1000 to get there
MAP_TOLERANCE = 0.03


def quadrature(rule: str, n: int) -> tuple[list[float], list[float]]:
    """Points on [0, 1] and weights summing to 1.

    ``riemann_trapezoid`` is the textbook rule (points i/(n-1), end weights halved). captum gives
    its n points weight 1/n, so its weights sum to (n-1)/n and its result is ours times (n-1)/n.
    """
    if rule == "riemann_left":
        return [i / n for i in range(n)], [1 / n] * n
    if rule == "riemann_right":
        return [(i + 1) / n for i in range(n)], [1 / n] * n
    if rule == "riemann_middle":
        return [(i + 0.5) / n for i in range(n)], [1 / n] * n
    if rule == "riemann_trapezoid":
        if n < 2:
            raise ValueError("integrated_gradients: rule='riemann_trapezoid' needs steps >= 2")
        w = [1 / (n - 1)] * n
        w[0] = w[-1] = 0.5 / (n - 1)
        return [i / (n - 1) for i in range(n)], w
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return [float(a) for a in (nodes + 1) / 2], [float(w) for w in weights / 2]
    raise ValueError(f"integrated_gradients: unknown rule {rule!r}; use one of {', '.join(RULES)}")


def refinements(rule: str, start: int = 4):
    """Step counts for steps='auto'; the Riemann grids nest (each adds points to the last).

    Gauss-Legendre grids do not nest, so every failed try is thrown away. Its grids are 8 and 16: 4
    points almost never reach 1% on a real network (measured: 89-109% off on CNNs; deit_small needs 8),
    and a path that 16 points miss has a sharp stretch that larger uniform grids keep missing, which
    ``adaptive_path`` finds instead. A piecewise-linear net (``piecewise_linear``) skips all these grids.
    """
    n = {"riemann_trapezoid": 3, "riemann_middle": 3, "gausslegendre": 8}.get(rule, start)
    while True:
        yield n                                  # the first grid always runs, even above the cap
        n = 2 * n - 1 if rule == "riemann_trapezoid" else 3 * n if rule == "riemann_middle" else 2 * n
        if n > MAX_AUTO_STEPS or (rule == "gausslegendre" and n > GL_AUTO_STEPS):
            return


def path_gradient(ctx: Context, b: torch.Tensor, bkey: tuple, rule: str, steps: int, store: dict | None,
                  report=None):
    """Σ w·∂f/∂x along the straight path, and the target scores seen at each point.

    Gradients at points already in ``store`` are reused (nested grids, widget refinement); without a
    store only the weighted sum is formed (``Context.input_grad_sum``: cheaper than each point's).
    """
    alphas, weights = quadrature(rule, steps)
    report = report or ctx.report
    total, seen = torch.zeros_like(ctx.x), {}
    if store is not None:
        for w, (a, grad, score) in zip(weights, path_points(ctx, b, bkey, alphas, store,
                                                            lambda done, todo: report(done / todo))):
            total += w * grad
            seen[a] = score
        return total, seen
    n = len(ctx.x)
    for part in ctx.chunks(0, len(alphas)):
        chunk = alphas[part.start:part.stop]
        with ctx.quietly():
            g, s = ctx.input_grad_sum(path_batch(ctx, b, chunk), ctx.targets.repeat(len(chunk)),
                                      weights[part.start:part.stop])
        total += g
        seen.update({a: s[j * n:(j + 1) * n] for j, a in enumerate(chunk)})
        report(part.stop / len(alphas))
    return total, seen


def path_points(ctx: Context, b: torch.Tensor, bkey: tuple, alphas: list[float], store: dict | None, report):
    """(α, ∂f/∂x, f) at each path point, in order: from ``store`` where kept, the others computed a chunk
    of the batch size at a time (and kept there), so a caller that sums as it goes holds one chunk.
    ``report(done, todo)`` after each chunk computed."""
    n, tkey = len(ctx.x), tuple(ctx.targets.tolist())
    key = lambda a: point_key(bkey, tkey, a)  # noqa: E731
    todo = [a for a in alphas if store is None or key(a) not in store]
    pending, parts, fresh, done = set(todo), iter(ctx.chunks(0, len(todo))), {}, 0
    for a in alphas:
        if a not in pending:
            yield (a, *store[key(a)])
            continue
        if a not in fresh:                       # the next chunk of the points to compute
            part = next(parts)
            chunk = todo[part.start:part.stop]
            with ctx.quietly():
                g, s = ctx.input_grads(path_batch(ctx, b, chunk), ctx.targets.repeat(len(chunk)))
            fresh = {c: (g[j * n:(j + 1) * n], s[j * n:(j + 1) * n]) for j, c in enumerate(chunk)}
            if store is not None:
                store.update({key(c): v for c, v in fresh.items()})
            done += len(chunk)
            report(done, len(todo))
        yield (a, *fresh[a])


def path_batch(ctx: Context, b: torch.Tensor, alphas: list[float]) -> torch.Tensor:
    """The path's points b + α(x − b), copy-major."""
    return torch.cat([b + a * (ctx.x - b) for a in alphas])


def point_key(bkey: tuple, tkey: tuple, alpha: float) -> tuple:
    """Where a path point's gradient and score are kept (the widget's workspace, steps='auto')."""
    return ("ig_point", bkey, tkey, alpha)


def adaptive_path(ctx: Context, b: torch.Tensor, bkey: tuple, tolerance: float, scale: torch.Tensor,
                  budget: int, store: dict | None, report) -> Panels:
    """The panels of an adaptive Simpson rule (``panels``), refined until every path's delta is within
    ``tolerance·scale`` and its map's estimated error within ``MAP_TOLERANCE``, or until its next round
    would pass ``budget`` points (its first round always runs)."""
    direction = ctx.x - b
    panels, evaluated, before = Panels(tolerance, MAP_TOLERANCE), 0, 0

    def progress(done: int, _todo: int) -> None:
        nonlocal evaluated
        evaluated = before + done
        report(evaluated)

    while True:
        before = evaluated                       # points computed by the earlier rounds
        for a, grad, score in path_points(ctx, b, bkey, panels.needed(), store, progress):
            panels.add(a, grad * direction, score)
        if panels.check(scale) or evaluated + 2 * len(panels.to_split()) > budget:
            return panels
        panels.split()


def end_score(ctx: Context, point: torch.Tensor, key: tuple, store: dict | None) -> torch.Tensor:
    """f at an end of the path, when the rule does not evaluate it (kept for the next refinement). Before
    x's own pass, one pass gives f at both (``Context.scores_with_x``)."""
    score = ctx.scores_with_x(point) if ctx.logits is None else None
    key = key + (tuple(ctx.targets.tolist()),)
    if score is None:
        if store is not None and key in store:
            return store[key]
        score = ctx.scores(point, ctx.targets)
    if store is not None:
        store[key] = score
    return score


@register("integrated_gradients", kind="pixel", signed=True,
          summary="Path integral of gradients from a baseline to the image; attributions sum to "
                  "f(x) − f(baseline) (completeness, reported as meta['delta']).",
          reference="Sundararajan et al. 2017",
          params=(Param("steps", "int", 50, "integration steps ('auto': refine until the completeness "
                        "delta is within `tolerance`)", 1, 4096, 1, special=("auto",)),
                  Param("baseline", "choice", "black", HELP, choices=BASELINES, tensor=True),
                  Param("rule", "choice", "gausslegendre", "quadrature rule (captum's names; trapezoid is "
                        "the textbook rule)", choices=RULES),
                  Param("tolerance", "float", 0.01, "steps='auto': stop when |delta| ≤ tolerance·"
                        "|f(x) − f(baseline)|", 1e-6, 1.0, 0.001),
                  SEED))
def integrated_gradients(ctx: Context, steps, baseline, rule: str, tolerance: float, seed: int) -> torch.Tensor:
    b = make_baseline(ctx.x, baseline, ctx.preprocess, seed)
    bkey = baseline_key(baseline, seed)
    auto = steps == "auto"
    # on a piecewise-linear net a uniform grid's delta would prove little (see _KINKED), whatever its rule
    straight = auto and piecewise_linear(ctx.model)
    adaptive = straight or (auto and rule == "gausslegendre")      # the adaptive rule may run
    grids = [steps] if not auto else [] if straight else refinements(rule)
    # the widget keeps every path gradient (raising steps reuses them); steps='auto' with a Riemann rule
    # reuses the last grid's within the call (the adaptive rule frees its settled points instead)
    nested = auto and not adaptive
    store = ctx.memo if ctx.keep_intermediates else ({} if nested else None)
    f_b = f_x = None
    if straight or rule not in ("riemann_left", "riemann_trapezoid"):     # their grids evaluate the baseline
        f_b = end_score(ctx, b, ("ig_end", bkey, 0.0), store)           # now: x's first pass can join it
    converged, n, points = False, 0, 0          # points: evaluated so far by steps='auto' (its progress)
    for n in grids:
        total, seen = path_gradient(ctx, b, bkey, rule, n, store,
                                    report=(lambda f, k=points, n=n: _auto_progress(ctx, k + f * n)) if auto else None)
        points += n
        # the path's end points are free when the rule evaluates them
        f_b, f_x = (seen.get(0.0) if f_b is None else f_b), (seen.get(1.0) if f_x is None else f_x)
        f_b, f_x, scale = path_ends(ctx, b, bkey, store, f_b, f_x)
        attr, delta, relative, converged = _checked((ctx.x - b) * total, f_x, f_b, tolerance, scale)
        if not auto or converged:
            break
    ctx.meta["quadrature"] = rule
    if adaptive and not converged:
        f_b, f_x, scale = path_ends(ctx, b, bkey, store, f_b, f_x)
        found = adaptive_path(ctx, b, bkey, tolerance, scale, MAX_AUTO_STEPS, store,
                              lambda k: _auto_progress(ctx, points + k))
        attr, delta, relative, converged = _checked(found.total(), f_x, f_b, tolerance, scale)
        n = found.count()
        ctx.meta["quadrature"] = "adaptive_simpson"
    if auto and not converged:
        msg = (f"integrated_gradients: steps='auto' stopped at {n} steps without reaching tolerance={tolerance} "
               f"(relative delta {max(relative.tolist()):.3g}); the map is less reliable than asked")
        ctx.warn(msg, stacklevel=3)
    ctx.meta["steps"] = n
    ctx.per_image.update(delta=delta.tolist(), relative_delta=relative.tolist(),
                    f_x=f_x.tolist(), f_baseline=f_b.tolist())
    return attr


def path_ends(ctx: Context, b: torch.Tensor, bkey: tuple, store: dict | None, f_b, f_x):
    """f at the baseline and at x where the rule did not evaluate them (the baseline costs one forward,
    kept for the next refinement; f at x is known), and the scale the delta is judged against."""
    f_b = end_score(ctx, b, ("ig_end", bkey, 0.0), store) if f_b is None else f_b
    f_x = ctx.logits.gather(1, ctx.targets[:, None])[:, 0] if f_x is None else f_x
    # when f(x) and f(baseline) nearly coincide, a relative delta can never get small: the stop
    # test also accepts |delta| within tolerance x 1% of the score's own size
    floor = 0.01 * torch.maximum(f_x.abs(), f_b.abs()).clamp_min(1.0)
    return f_b, f_x, torch.maximum((f_x - f_b).abs(), floor)


# Layers under which a model's score along the path is piecewise linear (ReLU nets; hard-swish ones are
# piecewise polynomial): its gradient jumps wherever a unit switches, which Gauss-Legendre's polynomial
# accuracy does not cover. On the bundled EfficientNet-Lite0 its 16-point grid met a 1% delta on the
# astronaut photo with the map 14% off a 1024-point reference; on the synthetic CNNs, 9-16% off on 5 of 12
# images (the adaptive rule: 1.2-1.5%); on a random resnet50, 6% off. The nested Riemann-right grids (the
# widget's rule) met it with maps up to 16% off on the synthetic CNNs, at 8 points.
_KINKED = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Threshold, nn.Hardswish,
           nn.Hardsigmoid, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
_AFFINE = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._AvgPoolNd,
           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten,
           nn.Unflatten, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
           nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
           nn.modules.padding._ReplicationPadNd,
           nn.Sequential, nn.ModuleList, nn.ModuleDict)      # empty ones (identity shortcuts, GhostNet's)


def piecewise_linear(model: nn.Module) -> bool:
    """Whether every layer of ``model`` is affine or piecewise linear, with a kink somewhere: then
    steps='auto' takes the adaptive rule from the start, whatever ``rule`` says. Only modules are seen;
    a smooth function called inside a forward (``F.gelu``) makes it slower, never wrong."""
    leaves = [m for m in modules_of(model) if not m._modules]
    return any(isinstance(m, _KINKED) for m in leaves) and all(isinstance(m, _KINKED + _AFFINE) for m in leaves)


def _checked(attr: torch.Tensor, f_x: torch.Tensor, f_b: torch.Tensor, tolerance: float, scale: torch.Tensor):
    """The attribution, its completeness delta (absolute and relative) and whether every image's delta is
    within tolerance·scale."""
    gap = f_x - f_b
    delta = attr.flatten(1).sum(1) - gap
    relative = delta.abs() / gap.abs().clamp_min(1e-12)
    return attr, delta, relative, bool((delta.abs() <= tolerance * scale).all())


def _auto_progress(ctx: Context, points: float) -> None:
    """steps='auto' cannot know its total, so its progress is log-scaled on the most it may evaluate."""
    ctx.report(min(1.0, math.log1p(points) / math.log1p(MAX_AUTO_STEPS + 2 * GL_AUTO_STEPS)))
