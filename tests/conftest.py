"""Shared helpers for the engine tests: tiny seeded timm models (random weights, no downloads).

Random timm initialisations are degenerate in ways that would make weak tests pass: BatchNorm layers
start as the identity with zero bias and ResNets zero-init the last BN of each block, so a ReLU
network is positively homogeneous (f(a·x) = a·f(x)) and every Integrated Gradients rule gives the same
answer as gradient × input; ConvNeXt layer scales start at 1e-6, so its blocks are near identities.
``wake`` draws every norm/scale/bias parameter and BN statistic at random to break that.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import timm
import torch
from torch import nn

# The models here are tiny: intra-op threads only add overhead, and on a shared 2-core machine they
# oversubscribe it (a 96 px test_resnet pass went from ~15 ms to ~1 s under load with 2 threads).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# name -> (timm architecture, create kwargs, a CAM layer with a grid of at least 6x6 at 96 px)
ARCHS = {
    "resnet": ("test_resnet", {}, "layer2"),
    "efficientnet": ("test_efficientnet", {}, "blocks.2"),
    # not a stage output: that feeds a per-location LayerNorm, which is scale invariant, so Σ_c G·A
    # (HiResCAM) is zero there up to roundoff and the comparison would be noise against noise
    "convnext": ("test_convnext", {}, "stem"),
    "vit": ("test_vit", {"img_size": 96}, "blocks.5.norm1"),
}
CNNS = ["resnet", "efficientnet", "convnext"]
SIZE = 96          # input side for the oracle tests
TARGET = 7         # a fixed class, not the argmax: attributions must follow the requested target


def wake(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise norm weights, biases, layer scales and BN running statistics (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1:
                if name.rsplit(".", 1)[-1] in ("weight", "gamma"):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model


def make_model(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    """A fresh, woken, eval-mode timm model; ``arch`` is a key of ARCHS or a timm name."""
    name, base_kwargs, _ = ARCHS.get(arch, (arch, {}, None))
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**base_kwargs, **kwargs})
    return wake(model.eval(), seed)


def make_input(n: int = 1, size: int | tuple[int, int] = SIZE, seed: int = 1) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, rtol: float = 1e-4, atol_frac: float = 1e-5, scale: float | None = None):
    """Elementwise closeness with an absolute floor relative to the reference's magnitude.

    A reference that is all zeros would make the comparison vacuous, so it is refused.
    """
    a = (actual.detach() if isinstance(actual, torch.Tensor) else torch.as_tensor(np.asarray(actual))).double()
    e = (expected.detach() if isinstance(expected, torch.Tensor) else torch.as_tensor(np.asarray(expected))).double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != reference {tuple(e.shape)}"
    magnitude = float(e.abs().max()) if scale is None else scale
    assert magnitude > 0, "the reference is all zeros: the comparison would prove nothing"
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol_frac * magnitude)


@pytest.fixture(scope="session")
def zoo():
    """Session cache of shared models: ``zoo(arch)``. Tests that change a model get ``make_model``."""
    cache: dict[str, nn.Module] = {}

    def get(arch: str) -> nn.Module:
        if arch not in cache:
            cache[arch] = make_model(arch)
        return cache[arch]
    return get


@pytest.fixture(autouse=True)
def _quiet_reference_libraries():
    with warnings.catch_warnings():
        # captum warns that it sets requires_grad on its inputs; grad-cam's tqdm is noisy
        warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")
        warnings.filterwarnings("ignore", message=".*Setting backward hooks on ReLU activations.*")
        yield


@pytest.fixture
def edge_foil():
    """A deliberately weight-independent 'explanation' (the input's edges), registered for one test: it
    must FAIL the randomisation test. Adding a method is one decorated function."""
    from nbexplain.methods import REGISTRY, register

    @register("edges_foil", kind="pixel", signed=False, summary="Sobel-like edges of the input (a foil)")
    def edges_foil(ctx):
        g = ctx.x.mean(1, keepdim=True)
        gx = torch.nn.functional.pad(g[..., 1:] - g[..., :-1], (0, 1))
        gy = torch.nn.functional.pad(g[..., 1:, :] - g[..., :-1, :], (0, 0, 0, 1))
        return (gx.abs() + gy.abs()).expand_as(ctx.x)
    yield "edges_foil"
    REGISTRY.pop("edges_foil")


def user_view(model: nn.Module) -> tuple:
    """Everything another notebook cell sees of a model: state_dict keys and values, the parameter objects
    and their requires_grad, every module's training flag, hooks and forward overrides."""
    from nbexplain.hygiene import hook_count
    state = model.state_dict(keep_vars=True)
    return (list(state), [t.detach().clone() for t in state.values()],
            [(id(p), p.requires_grad) for p in model.parameters()],
            [m.training for m in model.modules()], hook_count(model),
            [type(m).__name__ for m in model.modules() if "forward" in m.__dict__])


def assert_same_view(got: tuple, want: tuple) -> None:
    assert got[0] == want[0], "state_dict keys changed"
    assert all(torch.equal(a, b) for a, b in zip(got[1], want[1])), "state_dict values changed"
    assert got[2:] == want[2:], "parameters, requires_grad, training flags, hooks or forwards changed"
