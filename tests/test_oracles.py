"""nbexplain against independent references: captum 0.9 and pytorch-grad-cam (grad-cam 1.5.7).

Every comparison is on random-weight timm models of four families (ResNet, EfficientNet, ConvNeXt,
ViT), float32, with a fixed non-argmax target. Tolerances are relative (rtol 1e-4, plus an absolute
floor of 1e-5 of the reference's largest value); the references are checked to be non-trivial.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from captum.attr import (
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    Occlusion,
    Saliency,
)
from pytorch_grad_cam import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.reshape_transforms import vit_reshape_transform

import nbexplain as nbx
from nbexplain.methods import integrated
from conftest import ARCHS, CNNS, SIZE, TARGET, assert_close, make_input, make_model

ALL = list(ARCHS)


def explain(model, x, method, **kw):
    """One image (C,H,W) through the public API."""
    out = nbx.attribute(model, x[0], method, target=TARGET, **kw)
    assert isinstance(out, nbx.Attribution)
    assert out.target == TARGET
    return out


# ---------------------------------------------------------------------------------------- captum


@pytest.mark.parametrize("arch", ALL)
def test_saliency_equals_captum_saliency(zoo, arch):
    model, x = zoo(arch), make_input()
    ours = explain(model, x, "saliency")
    ref = Saliency(model).attribute(x.clone(), target=TARGET, abs=False)
    assert ours.raw.shape == x.shape
    assert_close(ours.raw, ref)


@pytest.mark.parametrize("arch", ALL)
def test_gradient_x_input_equals_captum(zoo, arch):
    model, x = zoo(arch), make_input()
    ours = explain(model, x, "gradient_x_input")
    assert_close(ours.raw, InputXGradient(model).attribute(x.clone(), target=TARGET))


RULES = ["riemann_left", "riemann_right", "riemann_middle", "gausslegendre"]


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("rule", RULES)
def test_integrated_gradients_equals_captum_zero_baseline(zoo, arch, rule):
    model, x = zoo(arch), make_input()
    ours = explain(model, x, "integrated_gradients", steps=7, rule=rule, baseline="zeros")
    ref = IntegratedGradients(model).attribute(x.clone(), baselines=0, target=TARGET, n_steps=7, method=rule)
    assert_close(ours.raw, ref)
    assert ours.meta["steps"] == 7


@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("rule", RULES)
def test_integrated_gradients_equals_captum_tensor_baseline(zoo, arch, rule):
    model, x = zoo(arch), make_input()
    baseline = make_input(seed=99) * 0.3
    ours = explain(model, x, "integrated_gradients", steps=6, rule=rule, baseline=baseline)
    ref = IntegratedGradients(model).attribute(x.clone(), baselines=baseline.clone(), target=TARGET,
                                               n_steps=6, method=rule)
    assert_close(ours.raw, ref)


@pytest.mark.parametrize("arch", ALL)
def test_integrated_gradients_trapezoid_is_captum_rescaled(zoo, arch):
    # nbexplain: textbook trapezoid (weights sum to 1); captum: weights 1/n with halved ends, sum (n-1)/n
    n = 9
    model, x = zoo(arch), make_input()
    ours = explain(model, x, "integrated_gradients", steps=n, rule="riemann_trapezoid", baseline="zeros")
    ref = IntegratedGradients(model).attribute(x.clone(), baselines=0, target=TARGET, n_steps=n,
                                               method="riemann_trapezoid")
    assert_close(ours.raw, ref * n / (n - 1))


def test_integrated_gradients_rules_really_differ(zoo):
    # guards the oracles above: on a non-homogeneous model the rules must not coincide
    model, x = zoo("resnet"), make_input()
    maps = {rule: explain(model, x, "integrated_gradients", steps=4, rule=rule, baseline="zeros").raw
            for rule in RULES}
    for a in RULES:
        for b in RULES:
            if a < b:
                assert not torch.allclose(maps[a], maps[b], rtol=1e-3, atol=0), (a, b)


OCCLUSION_CASES = [(arch, 16, 12) for arch in ALL] + [(arch, p, s) for arch in ("resnet", "vit")
                                                      for p, s in ((24, 24), (20, 10))]


@pytest.mark.parametrize("arch,patch,stride", OCCLUSION_CASES)
def test_occlusion_equals_captum(zoo, arch, patch, stride):
    model, x = zoo(arch), make_input()
    ref = Occlusion(model).attribute(x.clone(), sliding_window_shapes=(3, patch, patch),
                                     strides=(3, stride, stride), baselines=0, target=TARGET)
    # captum evaluates one occluded image per forward; with batch_size=1 so do we. A score drop is a
    # difference of two nearly equal logits, so the CPU's channels-last kernels (another summation
    # order than captum's NCHW) show up at ~1e-6 of the map's range: compare at 1e-4
    one = explain(model, x, "occlusion", patch=patch, stride=stride, fill="zeros", batch_size=1)
    assert_close(one.raw, ref, atol_frac=1e-4)
    # batched windows (the default) change only the summation order: the convolutions', and on a ViT the
    # last block's, which computes only the class token (``tail``) from the second call on: logits ~1e-7
    # apart, 1e-4 of this random ViT's feeble map (5e-4 against logits up to 0.95)
    batched = explain(model, x, "occlusion", patch=patch, stride=stride, fill="zeros")
    assert_close(batched.raw, ref, atol_frac=2e-4)


def test_guided_backprop_equals_captum_on_resnet(zoo):
    model, x = zoo("resnet"), make_input()
    ours = explain(model, x, "guided_backprop")
    ref = GuidedBackprop(model).attribute(x.clone(), target=TARGET)
    assert_close(ours.raw, ref)
    # and it is not just the gradient: the ReLU rule changes it
    plain = Saliency(model).attribute(x.clone(), target=TARGET, abs=False)
    assert not torch.allclose(ours.raw, plain, rtol=1e-2, atol=0)


@pytest.mark.parametrize("arch", CNNS)
def test_gradcam_equals_captum_layer_gradcam(zoo, arch):
    model, x = zoo(arch), make_input()
    layer = ARCHS[arch][2]
    ours = explain(model, x, "gradcam", layer=layer)
    ref = LayerGradCam(model, dict(model.named_modules())[layer]).attribute(
        x.clone(), target=TARGET, relu_attributions=True)
    assert ours.meta["layer"] == layer
    assert ours.raw.shape == ref[:, 0].shape            # layer resolution, one map per image
    assert_close(ours.raw, ref[:, 0])


def test_guided_gradcam_equals_captum(zoo):
    model, x = zoo("resnet"), make_input()
    layer = ARCHS["resnet"][2]
    ours = explain(model, x, "guided_gradcam", layer=layer)
    ref = GuidedGradCam(model, dict(model.named_modules())[layer]).attribute(
        x.clone(), target=TARGET, interpolate_mode="bilinear")
    assert_close(ours.raw, ref)


# ---------------------------------------------------------------------------------- pytorch-grad-cam


def grad_cam_reference(cam_class, model, layer_name, x, reshape_transform=None):
    """Run a grad-cam method on a private copy; return (layer-resolution CAM before ReLU, final output).

    grad-cam upsamples and min-max normalises in ``compute_cam_per_layer``; the subclass records the
    layer-resolution map that its own ``get_cam_image`` computes from the activations and gradients
    grad-cam captured itself.
    """
    class Probe(cam_class):
        def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
            acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
            grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
            self.layer_cam = self.get_cam_image(input_tensor, self.target_layers[0], targets, acts[0],
                                                grads[0] if grads else None, eigen_smooth)
            self.layer_acts = acts[0]
            return super().compute_cam_per_layer(input_tensor, targets, eigen_smooth)

    import copy
    mine = copy.deepcopy(model)
    cam = Probe(mine, [dict(mine.named_modules())[layer_name]], reshape_transform=reshape_transform)
    if cam_class is ScoreCAM:
        cam.batch_size = 64
    with cam:
        full = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(TARGET)])
    return cam.layer_cam, full, cam.layer_acts


def reshape_for(arch):
    if arch != "vit":
        return None
    grid = SIZE // 16                                     # test_vit: patch 16, one class token
    return functools.partial(vit_reshape_transform, height=grid, width=grid)


CAMS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
        "hirescam": HiResCAM, "scorecam": ScoreCAM}


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("method", list(CAMS))
def test_cam_equals_grad_cam_at_layer_resolution(zoo, arch, method):
    model, x = zoo(arch), make_input()
    layer = ARCHS[arch][2]
    ours = explain(model, x, method, layer=layer)
    pre_relu, full, _ = grad_cam_reference(CAMS[method], model, layer, x, reshape_for(arch))
    ref = np.maximum(pre_relu, 0)
    grid = SIZE // 16 if arch == "vit" else None
    if grid:
        assert ours.raw.shape == (1, grid, grid)
    assert ours.raw.shape == ref.shape
    # roundoff is relative to the size of the map before the ReLU, not after it
    assert_close(ours.raw, ref, scale=float(np.abs(pre_relu).max()))
    assert float(ref.max()) > 1e-3 * float(np.abs(pre_relu).max()), "degenerate reference (ReLU killed it)"
    if method in ("gradcam", "scorecam"):
        # grad-cam's own output: min-max normalised, then resized (cv2 bilinear, half-pixel centres),
        # which for a tensor input is our display map up to the normalisation
        m = ours.map - ours.map.min()
        m = m / (1e-7 + m.max())
        assert ours.map.shape == full.shape[1:] == (SIZE, SIZE)
        np.testing.assert_allclose(m, full[0], atol=2e-5)


@pytest.mark.parametrize("arch", ALL)
def test_eigencam_equals_grad_cam_up_to_sign(zoo, arch):
    model, x = zoo(arch), make_input()
    layer = ARCHS[arch][2]
    ours = explain(model, x, "eigencam", layer=layer)
    projection, _, acts = grad_cam_reference(EigenCAM, model, layer, x, reshape_for(arch))
    # grad-cam keeps the SVD's arbitrary sign; nbexplain orients the component so that it agrees
    # with the mean activation over channels
    sign = 1.0 if float((projection[0] * acts[0].mean(0)).sum()) >= 0 else -1.0
    expected = np.maximum(sign * projection, 0)
    assert float(expected.max()) > 0.1 * float(np.abs(projection).max())
    assert_close(ours.raw, expected, atol_frac=2e-5, scale=float(np.abs(projection).max()))


# ------------------------------------------------------------------------------------ SmoothGrad


@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("base", ["saliency", "gradient_x_input", "guided_backprop"])
def test_smoothgrad_without_noise_is_the_base_method(zoo, arch, base):
    model, x = zoo(arch), make_input()
    with pytest.warns() if (arch == "vit" and base == "guided_backprop") else _nothing():
        ours = explain(model, x, "smoothgrad", base=base, samples=1, noise=0.0)
    if base == "saliency":
        ref = Saliency(model).attribute(x.clone(), target=TARGET, abs=False)
    elif base == "gradient_x_input":
        ref = InputXGradient(model).attribute(x.clone(), target=TARGET)
    else:
        ref = GuidedBackprop(model).attribute(x.clone(), target=TARGET)
    assert_close(ours.raw, ref)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_smoothgrad_is_the_mean_of_captum_saliency_over_its_noise(zoo):
    # the documented noise model: sigma = noise * (max - min) of the input, sample i drawn from a
    # generator seeded with seed * 1_000_003 + i; the average is checked against captum per sample
    model, x = zoo("resnet"), make_input()
    samples, noise, seed = 5, 0.2, 11
    ours = explain(model, x, "smoothgrad", samples=samples, noise=noise, seed=seed)
    sigma = noise * float(x.max() - x.min())
    grads = []
    for i in range(samples):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        noisy = x + torch.randn(x.shape[1:], generator=g) * sigma
        grads.append(Saliency(model).attribute(noisy, target=TARGET, abs=False))
    assert_close(ours.raw, torch.stack(grads).mean(0))


def test_smoothgrad_seed_reproducible_and_seed_sensitive(zoo):
    model, x = zoo("resnet"), make_input()
    a = explain(model, x, "smoothgrad", samples=4, noise=0.2, seed=3)
    b = explain(model, x, "smoothgrad", samples=4, noise=0.2, seed=3)
    c = explain(model, x, "smoothgrad", samples=4, noise=0.2, seed=4)
    assert torch.equal(a.raw, b.raw) and np.array_equal(a.map, b.map)
    assert not torch.allclose(a.raw, c.raw, rtol=1e-3, atol=0)
    assert a.meta["params"]["seed"] == 3


@pytest.mark.parametrize("base", ["saliency", "gradient_x_input"])
def test_smoothgrad_sq_and_vargrad_relations(zoo, base):
    model, x = zoo("resnet"), make_input()
    kw = dict(base=base, samples=6, noise=0.15, seed=5)
    mean = explain(model, x, "smoothgrad", **kw).raw.double()
    sq = explain(model, x, "smoothgrad_sq", **kw).raw.double()
    var = explain(model, x, "vargrad", **kw).raw.double()
    assert_close(var, sq - mean * mean, atol_frac=1e-4)
    assert float(var.min()) >= -1e-6 * float(sq.max())          # a variance
    assert bool((sq >= mean * mean - 1e-6 * float(sq.max())).all())  # E[a²] >= E[a]²
    assert float(var.max()) > 0


# -------------------------------------------------------------------- Integrated Gradients, completeness


def test_integrated_gradients_completeness_improves_with_steps(zoo):
    model, x = zoo("resnet"), make_input()
    with torch.no_grad():
        gap = float(model(x)[0, TARGET] - model(torch.zeros_like(x))[0, TARGET])
    assert abs(gap) > 1e-2
    deltas = {}
    for steps in (4, 128):
        out = explain(model, x, "integrated_gradients", steps=steps, baseline="zeros", rule="riemann_middle")
        delta, rel = out.meta["delta"], out.meta["relative_delta"]
        assert out.delta == delta
        # meta['delta'] is Σ attributions − (f(x) − f(b)), checked against an independent forward
        assert delta == pytest.approx(float(out.raw.double().sum()) - gap, rel=1e-3, abs=1e-4 * abs(gap))
        assert rel == pytest.approx(abs(delta) / abs(gap), rel=1e-3)
        assert out.meta["f_x"] - out.meta["f_baseline"] == pytest.approx(gap, rel=1e-4)
        deltas[steps] = abs(delta)
    assert deltas[128] < deltas[4] / 10
    assert deltas[128] < 1e-2 * abs(gap)


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "riemann_right", "riemann_middle", "gausslegendre"])
def test_integrated_gradients_auto_steps_reach_tolerance(rule):
    model, x = make_model("resnet", act_layer="elu"), make_input()   # ELU: a smooth path that needs refining
    out = explain(model, x, "integrated_gradients", steps="auto", tolerance=0.02, baseline="zeros", rule=rule)
    assert out.meta["relative_delta"] <= 0.02
    # this model needs refinement: 'auto' went past its first grid
    assert out.meta["steps"] > next(integrated.refinements(rule))
    if out.meta["quadrature"] == rule:
        # the rule's own grid (the Riemann grids nest): the fixed-step result at the step count it settled on
        fixed = explain(model, x, "integrated_gradients", steps=out.meta["steps"], baseline="zeros", rule=rule)
        assert_close(out.raw, fixed.raw)
    else:
        # Gauss-Legendre's 16 points missed, so the adaptive rule took over
        assert rule == "gausslegendre" and out.meta["quadrature"] == "adaptive_simpson"


@pytest.mark.parametrize("rule", ["riemann_trapezoid", "riemann_right", "gausslegendre"])
def test_integrated_gradients_auto_on_a_relu_net_takes_the_adaptive_rule(zoo, rule):
    """A ReLU net's path gradient is piecewise constant: no uniform grid is tried, whatever the rule, and the
    map is as close to a fine grid's as the adaptive rule's map tolerance says."""
    model, x = zoo("resnet"), make_input()
    out = explain(model, x, "integrated_gradients", steps="auto", tolerance=0.02, baseline="zeros", rule=rule)
    assert out.meta["relative_delta"] <= 0.02
    assert out.meta["quadrature"] == "adaptive_simpson"
    assert out.meta["evaluations"] == out.meta["steps"] + 2          # + f at x and at the baseline
    fine = explain(model, x, "integrated_gradients", steps=1025, baseline="zeros", rule="riemann_trapezoid")
    assert float((out.raw - fine.raw).norm() / fine.raw.norm()) <= integrated.MAP_TOLERANCE


def test_scorecam_channels_of_one_shape_cost_one_forward_and_match_grad_cam(zoo):
    """Channels that are zero everywhere all mask the image to zero, and a channel that is another scaled
    (one active cell on a trained net) gives its mask: one shared forward each, same map."""
    model, x = zoo("resnet"), make_input()
    layer = ARCHS["resnet"][2]
    seen = []
    probe = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    with torch.no_grad():
        model(x)
    probe.remove()
    width = seen[0]
    dead = list(range(0, width, 3))                      # a third of the layer's channels, silenced
    copies, sources = list(range(1, width, 6)), list(range(2, width, 6))[:len(range(1, width, 6))]

    def silence(_m, _inp, out):
        out = out.clone()
        out[:, dead] = 0
        out[:, copies[:len(sources)]] = 4 * out[:, sources]   # a power of two: the same shape to the bit
        return out

    handle = dict(model.named_modules())[layer].register_forward_hook(silence)
    try:
        ours = explain(model, x, "scorecam", layer=layer)
        pre_relu, _, acts = grad_cam_reference(ScoreCAM, model, layer, x, None)
    finally:
        handle.remove()
    channels = acts.shape[1]
    zero = int((np.abs(acts[0]).max((1, 2)) == 0).sum())     # ours, plus any the ReLU killed already
    assert np.abs(acts[0, dead]).max() == 0 and len(dead) <= zero < channels
    shapes = {tuple(np.round((c.ravel() - c.min()) / (c.max() - c.min()), 6)) for c in acts[0] if c.max() > c.min()}
    assert len(shapes) < channels - zero                  # the copies of live channels share a shape
    # one pass at x (targets, activations), one per shape of live channel, one for all the dead ones
    assert ours.meta["evaluations"] == 1 + len(shapes) + 1
    assert_close(ours.raw, np.maximum(pre_relu, 0), scale=float(np.abs(pre_relu).max()))
