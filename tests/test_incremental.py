"""Occlusion on crops (``nbexplain.incremental``): the same maps as whole-image passes, on any model, and
the model left as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nbexplain as nbx
from nbexplain import incremental
from nbexplain.context import Context
from nbexplain.hygiene import hook_count
from conftest import TARGET, assert_close, make_input, make_model


@pytest.fixture
def always(monkeypatch):
    """The path wherever it holds, however little it saves (tiny test nets), with its uses counted."""
    monkeypatch.setattr(incremental, "MIN_SAVING", 0.0)
    used = []
    occluded = Context._occluded

    def counted(self, patch):
        found = occluded(self, patch)
        if found is not None:
            used.append(len(found.units))
        return found
    monkeypatch.setattr(Context, "_occluded", counted)
    return used


def whole_image(monkeypatch, run):
    """``run()`` with every occluded pass on the whole image."""
    with monkeypatch.context() as m:
        m.setattr(Context, "_occluded", lambda self, patch: None)
        return run()


def occlusion(model, x, **kw):
    return nbx.attribute(model, x, "occlusion", target=TARGET, preprocess=nbx.Preprocess(size=tuple(x.shape[2:])),
                         **kw)


@pytest.mark.parametrize("arch, size, patch, stride, n", [
    ("resnet", 96, 16, 8, 1),
    ("resnet", (97, 83), 13, 7, 2),            # odd sides: the last windows run past the edge
    ("efficientnet", 96, 12, 6, 1),
    ("convnext", 96, 16, 8, 1),
    ("tf_mobilenetv3_small_minimal_100", 96, 16, 12, 1),     # TF-"same" padding: pads by the input's size
])
def test_occlusion_on_crops_gives_the_whole_image_maps(monkeypatch, always, arch, size, patch, stride, n):
    model = make_model(arch)
    x = make_input(n, size)
    got = occlusion(model, x, patch=patch, stride=stride)
    assert always and min(always) >= 2, "the crops path did not run"
    want = whole_image(monkeypatch, lambda: occlusion(model, x, patch=patch, stride=stride))
    for g, w in zip(got, want):
        assert_close(g.raw, w.raw, rtol=1e-3, atol_frac=1e-4)


def test_the_chain_splits_containers_and_keeps_residual_blocks_whole():
    model = make_model("resnet")
    names = {m: n for n, m in model.named_modules()}
    chain = [names[m] for m in incremental.chain(model, make_input())]
    assert chain[:4] == ["conv1.0", "conv1.1", "conv1.2", "conv1.3"]    # a deep stem's Sequential, split
    assert "layer1.0" in chain and "layer1.0.conv1" not in chain       # a block with a shortcut, whole
    assert "layer1" not in chain


class ReadsAnEarlierActivation(nn.Module):
    """Its head also reads the first conv's output: standing in for that conv would feed it NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        a = self.c1(x)
        b = torch.relu(self.c2(a))
        return self.head(b.mean((2, 3)) + a.mean((2, 3)))


class AddsInPlace(nn.Module):
    """A residual added in place to a conv's output between two modules (``out += x``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        out = self.c1(x)
        out += x
        return self.head(self.act(self.c2(out)).mean((2, 3)))


class PositionalBias(nn.Module):
    """A learned per-position bias: local, but a crop is not the image (its shape does not match)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, 8, 64, 64))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x) + self.pos).mean((2, 3)))


class ReadsAnEarlierActivationSometimes(ReadsAnEarlierActivation):
    """Reads the first conv's output only when the top-left pixel is zero: the probe's noise patches never
    make it so, an occlusion window filled with zeros does."""

    def forward(self, x):
        a = self.c1(x)
        out = self.head(torch.relu(self.c2(a)).mean((2, 3)))
        return out + a.mean((1, 2, 3))[:, None] if bool((x[:, :, 0, 0] == 0).any()) else out


class SharesItsActivation(nn.Module):
    """One ReLU instance called twice in the chain."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        relu = nn.ReLU()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), relu, nn.Conv2d(8, 8, 3, padding=1), relu)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Wrapper(nn.Module):
    """A network inside a wrapper: the chain goes on inside it."""

    def __init__(self, inner):
        super().__init__()
        self.model = inner

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("build", [ReadsAnEarlierActivation, ReadsAnEarlierActivationSometimes, AddsInPlace,
                                   PositionalBias, SharesItsActivation, lambda: Wrapper(make_model("resnet"))])
def test_models_the_chain_does_not_describe_get_the_whole_image_maps(monkeypatch, always, build):
    model = build().eval()
    x = make_input(1, 64)
    (got,) = occlusion(model, x, patch=16, stride=8)
    (want,) = whole_image(monkeypatch, lambda: occlusion(model, x, patch=16, stride=8))
    assert_close(got.raw, want.raw, rtol=1e-3, atol_frac=1e-4)
    assert not any("forward" in m.__dict__ for m in model.modules()) and hook_count(model) == 0
    if build is ReadsAnEarlierActivation:
        assert not always, "a model reading a stood-in activation must not take the path"


def test_the_model_is_left_as_it_was(always):
    model = make_model("resnet")
    occlusion(model, make_input(1, 64), patch=16, stride=16)
    assert always
    assert hook_count(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(not m.training for m in model.modules()) and all(p.requires_grad for p in model.parameters())


def test_a_hooked_model_runs_whole_images_only_and_its_hook_sees_each_once(monkeypatch, always):
    model = make_model("resnet")
    x = make_input(1, 64)
    seen = []
    handle = model.layer2.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        (got,) = occlusion(model, x, patch=16, stride=16)
        hooked_outputs, seen[:] = list(seen), []
        (want,) = whole_image(monkeypatch, lambda: occlusion(model, x, patch=16, stride=16))
    finally:
        handle.remove()
    assert not always, "a hook would have seen the probe's passes and crops"
    assert_close(got.raw, want.raw, rtol=1e-3, atol_frac=1e-4)
    # the occlusion passes, last in both calls (the first call also ran the other fast paths' probes)
    assert len(hooked_outputs) >= len(seen) >= 2
    for g, w in zip(hooked_outputs[-len(seen):], seen):
        assert_close(g, w, rtol=1e-3, atol_frac=1e-4)


def test_images_whose_activations_would_take_too_much_memory_run_whole(monkeypatch, always):
    model = make_model("resnet")
    x = make_input(3, 64)
    kept = []
    init = incremental.Occluded.__init__

    def measured(self, *args):
        init(self, *args)
        kept.append(sum(b.numel() * b.element_size() for b in self.bases[1:]))
    monkeypatch.setattr(incremental.Occluded, "__init__", measured)
    occlusion(model, x[:2], patch=16, stride=16)
    assert always and kept, "two images take the path"
    monkeypatch.setattr(incremental, "MAX_BASES", kept[-1])    # room for exactly those two images (the last made)
    always.clear()
    got = occlusion(model, x, patch=16, stride=16)
    assert not always, "three images' activations would not fit"
    want = whole_image(monkeypatch, lambda: occlusion(model, x, patch=16, stride=16))
    for g, w in zip(got, want):
        assert_close(g.raw, w.raw, rtol=1e-3, atol_frac=1e-4)
    occlusion(model, x[:2], patch=16, stride=16)
    assert always, "two still fit"
