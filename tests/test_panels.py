"""steps='auto' past Gauss-Legendre: adaptive Simpson panels, checked on paths whose integrals are known."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nbexplain as nbx
from nbexplain.methods import integrated
from nbexplain.methods.panels import Panels

STEEP, AT = 400.0, 0.3           # the score steps up within ~1% of the path, at α = 0.3


def step(a: float) -> float:
    return 1 / (1 + math.exp(-STEEP * (a - AT)))


def step_slope(a: float) -> float:
    return STEEP * step(a) * (1 - step(a))


def drive(panels: Panels, density, score, scale: float) -> None:
    """What ``integrated.adaptive_path`` does, with the path's densities and scores given as functions."""
    for _ in range(200):
        for a in panels.needed():
            panels.add(a, density(a), torch.tensor([score(a)]))
        if panels.check(torch.tensor([scale])):
            return
        panels.split()
    raise AssertionError("the panels never settled")


def uniform_simpson(density, points: int) -> torch.Tensor:
    n = (points - 1) // 2                                     # panels
    total = 0
    for i in range(n):
        a, c = i / n, (i + 1) / n
        total = total + (c - a) / 6 * (density(a) + 4 * density((a + c) / 2) + density(c))
    return total


def test_panels_gather_where_the_score_moves_and_beat_a_uniform_grid_of_as_many_points():
    density = lambda a: torch.tensor([[0.7 * step_slope(a), 0.3 * step_slope(a)]])   # noqa: E731
    panels = Panels(tolerance=0.01, map_tolerance=0.03)
    drive(panels, density, step, scale=1.0)
    gap = step(1) - step(0)
    assert abs(float(panels.total().sum()) - gap) <= 0.01 * gap
    assert float(panels.error.abs()) <= 0.01 * gap
    # most points sit within 0.05 of the step; a uniform Simpson grid of the same size misses it by far more
    points = panels.done_points | set(panels.points)
    assert len(points) == panels.count()
    assert sum(abs(a - AT) < 0.05 for a in points) > len(points) / 2
    uniform = uniform_simpson(density, panels.count())
    assert abs(float(uniform.sum()) - gap) > 5 * 0.01 * gap


def test_a_small_delta_from_pixel_errors_that_cancel_is_not_taken_for_a_settled_map():
    """A wiggle moves attribution between two pixels without changing the score: the completeness check
    cannot see it, the map check must."""
    wiggle = lambda a: 0.5 * math.cos(2 * math.pi * 6 * a)     # noqa: E731 - integrates to 0 over [0, 1]
    density = lambda a: torch.tensor([[0.7 * step_slope(a) + wiggle(a), 0.3 * step_slope(a) - wiggle(a)]])  # noqa: E731
    exact = torch.tensor([[0.7, 0.3]]) * (step(1) - step(0))
    error = {}
    for map_tolerance in (math.inf, 0.03):
        panels = Panels(tolerance=0.01, map_tolerance=map_tolerance)
        drive(panels, density, step, scale=1.0)
        error[map_tolerance] = float((panels.total() - exact).norm() / exact.norm())
    assert error[math.inf] > 0.1                    # completeness alone: settled with the wiggle badly off
    assert error[0.03] <= 0.03


class SteepScore(nn.Module):
    """Logit 0 = 10·σ(k(w·x − c)): its Integrated Gradients from a zero baseline are known exactly,
    x·w·(S(w·x) − S(0)) / (w·x), and the path's score jumps in a narrow stretch that uniform grids miss."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 2, x[0].numel()).view_as(x[0]))
        z = float((x[0] * self.w).sum().detach())
        self.k, self.c = STEEP / z, AT * z          # the step at α = 0.3 along the path, ~1% of it wide

    def score(self, z: torch.Tensor) -> torch.Tensor:
        return 10 * torch.sigmoid(self.k * (z - self.c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score((x * self.w).flatten(1).sum(1))
        return torch.stack([s, -s], 1)

    def exact_ig(self, x: torch.Tensor) -> torch.Tensor:
        z = (x * self.w).sum()
        return x * self.w * (self.score(z) - self.score(torch.zeros(()))) / z


def test_auto_reaches_a_sharp_path_that_gauss_legendre_grids_miss():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    model = SteepScore(x).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = nbx.attribute(model, x[0], "integrated_gradients", steps="auto", baseline="zeros", target=0)
    assert out.meta["quadrature"] == "adaptive_simpson"
    assert out.meta["relative_delta"] <= 0.01
    exact = model.exact_ig(x[0]).detach()
    assert float((out.raw - exact).norm() / exact.norm()) <= 0.01
    # Gauss-Legendre with more points than auto used is still ~100% off (the old auto went on to 1024)
    gl = nbx.attribute(model, x[0], "integrated_gradients", steps=64, baseline="zeros", target=0)
    assert out.meta["steps"] < 64 and gl.meta["relative_delta"] > 0.5
    assert out.meta["evaluations"] < 100
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.w.requires_grad and model.w.grad is None


def test_auto_past_its_budget_says_so_and_keeps_what_it_has(monkeypatch):
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    model = SteepScore(x).eval()
    monkeypatch.setattr(integrated, "MAX_AUTO_STEPS", 21)
    with pytest.warns(UserWarning, match="without reaching tolerance"):
        out = nbx.attribute(model, x[0], "integrated_gradients", steps="auto", baseline="zeros", target=0)
    assert out.meta["quadrature"] == "adaptive_simpson" and 5 <= out.meta["steps"] <= 21


def _gl_error(kink: float, n: int) -> float:
    """Gauss-Legendre's error on ∫₀¹ [α > kink] dα = 1 − kink (a ReLU unit switching on at ``kink``)."""
    nodes, weights = integrated.quadrature("gausslegendre", n)
    return sum(w for a, w in zip(nodes, weights) if a > kink) - (1 - kink)


class TwoUnits(nn.Module):
    """Two ReLU units, each reading its own half of the image and switching on at its own α along the path
    from a zero baseline (``kinks``); the head scales each so that it adds 1 − its kink to logit 0. The exact IG
    of pixel j is x_j·(1 − kink of its unit)/(its unit's w·x)."""

    def __init__(self, x: torch.Tensor, kinks: tuple[float, float]):
        super().__init__()
        p = x[0].numel()
        self.hidden, self.act, self.head = nn.Linear(p, 2), nn.ReLU(), nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.hidden.weight.zero_()
            self.hidden.weight[0, :p // 2], self.hidden.weight[1, p // 2:] = 1.0, 1.0
            z = self.hidden.weight @ x.flatten()
            self.hidden.bias.copy_(-torch.tensor(kinks) * z)
            self.head.weight.copy_(torch.stack([1 / z, -1 / z]))       # each unit adds 1 − its kink to f

    def forward(self, x):
        return self.head(self.act(self.hidden(x.flatten(1))))

    def exact_ig(self, x: torch.Tensor) -> torch.Tensor:
        z = self.hidden.weight @ x.flatten()
        switched = 1 + self.hidden.bias / z                    # 1 − kink, per unit
        return (x.flatten() * (self.hidden.weight * (self.head.weight[0] * switched)[:, None]).sum(0)).view_as(x)


def test_auto_on_a_relu_net_does_not_stop_at_a_gauss_legendre_delta_met_by_cancellation():
    """A ReLU net's path gradient is piecewise constant: Gauss-Legendre's delta can come out right while
    each unit's share is wrong (the bundled Lite0's 16-point grid on the astronaut: delta 0.2%, map 14% off).
    ``steps='auto'`` goes straight to the adaptive rule on such a net."""
    nodes, weights = integrated.quadrature("gausslegendre", 16)
    c = min(range(16), key=lambda i: abs(nodes[i] - 0.5))
    first = nodes[c] + 0.1 * (nodes[c + 1] - nodes[c])     # unit 0 switches on just past a node (a large error),
    e0 = _gl_error(first, 16)                               # unit 1 where Gauss-Legendre 16's error cancels it
    bounds = [0.0, *nodes, 1.0]
    second = next(k for lo, hi in zip(bounds, bounds[1:])
                  if lo < (k := 1 - sum(w for a, w in zip(nodes, weights) if a > lo) - e0) < hi
                  and abs(k - first) > 0.1)
    assert abs(_gl_error(second, 16) + e0) < 1e-9 and abs(e0) > 0.03
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    model = TwoUnits(x, (first, second)).eval()
    assert integrated.piecewise_linear(model)
    exact = model.exact_ig(x[0]).detach()
    gl = nbx.attribute(model, x[0], "integrated_gradients", steps=16, baseline="zeros", target=0)
    assert gl.meta["relative_delta"] < 1e-4 and float((gl.raw - exact).norm() / exact.norm()) > 0.04
    out = nbx.attribute(model, x[0], "integrated_gradients", steps="auto", baseline="zeros", target=0)
    assert out.meta["quadrature"] == "adaptive_simpson" and out.meta["relative_delta"] <= 0.01
    assert out.meta["evaluations"] == out.meta["steps"] + 2          # no Gauss-Legendre grid was tried first
    assert float((out.raw - exact).norm() / exact.norm()) <= 0.03


def test_only_nets_of_affine_and_piecewise_linear_layers_skip_gauss_legendre():
    relu_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Upsample(scale_factor=2), nn.Sequential(),      # empty: an identity shortcut
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(), nn.Linear(4, 2))
    assert integrated.piecewise_linear(relu_net)
    assert not integrated.piecewise_linear(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)))     # no kink: exact anyway
    for smooth in (nn.GELU(), nn.SiLU(), nn.LayerNorm(4), nn.Sigmoid()):
        assert not integrated.piecewise_linear(nn.Sequential(relu_net[:8], smooth, nn.Linear(4, 2)))
