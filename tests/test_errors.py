"""Mistakes get clear errors that name the argument (and suggest a fix); odd images just work."""
from __future__ import annotations

import copy
import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch import nn

import nbexplain as nbx
from conftest import make_model
from nbexplain import trust

X = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cnn():
    return make_model("test_resnet")


@pytest.fixture(scope="module")
def vit():
    return make_model("test_vit")


# ------------------------------------------------------------------------------- method, layer


def test_unknown_method_suggests_close_match(cnn):
    with pytest.raises(ValueError, match=r"unknown method 'gradcma'.*Did you mean: 'gradcam'"):
        nbx.attribute(cnn, X, "gradcma")
    with pytest.raises(ValueError, match=r"method.*'integrated_gradients'"):
        nbx.attribute(cnn, X, "integrated_gradient")
    with pytest.raises(TypeError, match="method"):
        nbx.attribute(cnn, X, None)


def test_unknown_layer_suggests_close_match(cnn):
    with pytest.raises(ValueError, match=r"unknown layer 'layr3'.*Did you mean: 'layer3'"):
        nbx.attribute(cnn, X, "gradcam", layer="layr3")
    with pytest.raises(ValueError, match=r"unknown layer 'blocks\.5\.nrom1'.*'blocks\.5\.norm1'"):
        nbx.attribute(make_model("test_vit"), X, "gradcam", layer="blocks.5.nrom1")
    with pytest.raises(TypeError, match="layer"):
        nbx.attribute(cnn, X, "gradcam", layer=3)


def test_a_layer_given_as_a_module_is_read_by_its_name(cnn):
    """pytorch-grad-cam users pass ``model.layer4[-1]``: the same map as the name, and the name in meta."""
    by_module = nbx.attribute(cnn, X, "gradcam", layer=cnn.layer3[-1])
    assert by_module.meta["layer"] == "layer3.0"
    np.testing.assert_array_equal(by_module.map, nbx.attribute(cnn, X, "gradcam", layer="layer3.0").map)
    with pytest.raises(ValueError, match="not a module of this model"):
        nbx.attribute(cnn, X, "gradcam", layer=copy.deepcopy(cnn.layer3))
    with pytest.raises(ValueError, match="whole model"):
        nbx.attribute(cnn, X, "gradcam", layer=cnn)


@pytest.mark.parametrize("name", ["fc", "global_pool"])
def test_layer_without_spatial_output_for_a_cam(cnn, name):
    with pytest.raises(ValueError, match=rf"layer '{name}' has no spatial output.*nbx.layers"):
        nbx.attribute(cnn, X, "gradcam", layer=name)


def test_vit_head_is_not_a_cam_layer(vit):
    with pytest.raises(ValueError, match="layer 'head' has no spatial output"):
        nbx.attribute(vit, X, "gradcam", layer="head")


def test_layer_given_to_a_method_without_layers(cnn):
    with pytest.raises(ValueError, match=r"layer: 'saliency' does not use a layer"):
        nbx.attribute(cnn, X, "saliency", layer="layer2")


def test_vit_only_method_on_a_cnn(cnn):
    for method in ("attention", "attention_rollout", "grad_rollout"):
        with pytest.raises(ValueError, match=rf"method '{method}' needs a Vision Transformer.*has none.*'gradcam'.*work on any model"):
            nbx.attribute(cnn, X, method)


# ------------------------------------------------------------------------------- model outputs


class Returns(nn.Module):
    """The same classifier, returning its scores the way other libraries do."""

    def __init__(self, model, how):
        super().__init__()
        self.model, self.how = model, how

    def forward(self, x):
        scores = self.model(x)
        if self.how == "tuple":
            return scores, x.mean()
        if self.how == "dict":
            return {"logits": scores, "features": x}
        if self.how == "hf":                               # transformers' ImageClassifierOutput
            return type("ImageClassifierOutput", (), {"logits": scores, "loss": None})()
        return "not scores"


@pytest.mark.parametrize("how", ["tuple", "dict", "hf"])
def test_scores_are_read_from_tuples_dicts_and_hugging_face_outputs(cnn, how):
    wrapped = Returns(cnn, how).eval()
    for method in ("saliency", "gradcam", "integrated_gradients"):
        kw = {"steps": 4, "baseline": "zeros"} if method == "integrated_gradients" else {}
        got = nbx.attribute(wrapped, X, method, **kw)
        plain = nbx.attribute(cnn, X, method, **kw)
        assert got.target == plain.target and torch.allclose(got.raw, plain.raw, rtol=1e-5, atol=1e-7)


def test_a_wrapper_module_keeps_the_layer_roles_of_the_network_inside(vit):
    """A LightningModule-style wrapper (self.model) must not hide the ViT's blocks and geometry."""
    wrapped = Returns(vit, "tuple").eval()
    inner = [d["name"] for d in nbx.layers(vit, X)]
    assert [d["name"] for d in nbx.layers(wrapped, X)] == ["model." + n for n in inner]
    got, plain = nbx.attribute(wrapped, X, "gradcam", target=3), nbx.attribute(vit, X, "gradcam", target=3)
    assert got.meta["layer"] == "model." + plain.meta["layer"] and torch.allclose(got.raw, plain.raw)
    avg = make_model("test_vit", global_pool="avg")             # pooling is read inside the wrapper too
    for method in ("attention", "attention_rollout"):
        assert torch.equal(nbx.attribute(Returns(avg, "tuple").eval(), X, method).raw,
                           nbx.attribute(avg, X, method).raw)


class Detached(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).detach()


def test_scores_without_gradients_name_the_cause_and_occlusion_still_runs(cnn, vit):
    from nbexplain.hygiene import hook_count
    for model in (Detached(cnn).eval(), Detached(vit).eval()):
        for method in ("saliency", "gradcam", "integrated_gradients", "smoothgrad"):
            with pytest.raises(ValueError, match=r"model: its scores carry no gradient.*use 'occlusion'"):
                nbx.attribute(model, X, method, **({"baseline": "zeros"} if method == "integrated_gradients" else {}))
        assert np.isfinite(nbx.attribute(model, X, "occlusion", patch=32, stride=32).map).all()
        assert hook_count(model) == 0
    with pytest.raises(ValueError, match=r"model: its scores carry no gradient"):
        nbx.attribute(Detached(vit).eval(), X, "grad_rollout")


def test_a_data_parallel_model_takes_pictures_with_the_config_of_the_network_inside():
    model = nbx.load_model("synthetic-cnn")
    picture = np.zeros((40, 50, 3), np.uint8) + 128
    got = nbx.attribute(torch.nn.DataParallel(model), picture, "saliency", target=1)
    want = nbx.attribute(model, picture, "saliency", target=1)
    assert got.meta["preprocess"] == want.meta["preprocess"] and torch.allclose(got.raw, want.raw)
    wrapped = torch.nn.DataParallel(model)
    own = nbx.Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    from nbexplain.models import describe, register
    register(wrapped, describe(model, own))                  # what the wrapper was given comes first
    assert nbx.attribute(wrapped, picture, "saliency", target=1).meta["preprocess"]["size"] == [32, 32]


def test_an_output_without_scores_says_how_to_wrap_the_model(cnn):
    with pytest.raises(TypeError, match=r"model: expected class scores.*got str; wrap the model"):
        nbx.attribute(Returns(cnn, "str").eval(), X, "saliency")


SMALL = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 3}, "smoothgrad_sq": {"samples": 3},
         "vargrad": {"samples": 3}, "occlusion": {"patch": 32, "stride": 32}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_model_gets_inputs_in_its_dtype(dtype):
    """Every CNN method runs on a half-precision model (Score-CAM stored bf16 scores into a float tensor)."""
    model = make_model("test_resnet").to(dtype)
    for method in (s["name"] for s in nbx.methods() if not s["vit_only"]):
        out = nbx.attribute(model, X, method, **SMALL.get(method, {}))
        assert out.map.dtype == np.float32 and np.isfinite(out.map).all(), method
    assert all(p.dtype == dtype for p in model.parameters())


def test_torchscript_models_run_the_pixel_methods_and_get_a_clear_error_for_hook_methods(cnn):
    from nbexplain.hygiene import hook_count
    traced = torch.jit.trace(cnn, X[None])
    for method, params in (("saliency", {}), ("smoothgrad", {"samples": 2}), ("occlusion", {"patch": 32, "stride": 32}),
                           ("integrated_gradients", {"steps": 2, "baseline": "zeros"})):
        assert nbx.attribute(traced, X, method, **params).raw.shape == (1, 3, 64, 64), method
    with pytest.raises(TypeError, match=r"forward hooks, which TorchScript modules.*pass the original nn.Module"):
        nbx.attribute(traced, X, "gradcam")
    assert hook_count(cnn) == 0


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "8"])
def test_batch_size_must_be_a_positive_integer_with_one_error_everywhere(cnn, bad):
    """A count that is no integer is a TypeError (and a ValueError, as the other argument checks raise);
    one below 1 a ValueError; attribute, explain_batch and deletion_insertion say it the same way."""
    error = ValueError if type(bad) is int else TypeError
    calls = (lambda: nbx.attribute(cnn, X, "integrated_gradients", steps=4, batch_size=bad),
             lambda: nbx.explain_batch(cnn, X, "saliency", batch_size=bad, progress=False),
             lambda: trust.deletion_insertion(cnn, nbx.attribute(cnn, X, "saliency"), batch_size=bad))
    for call in calls:
        with pytest.raises(error, match=rf"batch_size={bad!r}: expected a positive integer \("):
            call()
    assert nbx.attribute(cnn, X, "integrated_gradients", steps=4, batch_size=np.int64(2)).map.shape == (64, 64)


# ------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("target", [1000, -1, 10**9])
def test_target_out_of_range(cnn, target):
    with pytest.raises(ValueError, match=rf"target={target} is out of range.*1000 classes"):
        nbx.attribute(cnn, X, "saliency", target=target)


def test_target_unknown_class_name(cnn):
    with pytest.raises(ValueError, match=r"target='goldfsh'.*Did you mean: 'goldfish'"):
        nbx.attribute(cnn, X, "saliency", target="goldfsh")


def test_labels_must_name_every_class_before_any_work_is_done(cnn, monkeypatch):
    from nbexplain.context import Context
    passes = []
    real = Context.forward
    monkeypatch.setattr(Context, "forward", lambda ctx, xs: passes.append(len(xs)) or real(ctx, xs))
    with pytest.raises(ValueError, match=r"labels: got 2 names for a model with \d+ classes; pass one name per class"):
        nbx.attribute(cnn, X, "integrated_gradients", steps=8, labels=["a", "b"])
    assert passes == [2]                     # the first pass (the image and the baseline), not the path's 8 points
    with pytest.raises(TypeError, match="labels: expected a list of class names, got a str"):
        nbx.attribute(cnn, X, "saliency", labels="abc")


def test_target_name_without_labels():
    model = make_model("test_resnet", num_classes=5)      # not ImageNet: no class names
    with pytest.raises(ValueError, match=r"target='cat'.*labels="):
        nbx.attribute(model, X, "saliency", target="cat")
    out = nbx.attribute(model, X, "saliency", target="cat", labels=["dog", "cat", "a", "b", "c"])
    assert out.target == 1 and out.label == "cat"


def test_target_wrong_type_and_count(cnn):
    with pytest.raises(TypeError, match="target"):
        nbx.attribute(cnn, X, "saliency", target=1.5)
    with pytest.raises(ValueError, match="target: got 3 targets for 2 images"):
        nbx.attribute(cnn, torch.stack([X, X]), "saliency", target=[1, 2, 3])


# -------------------------------------------------------------------------------------- tensors


def test_wrong_channel_count(cnn):
    with pytest.raises(ValueError, match=r"images: the model expects 3 channels, the tensor has 4"):
        nbx.attribute(cnn, torch.randn(1, 4, 64, 64), "saliency")
    with pytest.raises(ValueError, match=r"channels.*NHWC"):
        nbx.attribute(cnn, torch.randn(1, 64, 64, 3), "saliency")


def test_a_gray_model_given_an_rgb_tensor_is_not_told_to_permute():
    """An NCHW RGB tensor for a 1-channel model: the NHWC hint would be wrong (the channels are where they
    belong), and '1 channels' read badly."""
    gray = make_model("test_resnet", in_chans=1)
    with pytest.raises(ValueError) as caught:
        nbx.attribute(gray, torch.randn(1, 3, 64, 64), "saliency")
    message = str(caught.value)
    assert "expects 1 channel, the tensor has 3" in message and "permute" not in message
    assert "pass a (N,1,H,W) tensor, or the picture itself" in message
    with pytest.raises(ValueError, match=r"expects 1 channel, .*is it NHWC\? use t\.permute\(0, 3, 1, 2\)"):
        nbx.attribute(gray, torch.randn(1, 64, 64, 1), "saliency")


def test_wrong_rank_and_dtype(cnn):
    with pytest.raises(ValueError, match=r"images: a tensor must be \(N,C,H,W\)"):
        nbx.attribute(cnn, torch.randn(64, 64), "saliency")
    with pytest.raises(TypeError, match="images: a tensor input must be float"):
        nbx.attribute(cnn, torch.zeros(3, 64, 64, dtype=torch.uint8), "saliency")


def test_empty_inputs(cnn):
    with pytest.raises(ValueError, match="images: the tensor is empty"):
        nbx.attribute(cnn, torch.randn(0, 3, 64, 64), "saliency")
    with pytest.raises(ValueError, match="image: the array is empty"):
        nbx.attribute(cnn, np.zeros((0, 0, 3), np.uint8), "saliency")
    with pytest.raises(ValueError, match="images: the list is empty"):
        nbx.attribute(cnn, [], "saliency")
    for size in ((0, 0), (0, 5), (5, 0)):
        with pytest.raises(ValueError, match=rf"image: the picture is empty \({size[0]}x{size[1]} pixels\)"):
            nbx.attribute(cnn, Image.new("RGB", size), "saliency")
        with pytest.raises(ValueError, match="image: the picture is empty"):
            nbx.explain(cnn, [Image.new("RGB", size)])
    with pytest.raises(ValueError, match=r"image: .* is a folder; .*nbx.explain_batch"):
        nbx.attribute(cnn, os.path.dirname(__file__), "saliency")
    nan = np.full((8, 8), np.nan, np.float32)
    with pytest.raises(ValueError, match="image: the F-mode picture holds NaN or Inf values"):
        nbx.attribute(cnn, Image.fromarray(nan, "F"), "saliency")


class Scaled(nn.Module):
    def __init__(self, model, factor):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


def test_numpy_targets_zero_class_outputs_and_a_progress_that_is_no_function(cnn):
    assert nbx.attribute(cnn, X, "saliency", target=np.array(3)).target == 3
    assert nbx.attribute(cnn, X, "saliency", target=torch.tensor(4)).target == 4
    with pytest.raises(ValueError, match=r"model: expected class scores of shape \(N, classes\), got \(1, 0\)"):
        nbx.attribute(Sliced(cnn).eval(), X, "saliency")
    with pytest.raises(TypeError, match="progress: expected a function"):
        nbx.attribute(cnn, X, "saliency", progress=3)


class Outputs(nn.Module):
    def __init__(self, model, f):
        super().__init__()
        self.model, self.f = model, f

    def forward(self, x):
        return self.f(self.model(x))


@pytest.mark.parametrize("f,method,got", [
    (lambda o: o > 0, "saliency", r"\(1, \d+\) bool"),
    (lambda o: o.to(torch.complex64), "saliency", r"\(1, \d+\) complex64"),
    (lambda o: o.sum(), "integrated_gradients", r"\(\) float32"),
    # right at one image, wrong in a batch (the first pass checked alone let IG and occlusion fail in gather)
    (lambda o: o.sum(0, keepdim=True), "integrated_gradients", r"batch of N=\d+, got \(1, \d+\)"),
    (lambda o: o.sum(0, keepdim=True), "occlusion", r"batch of N=\d+, got \(1, \d+\)"),
    (lambda o: o.sum(0, keepdim=True), "smoothgrad", r"batch of N=\d+, got \(1, \d+\)")])
def test_every_pass_checks_the_model_returns_one_row_of_real_scores_per_input(cnn, f, method, got):
    model = Outputs(cnn, f).eval()
    params = {"integrated_gradients": {"steps": 4, "baseline": "zeros"}, "smoothgrad": {"samples": 4}}.get(method, {})
    with pytest.raises(ValueError, match=r"model: expected real class scores of shape \(N, classes\).*" + got):
        nbx.attribute(model, X, method, **params)


def test_a_model_that_returns_probabilities_is_told_to_give_logits(cnn):
    """exp.probs applied a second softmax (0.999 shown as 0.40) without a word."""
    with pytest.warns(UserWarning, match=r"sum to 1 for every image: probabilities.*without its final softmax"):
        out = nbx.attribute(Outputs(cnn, lambda o: o.softmax(1)).eval(), X, "saliency")
    assert "probabilities" in out.meta["warnings"][0]


class Sliced(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[:, :0]


def test_nan_scores_are_refused_instead_of_an_all_nan_map(cnn):
    for method, kw in (("saliency", {}), ("gradcam", {}), ("occlusion", {"patch": 32, "stride": 32})):
        with pytest.raises(ValueError, match=r"model: its scores at this input are NaN or infinite"):
            nbx.attribute(Scaled(cnn, float("nan")).eval(), X, method, **kw)


def test_a_model_on_the_meta_device_is_refused_with_the_fix():
    with torch.device("meta"):
        model = make_model("test_resnet")
    with pytest.raises(ValueError, match=r"model: its weights are on the meta device.*to_empty"):
        nbx.attribute(model, X, "saliency")


def test_a_list_of_tensors_is_one_batch_of_model_input(cnn):
    with pytest.raises(TypeError, match=r"images: the list mixes tensors .* with ndarray .*all pictures .* or all tensors"):
        nbx.attribute(cnn, [X, np.zeros((64, 64, 3), np.uint8)], "saliency")
    with pytest.raises(TypeError, match=r"images: the list mixes tensors .* with Image"):
        nbx.attribute(cnn, [X, Image.new("RGB", (8, 8))], "saliency")
    with pytest.raises(ValueError, match=r"images: tensors of different shapes \[\(3, 32, 64\), \(3, 64, 64\)\]"):
        nbx.attribute(cnn, [X, X[:, :32]], "saliency")
    both = nbx.attribute(cnn, [X, X.flip(2)], "saliency")
    assert len(both) == 2 and torch.allclose(both[0].raw, nbx.attribute(cnn, X, "saliency").raw, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), [float("inf"), -float("inf")]])
def test_non_finite_input(cnn, bad):
    x = X.clone()
    x[0, 3, 3:3 + (len(bad) if isinstance(bad, list) else 1)] = torch.tensor(bad)    # +inf and -inf: sum NaN
    with pytest.raises(ValueError, match="images: the tensor contains NaN or infinite values"):
        nbx.attribute(cnn, x, "saliency")
    a = np.full((8, 8, 3), 0.5)
    a[1, 1, 1] = bad[0] if isinstance(bad, list) else bad
    with pytest.raises(ValueError, match="image: the array contains NaN or infinite values"):
        nbx.attribute(cnn, a, "saliency")


def test_large_finite_input_values_are_accepted(cnn):
    """Values whose sum overflows float32 are still finite: the quick check must not call them infinite."""
    x = torch.full_like(X, 3e38)
    from nbexplain.images import prepare
    assert torch.equal(prepare(x, None).x[0], x)


# ------------------------------------------------------------------------------------ parameters


def test_unknown_parameter_suggests_close_match(cnn):
    with pytest.raises(ValueError, match=r"unknown parameter for 'integrated_gradients': 'step'.*'steps'"):
        nbx.attribute(cnn, X, "integrated_gradients", step=5)
    with pytest.raises(ValueError, match=r"'smoothgrad'.*'nois'.*'noise'"):
        nbx.attribute(cnn, X, "smoothgrad", nois=0.1)
    with pytest.raises(TypeError, match="'saliency' takes no parameters, got steps"):
        nbx.attribute(cnn, X, "saliency", steps=5)


@pytest.mark.parametrize("method,param,value,exc,pattern", [
    ("integrated_gradients", "steps", 0, ValueError, r"steps=0: must be within \[1, 4096\]"),
    ("integrated_gradients", "steps", 5000, ValueError, r"steps=5000: must be within"),
    ("integrated_gradients", "steps", 2.5, TypeError, r"steps=2.5: expected an integer or 'auto'"),
    ("integrated_gradients", "steps", "many", TypeError, r"steps='many'"),
    ("integrated_gradients", "tolerance", 0.0, ValueError, r"tolerance=0.0: must be within"),
    ("integrated_gradients", "baseline", "blak", ValueError, r"'baseline'.*'blak'.*Did you mean: 'black'"),
    ("integrated_gradients", "rule", "trapezoid", ValueError, r"'rule'.*'riemann_trapezoid'"),
    ("smoothgrad", "noise", 1.5, ValueError, r"noise=1.5: must be within \[0.0, 1.0\]"),
    ("smoothgrad", "noise", float("nan"), ValueError, r"noise=nan"),
    ("smoothgrad", "samples", 0, ValueError, r"samples=0"),
    ("smoothgrad", "samples", True, TypeError, r"samples=True: expected an integer"),
    ("smoothgrad", "base", "gradcam", ValueError, r"'base'.*'gradcam'"),
    ("vargrad", "seed", -1, ValueError, r"seed=-1"),
    ("occlusion", "patch", 0, ValueError, r"patch=0"),
    ("occlusion", "fill", "grey", ValueError, r"'fill'.*'grey'"),
    ("attention_rollout", "discard_ratio", 1.0, ValueError, r"discard_ratio=1.0"),
])
def test_parameter_out_of_range(cnn, vit, method, param, value, exc, pattern):
    model = vit if method.startswith("attention") else cnn
    with pytest.raises(exc, match=pattern):
        nbx.attribute(model, X, method, **{param: value})


def test_trapezoid_needs_two_steps(cnn):
    with pytest.raises(ValueError, match="riemann_trapezoid.*steps >= 2"):
        nbx.attribute(cnn, X, "integrated_gradients", rule="riemann_trapezoid", steps=1)


def test_tensor_baseline_of_the_wrong_shape(cnn):
    with pytest.raises(ValueError, match=r"baseline: a tensor baseline must broadcast to the input"):
        nbx.attribute(cnn, X, "integrated_gradients", steps=2, baseline=torch.zeros(2, 3, 5, 5))
    with pytest.raises(TypeError, match="a tensor is not accepted"):
        nbx.attribute(cnn, X, "occlusion", fill=torch.zeros(3, 64, 64))


def test_a_tensor_baseline_must_be_finite_and_real_and_numpy_values_are_accepted(cnn):
    with pytest.raises(ValueError, match=r"baseline: a tensor baseline must hold finite values \(got NaN or Inf\)"):
        nbx.attribute(cnn, X, "integrated_gradients", steps=2, baseline=torch.full((1, 3, 1, 1), float("nan")))
    with pytest.raises(ValueError, match=r"baseline: a tensor baseline must hold real numbers"):
        nbx.attribute(cnn, X, "integrated_gradients", steps=2, baseline=torch.zeros(3, 1, 1, dtype=torch.complex64))
    zeros = nbx.attribute(cnn, X, "integrated_gradients", steps=4, baseline="zeros").raw
    torch.testing.assert_close(nbx.attribute(cnn, X, "integrated_gradients", steps=4,
                                             baseline=torch.zeros(3, 1, 1, dtype=torch.long)).raw, zeros)
    ref = nbx.attribute(cnn, X, "integrated_gradients", steps=4, baseline=torch.full((3, 1, 1), 0.5)).raw
    got = nbx.attribute(cnn, X, "integrated_gradients", steps=np.int64(4), baseline=np.full((3, 1, 1), 0.5, np.float32)).raw
    torch.testing.assert_close(got, ref)


def test_occlusion_stride_larger_than_patch(cnn):
    with pytest.raises(ValueError, match=r"occlusion: stride=16 > patch=8"):
        nbx.attribute(cnn, X, "occlusion", patch=8, stride=16)
    # one window over the whole input gives every pixel the same drop: a uniform map that localises nothing
    side = X.shape[-1]
    with pytest.raises(ValueError, match=rf"occlusion: patch={side} covers the whole {side}x{side} model input "
                                         rf"in one window.*patch={side // 4}"):
        nbx.attribute(cnn, X, "occlusion", patch=side, stride=side)


@pytest.mark.parametrize("block,head,pattern", [(6, -1, r"block=6 out of range.*6 blocks"),
                                                (-7, -1, r"block=-7 out of range"),
                                                (0, 2, r"head=2 out of range.*2 heads"),
                                                # beyond the widget slider's range: still the model's counts
                                                (99, -1, r"block=99 out of range.*6 blocks"),
                                                (-99, -1, r"block=-99 out of range.*6 blocks"),
                                                (0, 99, r"head=99 out of range.*2 heads"),
                                                (0, -5, r"head=-5 out of range.*2 heads.*-1 to fuse")])
def test_attention_block_and_head_out_of_range(vit, block, head, pattern):
    with pytest.raises(ValueError, match=pattern):
        nbx.attribute(vit, X, "attention", block=block, head=head)


# ---------------------------------------------------------------------------------- image inputs


def _gradient_rgb(h=48, w=80):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA", "La", "F", "1"])
def test_pil_modes_are_accepted(cnn, mode):
    rgb = Image.fromarray(_gradient_rgb())
    if mode == "I;16":
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    elif mode == "F":
        img = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) / 255.0, "F")
    else:
        img = rgb.convert(mode)
    assert img.mode == mode
    out = nbx.attribute(cnn, img, "saliency")
    assert out.map.shape == (48, 80)                     # the original image's (H, W)
    assert np.isfinite(out.map).all() and out.map.max() == pytest.approx(1.0)
    assert out.image.shape == (48, 80, 3) and out.image.dtype == np.uint8


def test_sixteen_bit_image_is_rescaled_not_clipped(cnn):
    img = Image.fromarray(np.full((32, 32), 40000, np.uint16))
    assert img.mode == "I;16"
    out = nbx.attribute(cnn, img, "saliency")
    assert abs(int(out.image[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1   # not clipped at 255


def test_transparent_pixels_are_shown_on_white(cnn):
    a = np.zeros((32, 32, 4), np.uint8)
    a[..., 0] = 200
    a[:16, :, 3] = 255                                      # top half opaque red, bottom transparent
    out = nbx.attribute(cnn, Image.fromarray(a, "RGBA"), "saliency")
    assert tuple(out.image[0, 0]) == (200, 0, 0)
    assert tuple(out.image[-1, -1]) == (255, 255, 255)


class TopLeft(nn.Module):
    """A 'classifier' whose class 0 is the sum of the top-left quarter of its input."""

    def forward(self, x):
        h, w = x.shape[2] // 2, x.shape[3] // 2
        s = x[:, :, :h, :w].sum((1, 2, 3))
        return torch.stack([s, -s], 1)


@pytest.mark.parametrize("as_path", [False, True])
def test_exif_rotated_jpeg_follows_the_rotation(tmp_path, as_path):
    raw = Image.fromarray(_gradient_rgb(40, 64))            # stored 64 wide x 40 high
    exif = Image.Exif()
    exif[0x0112] = 6                                         # Orientation: rotate 90° CW to display
    buf = io.BytesIO()
    raw.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buf.getvalue())
    img = str(path) if as_path else Image.open(io.BytesIO(buf.getvalue()))
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert shown.shape == (64, 40, 3)                        # displayed 40 wide x 64 high

    pre = nbx.Preprocess(size=32, crop_pct=1.0, crop_mode="squash", interpolation="bilinear")
    out = nbx.attribute(TopLeft(), img, "saliency", target=0, preprocess=pre)
    assert out.map.shape == (64, 40)
    np.testing.assert_array_equal(out.image, shown)
    # the map's hot quarter is the top-left of the image as displayed
    assert out.map[:28, :16].min() > 0.5
    assert out.map[36:, :].max() == 0 and out.map[:, 24:].max() == 0


def test_uint8_and_float_arrays_give_the_same_map(cnn):
    a = _gradient_rgb(40, 56)
    u = nbx.attribute(cnn, a, "saliency")
    f = nbx.attribute(cnn, a.astype(np.float32) / 255.0, "saliency")
    f64 = nbx.attribute(cnn, a.astype(np.float64) / 255.0, "saliency")
    assert u.map.shape == (40, 56)
    np.testing.assert_array_equal(u.map, f.map)
    np.testing.assert_array_equal(u.map, f64.map)
    g = nbx.attribute(cnn, a[..., 0], "saliency")            # a 2-D (grey) array
    assert g.map.shape == (40, 56)


@pytest.mark.parametrize("bad", [2.0, -0.5, 255.0])
def test_float_array_out_of_range(cnn, bad):
    a = np.full((16, 16, 3), 0.5, np.float32)
    a[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"image: float arrays must hold pixels in \[0, 1\]"):
        nbx.attribute(cnn, a, "saliency")


@pytest.mark.parametrize("mode", ["F", "I"])
def test_negative_float_and_int_pictures_are_refused_not_clipped(cnn, mode):
    """As float arrays outside [0, 1] are: an F image of normalised data lost its lower half to black."""
    a = np.linspace(-1, 1, 32 * 32).reshape(32, 32)
    img = Image.fromarray(a.astype(np.float32) if mode == "F" else (a * 200).astype(np.int32), mode)
    with pytest.raises(ValueError, match=rf"image: the {mode}-mode picture holds negative values \(-.*\); "
                                         r"pixels run 0\.\.1, 0\.\.255 or 0\.\.65535"):
        nbx.attribute(cnn, img, "saliency")


def test_array_layout_and_dtype_errors(cnn):
    with pytest.raises(ValueError, match="looks channels-first"):
        nbx.attribute(cnn, np.zeros((3, 20, 20), np.uint8), "saliency")
    with pytest.raises(TypeError, match="unsupported array dtype int64"):
        nbx.attribute(cnn, np.zeros((20, 20, 3), np.int64), "saliency")
    with pytest.raises(ValueError, match=r"expected an HxW or HxWx3/4 array"):
        nbx.attribute(cnn, np.zeros((20, 20, 2), np.uint8), "saliency")
    with pytest.raises(FileNotFoundError, match="image: no file at"):
        nbx.attribute(cnn, "/nonexistent/picture.png", "saliency")


def test_a_meta_tensor_input_is_refused_by_name(cnn):
    with pytest.raises(ValueError, match=r"images: the tensor is on the meta device, so it holds no values"):
        nbx.attribute(cnn, torch.empty(1, 3, 64, 64, device="meta"), "saliency")


def test_a_file_that_is_no_picture_or_a_truncated_one_is_named(cnn, tmp_path):
    """A truncated PNG raised PIL's 'image file is truncated', naming neither the file nor a fix."""
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(buf, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    for path in (cut, text):
        with pytest.raises(ValueError, match=rf"image: '.*{path.name}' could not be read as a picture.*check the file"):
            nbx.attribute(cnn, path, "saliency")
    with pytest.raises(TypeError, match="image: expected a path"):
        nbx.attribute(cnn, {"not": "an image"}, "saliency")


def test_model_without_preprocessing_needs_one_for_pil_input():
    with pytest.raises(ValueError, match="preprocess"):
        nbx.attribute(TopLeft(), Image.fromarray(_gradient_rgb()), "saliency", target=0)


def test_a_tensor_the_model_cannot_take_keeps_the_models_error_with_the_fix_added():
    """A ViT's patches must divide the input: a tensor reaches the model as it is, so its own assertion
    stays (type and message), with a note saying how to have the input resized; the model is unchanged."""
    from nbexplain.hygiene import hook_count
    vit = make_model("vit")
    side = vit.patch_embed.patch_size[0]
    for method in ("gradcam", "saliency"):
        with pytest.raises(AssertionError, match="divisible") as caught:
            nbx.attribute(vit, torch.randn(1, 3, side * 4 + 3, side * 4), method)
        notes = " ".join(getattr(caught.value, "__notes__", []))
        assert "(1, 3, " in notes and "A tensor reaches the model as it is" in notes, method
    assert hook_count(vit) == 0 and not vit.training


def test_a_model_built_for_another_size_is_told_to_pass_its_preprocess():
    """timm keeps a model's default data config when it is built with another img_size (LeViT, MaxViT,
    EfficientFormerV2): a picture is resized to that default and fails deep inside timm."""
    import timm
    model = timm.create_model("levit_128s", num_classes=3, img_size=96).eval()
    picture = Image.fromarray(_gradient_rgb())
    with pytest.raises(RuntimeError) as caught:
        nbx.attribute(model, picture, "saliency")
    notes = " ".join(getattr(caught.value, "__notes__", []))
    assert "img_size" in notes and "preprocess=nbx.Preprocess(size=(H, W)" in notes
    fixed = nbx.attribute(model, picture, "saliency", preprocess=nbx.Preprocess(size=96, crop_pct=1.0))
    assert fixed.map.shape == np.asarray(picture).shape[:2]
    with pytest.raises(RuntimeError) as caught:          # the layer list, without an image, reads the same config
        nbx.layers(model)
    assert "preprocess=nbx.Preprocess(size=(H, W)" in " ".join(getattr(caught.value, "__notes__", []))

    class BareAssert(nn.Module):                          # timm's BottleneckAttn asserts shapes with no message
        def forward(self, x):
            if x.shape[-1] != 96:
                raise AssertionError          # a bare assert (pytest would rewrite one written here)
            return x.mean((2, 3))
    with pytest.raises(AssertionError) as caught:
        nbx.attribute(BareAssert(), torch.randn(3, 64, 64), "saliency", target=0)
    assert "pass one of a size the model accepts" in " ".join(getattr(caught.value, "__notes__", []))


def test_a_class_name_shared_by_several_classes_is_refused(cnn):
    """ImageNet's 'crane' is a bird (134) and a machine (517): picking the first silently was wrong."""
    with pytest.raises(ValueError, match=r"target='crane' names 2 classes: 134 \('crane'\), 517 \('crane'\); pass"):
        nbx.attribute(cnn, X, "saliency", target="crane")
    assert nbx.attribute(cnn, X, "saliency", target="Goldfish ").target == 1     # a unique name still works


@pytest.mark.parametrize("kw,pattern", [
    (dict(size=0), r"Preprocess\(size=0\): the model input's side"),
    (dict(size=-3), r"Preprocess\(size=-3\)"),
    (dict(size=(32,)), r"Preprocess\(size=\(32,\)\)"),
    (dict(size=100000), r"Preprocess\(size=100000\).*from 1 to 8192"),
    (dict(size=(32.5, 32)), r"Preprocess\(size=\(32\.5, 32\)\)"),
    (dict(crop_pct=0), r"Preprocess\(crop_pct=0\): the crop's share"),
    (dict(crop_pct=float("nan")), r"Preprocess\(crop_pct=nan\)"),
    (dict(crop_pct="0.9"), r"Preprocess\(crop_pct='0\.9'\)")])
def test_preprocess_settings_are_checked_when_made(kw, pattern):
    """They failed later: ZeroDivisionError, PIL's 'height and width must be > 0', or out of memory."""
    with pytest.raises(ValueError, match=pattern):
        nbx.Preprocess(**kw)
    assert nbx.Preprocess(size=(48, 64), crop_pct=1.15).size == (48, 64)      # VOLO's crop_pct pads


def test_labels_may_be_an_index_to_name_dict_but_not_hold_gaps(cnn):
    """A dict's keys became the names ("0", "1", ...), and None entries the name "None"."""
    names = {i: f"class {i}" for i in range(1000)}
    assert nbx.attribute(cnn, X, "saliency", target=3, labels=names).label == "class 3"
    with pytest.raises(ValueError, match=r"labels: a dict must map every class index 0\.\.n-1"):
        nbx.attribute(cnn, X, "saliency", labels={1: "a", 2: "b"})
    with pytest.raises(ValueError, match=r"labels: class 1 has no name \(None\)"):
        nbx.attribute(cnn, X, "saliency", labels=["a", None] + ["c"] * 998)


def test_a_preprocessing_with_the_wrong_channel_count_says_how_many_the_model_takes(cnn):
    """It got the note about input sizes, which sent the user looking in the wrong place."""
    gray = nbx.Preprocess(size=64, mean=(0.5,), std=(0.25,))
    plain = Outputs(cnn, lambda o: o).eval()                       # a bare module: the preprocessing is ours
    with pytest.raises(RuntimeError) as err:
        nbx.attribute(plain, np.full((64, 64, 3), 100, np.uint8), "saliency", preprocess=gray)
    note = " ".join(getattr(err.value, "__notes__", []))
    assert "first layer takes 3 channels and the input has 1" in note and "size" not in note.split(".")[0]


def test_explain_batch_checks_true_labels_and_takes_class_names(cnn):
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    pre = nbx.Preprocess(size=(64, 64))
    with pytest.raises(ValueError, match=r"true_labels\[1\]=99999 is out of range: the model has \d+ classes"):
        nbx.explain_batch(cnn, images, "saliency", true_labels=[1, 99999], preprocess=pre)
    with pytest.raises(ValueError, match=r"true_labels\[1\]='no such thing': no class of that name"):
        nbx.explain_batch(cnn, images, "saliency", true_labels=["tabby", "no such thing"], preprocess=pre)
    with torch.no_grad():
        labels = [f"kind {i}" for i in range(cnn(images[0][None]).shape[1])]
    result = nbx.explain_batch(cnn, images, "saliency", true_labels=["kind 7", torch.tensor(3)], preprocess=pre,
                               labels=labels)
    assert [item.true_label for item in result.items] == [7, 3]


def test_a_dynamically_quantized_model_gets_forward_methods_and_a_clear_error_for_gradients():
    """Its state dict holds a dtype and packed tensors beside tensors (the digest raised AttributeError), and
    a quantized layer passes no gradient (torch's 'not used in the graph')."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    with warnings.catch_warnings():                    # torch deprecates eager-mode quantization
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(net, {nn.Linear})
    x = torch.randn(3, 32, 32)
    digests = {nbx.attribute(quantized, x, m).meta["weights_sha256"] for m in ("occlusion", "scorecam")}
    assert len(digests) == 1
    with torch.no_grad(), warnings.catch_warnings():   # another quantized weight: another digest
        warnings.simplefilter("ignore")
        other = torch.ao.quantization.quantize_dynamic(net, {nn.Linear})
        net[4].weight.mul_(2)
        changed = torch.ao.quantization.quantize_dynamic(net, {nn.Linear})
    assert nbx.attribute(other, x, "occlusion").meta["weights_sha256"] in digests
    assert nbx.attribute(changed, x, "occlusion").meta["weights_sha256"] not in digests
    for method in ("saliency", "integrated_gradients"):
        with pytest.raises(ValueError, match="'occlusion'"):
            nbx.attribute(quantized, x, method, baseline="zeros") if method == "integrated_gradients" else \
                nbx.attribute(quantized, x, method)


# ------------------------------------------------------------------------------- a user's slips


def test_an_own_method_that_returns_the_wrong_thing_or_registers_badly_is_named(cnn):
    from nbexplain.methods import REGISTRY, Param, register
    returns = {"nothing": (lambda ctx: None, TypeError, "returned NoneType"),
               "numpy": (lambda ctx: ctx.x.numpy(), TypeError, "returned ndarray"),
               "unbatched": (lambda ctx: ctx.x[0], ValueError, r"returned shape \(3, 64, 64\)")}
    try:
        for name, (fn, error, match) in returns.items():
            register(f"slip_{name}", kind="pixel", signed=False, summary="-")(fn)
            with pytest.raises(error, match=match):
                nbx.attribute(cnn, X, f"slip_{name}")
        register("slip_nan", kind="pixel", signed=True, summary="-")(lambda ctx: ctx.x * torch.nan)
        with pytest.warns(UserWarning, match="NaN or infinite"):
            out = nbx.attribute(cnn, X, "slip_nan")
        assert np.isfinite(out.map).all() and not out.raw.isnan().any()
    finally:
        for name in (*returns, "nan"):
            REGISTRY.pop(f"slip_{name}", None)
    for spec, match in ((dict(kind="bogus"), "kind='bogus'"), (dict(kind="pixel", params=(1,)), "Param"),
                        (dict(kind="pixel", reduce="max"), "reduce='max'")):
        with pytest.raises((TypeError, ValueError), match=match):
            register("slip_spec", signed=False, summary="-", **spec)(lambda ctx: ctx.x)
        assert "slip_spec" not in REGISTRY
    with pytest.raises(TypeError, match="decorates a function"):
        register("slip_spec", kind="pixel", signed=False, summary="-")(5)
    assert Param("p", "int", 1, "-") is not None


def test_inputs_without_dense_values_and_bad_normalisation_are_refused_by_name(cnn):
    with pytest.raises(ValueError, match="to_dense"):
        nbx.attribute(cnn, X[None].to_sparse(), "saliency")
    with pytest.raises(ValueError, match="meta device"):
        nbx.attribute(cnn, X, "integrated_gradients", baseline=torch.zeros(1, 3, 64, 64, device="meta"))
    for kw in (dict(mean=(float("nan"),) * 3), dict(std=(1.0, float("inf"), 1.0)), dict(std=()),
               dict(mean="abc")):
        with pytest.raises(ValueError, match="one finite number per input channel"):
            nbx.Preprocess(**kw)
    with pytest.raises(FileNotFoundError, match="download the picture first"):
        nbx.attribute(cnn, "https://example.org/cat.png", "saliency")
    with pytest.raises(ValueError, match="max_side=0"):
        nbx.attribute(cnn, X, "saliency").downsized(0)


def test_replay_names_the_callers_slip_and_a_corrupt_field(cnn, tmp_path):
    exp = nbx.attribute(cnn, X, "integrated_gradients", steps=4, baseline=torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pass a tensor"):       # the caller's argument, not the export
        nbx.replay(exp.to_json(), cnn, baseline="black")
    doc = json.loads(exp.to_json())
    doc["versions"] = "1.0"
    with pytest.raises(ValueError, match="versions field is corrupt"):
        nbx.replay(doc, cnn)
    with pytest.raises(ValueError, match="neither JSON text nor the path"):
        nbx.replay(str(tmp_path / "cat.jpg"), cnn)


def test_a_misspelt_explorer_control_or_a_label_per_image_missing_is_named(cnn):
    w = nbx.explain(cnn, [X, X.flip(2)])
    try:
        with pytest.raises(AttributeError, match="Did you mean: 'steps'"):
            w.stpes = 8
        w.steps = 8                                          # controls, and the widget's own attributes, still set
        w.layout.width = "500px"
        assert w.view.steps == 8
    finally:
        w.close()
    for labels in (["one"], ["a", "b", "c"], "ab"):
        with pytest.raises(ValueError, match="image_labels"):
            nbx.explain(cnn, [X, X.flip(2)], image_labels=labels)


def test_a_weights_file_that_is_no_state_dict_or_does_not_fit_is_named(tmp_path):
    import timm
    model = timm.create_model("resnet18", num_classes=10)
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save(model.state_dict(), tmp_path / "ten.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    for name in ("text.pt", "empty.safetensors"):
        with pytest.raises(ValueError, match="could not be read as a state dict"):
            nbx.load_model("resnet18", weights=tmp_path / name)
    with pytest.raises(ValueError, match="num_classes"):
        nbx.load_model("resnet18", weights=tmp_path / "ten.pt")
    loaded = nbx.load_model("resnet18", weights=tmp_path / "ddp.pt", num_classes=10)   # DDP's prefix dropped
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_an_index_error_from_a_model_built_for_another_size_carries_the_size_note():
    """MViTv2 built at img_size=64 and given 224 px indexes its relative-position table out of bounds."""
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.table = nn.Conv2d(3, 4, 8, stride=8), nn.Parameter(torch.randn(8, 4))

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)) + self.table[torch.arange(y.shape[-1])].sum(0)

    with pytest.raises(IndexError) as caught:
        nbx.attribute(Table().eval(), torch.randn(3, 96, 96), "saliency")
    assert any("built for another" in note or "img_size" in note for note in getattr(caught.value, "__notes__", []))
