"""The fast paths: channels-last inputs for CNNs and no autograd graph where no gradient is needed,
never at the cost of a different answer."""
from __future__ import annotations

import torch
from captum.attr import IntegratedGradients, Saliency
from torch import nn

import nbexplain as nbx
from nbexplain.hygiene import borrowed, hook_count
from nbexplain.speed import input_format
from conftest import TARGET, assert_close, make_input, make_model


class FlattensWithView(nn.Module):
    """A CNN whose head assumes NCHW strides: ``.view`` on a feature map fails on channels-last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=4))
        self.head = nn.Linear(8 * 24 * 24, 10)

    def forward(self, x):
        f = self.features(x)
        return self.head(f.view(f.shape[0], -1))


class PermutesAsIfNCHW(nn.Module):
    """Reads raw storage order (``as_strided``): runs in either format but gives other logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(4 * 96 * 96, 10)

    def forward(self, x):
        f = self.conv(x)
        flat = f.as_strided((f.shape[0], f[0].numel()), (f[0].numel(), 1))
        return self.head(flat)


def test_cnns_run_channels_last_on_cpu_and_vits_do_not(zoo):
    x = make_input()
    for arch, expected in (("resnet", torch.channels_last), ("efficientnet", torch.channels_last),
                           ("vit", torch.contiguous_format)):
        with borrowed(zoo(arch)):
            assert input_format(zoo(arch), x) == expected, arch


def test_channels_last_results_match_captum(zoo):
    model, x = zoo("resnet"), make_input()
    with borrowed(model):
        assert input_format(model, x) == torch.channels_last
    ours = nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=16, rule="riemann_right",
                          baseline="zeros")
    ref = IntegratedGradients(model).attribute(x.clone(), target=TARGET, n_steps=16, method="riemann_right")
    assert_close(ours[0].raw, ref)


def test_models_that_assume_nchw_strides_keep_nchw():
    for model in (FlattensWithView().eval(), PermutesAsIfNCHW().eval()):
        x = make_input()
        params = {k: v.clone() for k, v in model.state_dict().items()}
        with borrowed(model):
            assert input_format(model, x) == torch.contiguous_format, type(model).__name__
        ours = nbx.attribute(model, x, "saliency", target=3)
        ref = Saliency(model).attribute(x.clone(), target=3, abs=False)
        assert_close(ours[0].raw, ref)
        # the probe left the model as it was
        assert hook_count(model) == 0 and not model.training
        assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())


def test_the_probe_runs_in_eval_mode_and_restores_train_mode():
    model, x = make_model("resnet"), make_input(size=80)  # its own model: it is left in train mode
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    nbx.attribute(model, x, "saliency", target=TARGET)
    assert model.training
    assert all(torch.equal(stats[k], model.state_dict()[k]) for k in stats), "BN statistics moved"


def test_a_cam_records_no_autograd_graph_before_its_layer(zoo):
    """Grad-CAM needs d score / d A at the layer only: the stem must run as a plain forward (6-13% of
    a CNN's Grad-CAM), while the layer's own gradient stays exact (the oracle tests compare it)."""
    model, x = zoo("resnet"), make_input()
    recorded = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: recorded.__setitem__(n, o.requires_grad))
             for n in ("conv1", "layer4")]
    try:
        nbx.attribute(model, x, "gradcam", layer="layer3", target=TARGET)
        assert recorded == {"conv1": False, "layer4": True}
        nbx.attribute(model, x, "guided_gradcam", layer="layer3", target=TARGET)   # needs d score / d x
        assert recorded["conv1"]
    finally:
        for h in hooks:
            h.remove()


def test_smoothgrad_draws_each_noise_sample_once(zoo, monkeypatch):
    """The unit noise depends on (seed, index, shape) only: a second image, or the same call again, draws
    none (on a GPU the CPU draw and copy outweighed the passes), and the maps are unchanged by the reuse."""
    from nbexplain.methods.smoothgrad import _UNIT_NOISE
    model, x = zoo("resnet"), make_input(2)
    draws, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(1) or randn(*a, **k))
    kw = dict(samples=5, noise=0.2, seed=987_654, target=TARGET)
    first = nbx.attribute(model, x[:1], "smoothgrad", **kw)[0]
    assert len(draws) == 5
    again = nbx.attribute(model, x, "smoothgrad", **kw)          # the same image again, and another
    assert len(draws) == 5
    torch.testing.assert_close(again[0].raw, first.raw)
    assert _UNIT_NOISE.bytes <= _UNIT_NOISE.max_bytes
