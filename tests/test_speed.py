"""The fast paths: channels-last inputs for CNNs and no autograd graph where no gradient is needed,
never at the cost of a different answer."""
from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from torch import nn

import nbexplain as nbx
from nbexplain import allocator, context
from nbexplain.hygiene import borrowed, hook_count
from nbexplain.speed import input_format, plan
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


# --- BatchNorm folding -------------------------------------------------------------------------------
class ConvOutputReadTwice(nn.Module):
    """A conv whose output feeds its BN *and* a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu(self.bn(y)) + y
        return self.head(self.bn2(self.conv2(z)).mean((2, 3)))


def batch_norm_calls(monkeypatch) -> list[int]:
    """The batch size of every F.batch_norm call from now on."""
    import torch.nn.functional as F
    sizes, real = [], F.batch_norm
    monkeypatch.setattr(F, "batch_norm", lambda x, *a, **k: sizes.append(len(x)) or real(x, *a, **k))
    return sizes


def test_batched_passes_fold_batchnorm_into_the_convs_with_the_same_results(zoo, monkeypatch):
    for arch in ("resnet", "efficientnet"):
        model, x = zoo(arch), make_input()
        with borrowed(model):
            pairs = plan(model, x).pairs
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(pairs) == len(bns), arch            # every BN of these nets follows its conv
        sizes = batch_norm_calls(monkeypatch)
        ours = nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=8, rule="riemann_right",
                             baseline="zeros")
        assert set(sizes) <= {1}, f"{arch}: the batched passes still ran BatchNorm"
        nbx.attribute(model, x, "saliency", target=TARGET)
        assert 1 in sizes, f"{arch}: a one-sample pass is not folded"    # and the spy sees BatchNorm
        ref = IntegratedGradients(model).attribute(x.clone(), target=TARGET, n_steps=8, method="riemann_right")
        assert_close(ours[0].raw, ref)
        monkeypatch.undo()


def test_folding_reads_the_weights_of_each_call():
    """Training between calls through ``p.data`` bumps no version counter: a cached fold would be stale."""
    model, x = make_model("resnet"), make_input(2)
    nbx.attribute(model, x, "saliency", target=TARGET)           # batch 2: a folded pass
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.data.mul_(3.0)
                m.weight.data.add_(0.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.data.mul_(-1.0)
    ours = nbx.attribute(model, x, "saliency", target=TARGET)
    ref = Saliency(model).attribute(x.clone(), target=TARGET, abs=False)
    assert_close(torch.cat([a.raw for a in ours]), ref)


def test_a_conv_output_that_feeds_more_than_its_batchnorm_is_not_folded():
    model, x = ConvOutputReadTwice().eval(), make_input(2)
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn2.running_mean.normal_(0, 0.3)
    with borrowed(model):
        pairs = plan(model, x).pairs
    assert pairs == ()        # the folded logits differ, so no pair of this model is folded
    ours = nbx.attribute(model, x, "saliency", target=3)
    ref = Saliency(model).attribute(x.clone(), target=3, abs=False)
    assert_close(torch.cat([a.raw for a in ours]), ref)


def test_a_hook_on_every_module_turns_every_fast_path_off():
    """A global hook sees every module: a folded BatchNorm passing its input on, or a ViT's last block
    leaving all but the class token as they came in, would show it something the model does not compute."""
    cnn, vit, x = make_model("resnet"), make_model("vit"), make_input(2)
    last_block = [m for m in vit.modules() if type(m).__name__ == "Block"][-1]
    passed_on = []

    def record(m, inp, out):
        batched = isinstance(out, torch.Tensor) and len(out) > 1 and torch.is_grad_enabled()
        if batched and isinstance(m, nn.BatchNorm2d):
            passed_on.append(torch.equal(out, inp[0]))
        if batched and m is last_block:
            passed_on.append(torch.equal(out[:, 1:], inp[0][:, 1:]))

    handle = nn.modules.module.register_module_forward_hook(record)
    try:
        for m in (cnn, vit):
            nbx.attribute(m, x, "integrated_gradients", target=TARGET, steps=4, baseline="zeros")
    finally:
        handle.remove()
    assert passed_on and not any(passed_on)


def test_a_hooked_conv_is_not_folded_and_every_module_is_restored(zoo):
    """The user's hook on a conv sees the conv's own output; after the call (even one that fails
    mid-pass) every conv has its own parameters back and no BN keeps a replaced forward."""
    model, x = make_model("resnet"), make_input(2)
    seen = []
    stem = model.conv1[0]                                    # a conv whose output feeds a BN
    handle = stem.register_forward_hook(lambda m, i, o: seen.append((i[0].detach().clone(), o.detach().clone())))
    params = {n: p for n, p in model.named_parameters()}
    try:
        nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=4)
        batched = [(i, o) for i, o in seen if len(i) > 1]
        assert batched
        with torch.no_grad():
            for i, o in batched:
                assert_close(o, nn.functional.conv2d(i, stem.weight, None, 2, 1))
    finally:
        handle.remove()

    def fail_in_batched_passes(_m, args):
        if len(args[0]) > 1:
            raise RuntimeError("boom")
    h2 = model.fc.register_forward_pre_hook(fail_in_batched_passes)
    try:
        try:
            nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=4)
        except RuntimeError as e:
            assert "boom" in str(e)
        else:
            raise AssertionError("the hook's error was swallowed")
    finally:
        h2.remove()
    assert {n: p for n, p in model.named_parameters()} == params
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items())
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert hook_count(model) == 0


def test_folding_is_exact_in_float64():
    """In float64 the folded passes match captum to the float32 the maps are returned in: the fold is
    the same function, not an approximation hidden by a loose tolerance (in float32 the same nets differ
    by up to 1e-3 from roundoff alone, which ReLU boundaries amplify)."""
    model, x = make_model("resnet").double(), make_input(2).double()
    with borrowed(model):
        assert plan(model, x).pairs
    ours = torch.cat([a.raw.double() for a in nbx.attribute(model, x, "saliency", target=TARGET)])
    ref = Saliency(model).attribute(x.clone(), target=TARGET, abs=False)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=2e-7, atol=1e-7 * float(ref.abs().max()))


def test_folded_weights_compute_conv_then_batchnorm_for_any_mix_of_dtypes_and_affine_terms():
    """All pairs are folded together (one fused op per step); each pair's own dtypes and missing terms (a
    conv bias, a BN without affine weights, half-precision weights or statistics) still give conv -> BN, and
    a BN that lost its statistics is skipped."""
    from nbexplain.folding import folded_weights
    torch.manual_seed(0)
    pairs = []
    for conv_dtype, bn_dtype, bias, affine in ((torch.float32, torch.float32, True, False),
                                               (torch.bfloat16, torch.float32, False, True),
                                               (torch.float32, torch.bfloat16, False, True),
                                               (torch.float64, torch.float64, True, True)):
        conv, bn = nn.Conv2d(3, 4, 3, bias=bias).to(conv_dtype), nn.BatchNorm2d(4, affine=affine).eval()
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.data.normal_(), bn.bias.data.normal_()
        pairs.append((conv, bn.to(bn_dtype)))
    gone = nn.BatchNorm2d(4, track_running_stats=False).eval()
    pairs.append((nn.Conv2d(3, 4, 3), gone))
    folded = folded_weights(pairs)
    assert folded[-1] is None
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for (conv, bn), (w, b) in zip(pairs[:-1], folded[:-1]):
        assert w.dtype == b.dtype == conv.weight.dtype
        half = torch.bfloat16 in (w.dtype, bn.running_var.dtype)
        tol = 1e-12 if conv.weight.dtype == torch.float64 else 3e-2 if half else 1e-6
        with torch.no_grad():
            ref = bn.double()(conv.double()(x))            # (in place: the pair is not used again)
            got = nn.functional.conv2d(x, w.double(), b.double())
        assert_close(got, ref, rtol=tol, atol_frac=tol)


def test_a_model_edited_after_the_probe_is_folded_as_it_is_now():
    """Replacing a BN (say, by Identity) or dropping its running statistics after a call must not leave
    the old BN's statistics folded into its conv."""
    model, x = make_model("resnet"), make_input(2)
    nbx.attribute(model, x, "saliency", target=TARGET)                # probed and folded once
    model.bn1 = nn.Identity()
    block = model.layer1[0]
    block.bn1.track_running_stats, block.bn1.running_mean, block.bn1.running_var = False, None, None
    ours = nbx.attribute(model, x, "saliency", target=TARGET)
    ref = Saliency(model).attribute(x.clone(), target=TARGET, abs=False)
    assert_close(torch.cat([a.raw for a in ours]), ref)


def test_the_probe_costs_two_forwards_when_both_paths_hold():
    """A cold call (the explorer's first map) pays for the probe: both paths are tried together first."""
    model, x = make_model("resnet"), make_input()
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    try:
        with borrowed(model):
            chosen = plan(model, x)
    finally:
        handle.remove()
    assert chosen.memory_format == torch.channels_last and chosen.pairs
    assert calls == [1, 1]


def test_a_one_sample_method_on_a_fresh_model_runs_no_probe():
    """The probe (two forwards) pays off over batched work; a first saliency call is one forward+backward,
    as with captum, and a later batched call still probes and folds."""
    for arch in ("resnet", "efficientnet"):
        model, x = make_model(arch), make_input()
        calls = []
        handle = model.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
        try:
            nbx.attribute(model, x, "saliency", target=TARGET)
            assert calls == [1], (arch, calls)
            calls.clear()
            nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=4, baseline="zeros", batch_size=4)
            assert calls.count(1) >= 2 and 4 in calls, (arch, calls)     # the probe's forwards, then the path
        finally:
            handle.remove()


def test_one_sample_passes_use_channels_last_only_on_nets_with_grouped_convs(zoo):
    """At batch 1, NHWC gains on depthwise nets (EfficientNet) and loses on plain ResNets (resnet18
    3-8%, measured): a one-sample pass of a plain ResNet runs NCHW, a batched one channels-last."""
    for arch, single in (("resnet", torch.contiguous_format), ("efficientnet", torch.channels_last)):
        model, x = zoo(arch), make_input()
        with borrowed(model):
            chosen = plan(model, x)
        assert (chosen.memory_format, chosen.single) == (torch.channels_last, single), arch
        seen = []
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        handle = first.register_forward_pre_hook(
            lambda m, a: seen.append((len(a[0]), a[0].is_contiguous(memory_format=torch.channels_last)
                                      and not a[0].is_contiguous())))
        try:
            nbx.attribute(model, x, "saliency", target=TARGET)
            nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=4)
        finally:
            handle.remove()
        assert (1, single == torch.channels_last) in seen and (4, True) in seen, (arch, seen)


# --- the input stem: a sum of input gradients crosses the first (linear) conv once ------------------
class ReadsItsInputTwice(nn.Module):
    """The logits see the input through the first conv and through a side path: summing gradients at
    the conv's output would miss the side path's share."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3))) + (x * x).mean((1, 2, 3))[:, None]


class ConvTwice(nn.Module):
    """The first conv also runs on its own output: not a function of the input alone at one place."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(torch.relu(self.conv(x)))).mean((2, 3)))


class SquashedConv(nn.Conv2d):
    """A Conv2d subclass that is not affine."""

    def forward(self, x):
        return torch.tanh(super().forward(x))


class SquashedStem(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = SquashedConv(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_the_input_stem_is_the_first_conv_only_when_the_logits_see_the_input_through_it_alone(zoo):
    from nbexplain.stem import input_stem
    x = make_input()
    for arch, name in (("resnet", "conv1.0"), ("efficientnet", "conv_stem"), ("vit", "patch_embed.proj")):
        model = zoo(arch)
        with borrowed(model):
            assert input_stem(model, x) is dict(model.named_modules())[name], arch
    for model in (ReadsItsInputTwice(), ConvTwice(), SquashedStem()):
        with borrowed(model):
            assert input_stem(model.eval(), x) is None, type(model).__name__
        assert not any("forward" in m.__dict__ for m in model.modules()) and hook_count(model) == 0


def test_ig_and_smoothgrad_sum_gradients_before_the_stem_with_the_same_maps(zoo, monkeypatch):
    """IG's weighted path sum and SmoothGrad's mean cross the stem's backward once per chunk, and give the
    maps of one backward per sample (captum's IG; our own per-sample SmoothGrad²'s sibling path)."""
    import nbexplain.stem as stem
    used, real = [], stem.input_gradient_sum
    monkeypatch.setattr(stem, "input_gradient_sum", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr("nbexplain.context.input_gradient_sum", stem.input_gradient_sum)
    for arch in ("resnet", "vit"):
        model, x = zoo(arch), make_input(2)
        used.clear()
        ours = nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=8, baseline="zeros",
                             batch_size=8)
        assert used, f"{arch}: IG did not sum its gradients at the stem"
        ref = IntegratedGradients(model).attribute(x.clone(), target=TARGET, n_steps=8)
        assert_close(torch.cat([a.raw for a in ours]), ref)

        used.clear()
        kw = dict(target=TARGET, samples=6, noise=0.1, seed=5, batch_size=6)
        summed = torch.cat([a.raw for a in nbx.attribute(model, x, "smoothgrad", **kw)])
        assert used, f"{arch}: SmoothGrad did not sum its gradients at the stem"
        monkeypatch.setattr("nbexplain.context.input_stem", lambda *a: None)
        each = torch.cat([a.raw for a in nbx.attribute(model, x, "smoothgrad", **kw)])
        monkeypatch.setattr("nbexplain.context.input_stem", stem.input_stem)
        assert_close(summed, each)


def test_a_model_that_reads_its_input_twice_gets_every_path_of_its_gradient():
    model, x = ReadsItsInputTwice().eval(), make_input(2)
    ours = nbx.attribute(model, x, "integrated_gradients", target=3, steps=8, baseline="zeros")
    ref = IntegratedGradients(model).attribute(x.clone(), target=3, n_steps=8)
    assert_close(torch.cat([a.raw for a in ours]), ref)


# --- a ViT's last block computes only the tokens its head reads ------------------------------------
def _last_mlp_rows(model, images: int, run) -> list[int]:
    """Token rows the last block's MLP saw in each expanded pass of ``run()`` (more samples than the
    ``images`` and IG's baseline, whose first pass also computes the logits at x, so runs whole): a spy in
    place of its forward, not a hook (a hook switches the pruning off)."""
    mlp, rows = model.blocks[-1].mlp, []
    mlp.forward = lambda h: (rows.append(h.shape[1]) if len(h) > 2 * images else None) or type(mlp).forward(mlp, h)
    try:
        run()
    finally:
        del mlp.forward
    return rows


def test_a_vits_last_block_computes_only_the_tokens_its_head_reads_with_the_same_maps():
    """Class-token pooling reads token 0 (and the distillation token): the last block's MLP runs on those
    rows alone, and IG still matches captum's. Average pooling reads every token: nothing is pruned."""
    x = make_input(2)
    for name, kw, keep in (("vit", {}, 1), ("vit", {"reg_tokens": 4}, 1),
                           ("deit_tiny_distilled_patch16_224", {"img_size": 96, "depth": 3}, 2),
                           ("vit", {"global_pool": "avg"}, None)):
        model = make_model(name, **kw)
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        got = []
        rows = _last_mlp_rows(model, len(x), lambda: got.extend(nbx.attribute(
            model, x, "integrated_gradients", target=TARGET, steps=8, baseline="zeros", batch_size=8)))
        assert rows and set(rows) == {keep or tokens}, (name, kw, rows)
        ref = IntegratedGradients(model).attribute(x.clone(), target=TARGET, n_steps=8)
        assert_close(torch.cat([a.raw for a in got]), ref)
        assert not any("forward" in m.__dict__ for m in model.modules()) and hook_count(model) == 0


def test_with_a_hook_after_the_vits_last_attention_its_last_block_runs_whole():
    """A user's hook on the final norm reads every token of the last block's output: it must see what
    the plain model computes there, so with such a hook (or one on the model) nothing is pruned."""
    model, x = make_model("vit"), make_input(1)
    inputs, outputs = [], []
    handles = [model.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone())),
               model.norm.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))]
    try:
        rows = _last_mlp_rows(model, len(x), lambda: nbx.attribute(
            model, x, "integrated_gradients", target=TARGET, steps=4, batch_size=4))
    finally:
        for h in handles:
            h.remove()
    assert set(rows) == {model.patch_embed.num_patches + model.num_prefix_tokens}
    assert len(inputs) == len(outputs) >= 2
    with torch.no_grad():
        for xi, out in zip(inputs, outputs):
            if not torch.isfinite(xi).all():
                continue                      # the stem probe's NaN image
            assert_close(out, model.norm(model.blocks(model._pos_embed(model.patch_embed(xi)))))


def test_one_sample_passes_of_a_vit_prune_its_tail_from_the_second_call_with_the_same_maps():
    """A call's first pass has no logits at x to check the tail against: the second one-sample call at a
    shape checks it with a plain forward of its own, and later calls run the last block's MLP on the class
    token alone, Grad-CAM at the last block's norm1 included (that hook sees every token). A user's hook on
    an earlier block sees the plain model's tensors and keeps the pruning; one on the final norm stops it."""
    model, x = make_model("vit"), make_input(1)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    mlp, rows = model.blocks[-1].mlp, []
    mlp.forward = lambda h: rows.append(h.shape[1]) or type(mlp).forward(mlp, h)
    ref = Saliency(model).attribute(x.clone(), target=TARGET, abs=False)
    try:
        for expected in ([tokens], [tokens, 1, 1], [1]):
            rows.clear()
            got = nbx.attribute(model, x, "saliency", target=TARGET)[0].raw
            assert rows == expected
            assert_close(got, ref)
        nbx.attribute(model, x, "gradcam", target=TARGET)        # a first CAM call finds the default layer
        seen = []
        early = model.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
        rows.clear()
        cam = nbx.attribute(model, x, "gradcam", target=TARGET)[0]
        early.remove()
        assert rows == [1] and cam.meta["layer"] == f"blocks.{len(model.blocks) - 1}.norm1"
        with torch.no_grad():
            assert torch.equal(seen[0], model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x)))))
        rows.clear()
        rollout = nbx.attribute(model, x, "grad_rollout", target=TARGET)[0]       # hooks every attn_drop
        assert rows == [1]
        late = model.norm.register_forward_hook(lambda m, a, out: None)
        rows.clear()
        whole = [nbx.attribute(model, x, method, target=TARGET)[0] for method in ("gradcam", "grad_rollout")]
        late.remove()
        assert rows == [tokens, tokens]
        assert_close(cam.raw, whole[0].raw)
        assert_close(rollout.raw, whole[1].raw)
    finally:
        del mlp.forward
    assert hook_count(model) == 0


def test_the_tail_follows_the_head_and_steps_aside_for_gradient_checkpointing():
    """Pooling set as a plain attribute after a first call means a new check; gradient checkpointing
    recomputes the last block in the backward with its full forward, so it runs whole; PiT's distilled
    head reads two class tokens without declaring a prefix count."""
    from nbexplain.hygiene import borrowed
    from nbexplain.tail import dead_tokens
    x = make_input(1)
    kw = dict(target=TARGET, steps=4, baseline="zeros", batch_size=4)
    model = make_model("vit")
    nbx.attribute(model, x, "integrated_gradients", **kw)                  # checked with token pooling
    model.global_pool = "avg"
    got = nbx.attribute(model, x, "integrated_gradients", **kw)[0].raw
    assert_close(got, IntegratedGradients(model).attribute(x.clone(), target=TARGET, n_steps=4))

    model = make_model("vit")
    model.set_grad_checkpointing(True)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    got = []
    rows = _last_mlp_rows(model, len(x), lambda: got.extend(nbx.attribute(model, x, "integrated_gradients", **kw)))
    assert set(rows) == {tokens}
    assert_close(got[0].raw, IntegratedGradients(model).attribute(x.clone(), target=TARGET, n_steps=4))

    pit, x = make_model("pit_ti_distilled_224"), make_input(1, 224)
    with borrowed(pit), torch.no_grad():
        assert dead_tokens(pit, x, pit(x)).keep == 2


class ChannelsLast(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


def test_with_gradient_checkpointing_no_pass_swaps_weights_or_forwards():
    """A checkpointed segment is recomputed in the backward with the modules as they are then: BatchNorm
    folded for the pass only failed with 'Recomputed values ... have different metadata'."""
    x, kw = make_input(2), dict(target=TARGET, steps=4, baseline="zeros", batch_size=8)
    for arch in ("resnet", "efficientnet"):
        plain = make_model(arch)
        model = make_model(arch)
        model.set_grad_checkpointing(True)
        got = torch.cat([a.raw for a in nbx.attribute(model, x, "integrated_gradients", **kw)])
        # the same sums: channels-last, BatchNorm unfolded (a ReLU net's IG moves ~1% with the layout)
        ref = IntegratedGradients(ChannelsLast(plain)).attribute(x.clone(), target=TARGET, n_steps=4)
        assert_close(got, ref)
        sg = dict(target=TARGET, samples=4, noise=0.1, seed=1, batch_size=8)
        assert_close(torch.cat([a.raw for a in nbx.attribute(model, x, "smoothgrad", **sg)]),
                     torch.cat([a.raw for a in nbx.attribute(plain, x, "smoothgrad", **sg)]))
        # checkpointed stages run their blocks, not the stage module: a stage is read at its last block,
        # so the layer list, the default layer and a stage named by the user are the plain model's
        assert nbx.layers(model) == nbx.layers(plain)
        for layer in (None, nbx.layers(plain)[-1]["name"], nbx.layers(plain)[-2]["name"]):
            cams, ref = (nbx.attribute(m, x, "gradcam", target=TARGET, layer=layer) for m in (model, plain))
            assert cams[0].meta["layer"] == ref[0].meta["layer"]
            assert_close(torch.cat([a.raw for a in cams]), torch.cat([a.raw for a in ref]))
        assert model.grad_checkpointing and hook_count(model) == 0


class Checkpointed(nn.Module):
    """A conv -> BatchNorm -> ReLU segment run through torch.utils.checkpoint in the model's own forward."""

    def __init__(self, reentrant: bool | None = False):
        super().__init__()
        self.reentrant = reentrant           # None: no checkpoint (the reference)
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3)
        self.fc = nn.Linear(16, 10)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def features(self, x):
        return torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))

    def forward(self, x):
        if self.reentrant is None:
            return self.fc(self.features(x).mean((2, 3)))
        segment = torch.utils.checkpoint.checkpoint(self.features, x, use_reentrant=self.reentrant)
        return self.fc(segment.mean((2, 3)))


def test_a_model_that_checkpoints_in_its_own_forward_gets_the_plain_models_maps():
    """torch.utils.checkpoint has no flag to read: its backward recomputed the segment with folded BatchNorm put
    back ('Recomputed values ... have different metadata'). The error tells, and the call runs again unswapped."""
    torch.manual_seed(0)
    plain = Checkpointed(None).eval()
    model = Checkpointed().eval()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    for method, kw in (("saliency", {}), ("integrated_gradients", dict(steps=8, baseline="zeros")),
                       ("smoothgrad", dict(samples=4)), ("gradcam", dict(layer="conv2"))):
        got, ref = (torch.cat([a.raw for a in nbx.attribute(m, x, method, target=2, **kw)]) for m in (model, plain))
        assert_close(got, ref)
    assert hook_count(model) == 0 and not model.training
    reentrant = Checkpointed(True).eval()
    for method, kw in (("saliency", {}), ("integrated_gradients", dict(baseline="zeros")), ("guided_backprop", {})):
        with warnings.catch_warnings(), pytest.raises(ValueError, match="use_reentrant"):
            warnings.simplefilter("ignore")          # torch's own, on inputs that need no gradient
            nbx.attribute(reentrant, x, method, **kw)


def test_a_folded_batchnorm_activation_never_rewrites_the_conv_output():
    """timm's BatchNormAct2d runs its activation in place on its own fresh output; folded, that output is the
    conv's, which CoAtNet's autograd still holds: every batched input gradient failed in the backward."""
    import timm
    model = timm.create_model("coatnet_0_rw_224", num_classes=5, img_size=(64, 96)).eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    got = torch.stack([a.raw[0] for a in nbx.attribute(model, x, "integrated_gradients", steps=4,
                                                          baseline="zeros", target=1)])
    ig = IntegratedGradients(model)
    ref = ig.attribute(x, baselines=torch.zeros_like(x), target=1, n_steps=4, internal_batch_size=8)
    assert_close(got, ref)
    assert any(getattr(m, "inplace", False) for m in model.modules())      # the model's own acts untouched


def _pass_sizes(model, run) -> list[int]:
    """The number of samples in each forward of the model during ``run()``."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    try:
        run()
    finally:
        handle.remove()
    return sizes


def test_integrated_gradients_gets_the_scores_at_x_and_the_baseline_from_one_pass(zoo):
    """f(x) (targets, probabilities) and f(baseline) (the completeness delta) share one forward when the rule
    does not evaluate the baseline itself: two one-sample passes on a small image take PyTorch's slow conv
    path. The trapezoid rule's path holds the baseline, so only x needs a pass of its own."""
    model, x = zoo("resnet"), make_input()
    ig = lambda rule: nbx.attribute(model, x, "integrated_gradients", steps=16, rule=rule,   # noqa: E731
                                    baseline="zeros", batch_size=16)[0]
    ig("gausslegendre")                                  # the fast-path probes run once per shape
    got = {}
    assert _pass_sizes(model, lambda: got.update(gl=ig("gausslegendre"))) == [2, 16]
    assert _pass_sizes(model, lambda: got.update(tr=ig("riemann_trapezoid"))) == [1, 16]
    with torch.no_grad():
        logits = model(x)
    for exp in got.values():
        assert exp.target == int(logits.argmax())
        assert abs(exp.meta["f_x"] - float(logits[0, exp.target])) < 1e-4 * max(1.0, float(logits.abs().max()))
    torch.testing.assert_close(torch.tensor(got["gl"].meta["f_baseline"]), torch.tensor(got["tr"].meta["f_baseline"]),
                               rtol=1e-4, atol=1e-4)


def test_a_plain_resnet_takes_the_fast_paths_only_where_its_activations_outweigh_its_weights(monkeypatch):
    """Folding and channels-last cost in proportion to the weights: at CIFAR size a resnet18's 16-sample pass
    runs the plain model (BatchNorm runs, NCHW input), at 128 px it is folded and channels-last. A net with
    grouped convs gains at any size."""
    for name, size, fast in (("resnet18", 32, False), ("resnet18", 128, True), ("mobilenetv3_small_100", 32, True)):
        model, x = make_model(name, num_classes=10), make_input(1, size)
        sizes = batch_norm_calls(monkeypatch)
        layouts, call = [], context.call      # a spy on the passes' inputs: a hook on a conv would stop its folding
        monkeypatch.setattr(context, "call", lambda m, xs: layouts.append(
            (len(xs), xs.is_contiguous(memory_format=torch.channels_last) and not xs.is_contiguous())) or call(m, xs))
        nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=16, batch_size=16)
        assert (16 in sizes) != fast and (16, fast) in layouts, (name, size, sizes, layouts)
        monkeypatch.undo()


def _page_faults_of_a_fresh_buffer(nbytes: int) -> float:
    """Minor page faults per buffer when buffers of ``nbytes`` are allocated, touched and freed over and over
    (as a model's passes do), once glibc's bins have settled (a few rounds)."""
    import resource
    for _ in range(6):
        torch.ones(nbytes // 4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(nbytes // 4)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4


glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="the buffer reuse is glibc's malloc (Linux)")


def _resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _idle() -> None:
    """Waits until no call is in progress (an earlier test's widget may still be computing in its thread)
    and the memory is handed back (``allocator.IDLE_S`` after the last call)."""
    deadline = time.monotonic() + 60
    while allocator._depth and time.monotonic() < deadline:
        time.sleep(0.05)
    assert allocator._depth == 0, "a call is still in progress"
    trimmer = allocator._trimmer
    if trimmer is not None:
        trimmer.join(10)


@glibc_only
def test_large_cpu_buffers_are_reused_within_and_between_calls_and_handed_back_when_idle(monkeypatch):
    monkeypatch.setattr(allocator, "IDLE_S", 0.05)
    _idle()
    pages = (96 << 20) // 4096                            # a batch of activations, over glibc's 32 MiB
    before = _resident_mib()
    with allocator.reused_memory(torch.device("cpu")):
        inside = _page_faults_of_a_fresh_buffer(96 << 20)
        held = _resident_mib()
    assert inside < pages // 10, "a freed buffer was not reused within the call"
    assert held > before + 90, "the freed buffers were not kept during the call"
    with allocator.reused_memory(torch.device("cpu")):  # the next call, at once: still there to reuse
        import resource
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones((96 << 20) // 4)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start < pages // 10
    _idle()
    assert _resident_mib() < before + 32, "the free memory was not handed back once no call ran"


@glibc_only
def test_overlapping_calls_in_two_threads_restore_the_settings_only_when_both_end(monkeypatch):
    monkeypatch.setattr(allocator, "IDLE_S", 0.05)
    _idle()
    pages = (96 << 20) // 4096
    other_in, release = threading.Event(), threading.Event()

    def other_call():
        with allocator.reused_memory(torch.device("cpu")):
            other_in.set()
            release.wait(30)

    t = threading.Thread(target=other_call)
    t.start()
    try:
        other_in.wait(30)
        with allocator.reused_memory(torch.device("cpu")):
            pass
        during_other = _page_faults_of_a_fresh_buffer(96 << 20)    # this thread's call ended, the other's not
        held = _resident_mib()
    finally:
        release.set()
        t.join(30)
    assert during_other < pages // 10
    _idle()
    assert _resident_mib() < held - 64, "the free memory was not handed back once both calls ended"


@glibc_only
def test_another_threads_chunks_keep_the_largest_activation_within_glibcs_reusable_heaps():
    """Off the main thread glibc maps every buffer over its 64 MiB heaps afresh (faulted in at each pass): the
    widget's thread takes chunks whose largest conv output, measured by the fast-path probe, fits in 56 MiB
    (a power of two); the main thread keeps the default chunk."""
    def in_thread(f):
        t = threading.Thread(target=f)
        t.start()
        t.join(120)

    faults = []

    def fresh_buffers():
        with allocator.reused_memory(torch.device("cpu")):
            faults.append(_page_faults_of_a_fresh_buffer(96 << 20))
    in_thread(fresh_buffers)
    assert faults[0] > (96 << 20) // 4096 // 2                # not reused, though the thresholds are raised

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 8, 3, stride=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    x = make_input(1, 224)                     # 64 x 224 x 224 floats = 12.8 MB a sample: 4 fit in 56 MiB
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    made = []
    try:
        for where, chunk in ((in_thread, 16), (in_thread, 4), (lambda f: f(), 16)):   # the first call probes
            sizes.clear()
            where(lambda: made.append(nbx.attribute(model, x, "integrated_gradients", target=TARGET, steps=16,
                                                    baseline="zeros")[0]))
            assert max(sizes) == chunk, (chunk, sizes)
        sizes.clear()
        again = nbx.replay(made[1].to_json(), model)              # on the main thread, in the export's chunks
        assert max(sizes) == 4 and made[1].meta["batch_size"] == 4 and "batch_size" not in made[2].meta
        np.testing.assert_array_equal(again.map, made[1].map)
    finally:
        handle.remove()


def test_other_devices_and_a_tuned_malloc_are_left_alone(monkeypatch):
    _idle()                                                # no other call's settings or trimmer around
    calls = []

    class Recorder:
        def mallopt(self, *a):
            calls.append(a)
            return 1

        def malloc_trim(self, *a):
            calls.append(a)

    monkeypatch.setattr(allocator, "_glibc", lambda: Recorder())
    with allocator.reused_memory(torch.device("meta")):
        pass
    assert calls == []
    monkeypatch.setattr(allocator, "IDLE_S", 0.05)
    with allocator.reused_memory(torch.device("cpu")):
        assert len(calls) == 2                             # the mmap and trim thresholds raised
    assert len(calls) == 4                                 # both put back
    _idle()
    assert len(calls) == 5 and calls[-1] == (0,)          # the free memory trimmed once idle
    monkeypatch.undo()
    for env in ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
                {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            allocator._glibc.cache_clear()
            assert allocator._glibc() is None, env
    allocator._glibc.cache_clear()


@pytest.mark.parametrize("side", [(96, 96), (97, 90), (33, 47)])
def test_tf_same_depthwise_convs_run_unpadded_with_the_same_output_and_gradient(side):
    from timm.layers import Conv2dSame
    from nbexplain.kernels import _unpadded
    torch.manual_seed(0)
    for k, s in [(3, 1), (3, 2), (5, 2), ((3, 5), (2, 1))]:
        conv = Conv2dSame(12, 12, k, stride=s, groups=12, bias=True).double()
        x = torch.randn(2, 12, *side, dtype=torch.float64, requires_grad=True)
        ref = conv(x)
        (g_ref,) = torch.autograd.grad((ref * ref).sum(), x)
        got = _unpadded(conv)(x)
        (g,) = torch.autograd.grad((got * got).sum(), x)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-12), (k, s, side)
        assert torch.allclose(g, g_ref, atol=1e-12), (k, s, side)


def test_a_tf_same_padded_net_gets_the_same_maps_unpadded_and_its_convs_back(monkeypatch):
    import timm
    from nbexplain import kernels
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=10).eval()
    convs = [m for m, _ in kernels.substitutes(list(model.modules())) if isinstance(m, nn.Conv2d)]
    assert convs, "the net has TF-same depthwise convs"
    x = torch.randn(1, 3, 97, 90)
    methods = [("integrated_gradients", {"steps": 8}), ("saliency", {}), ("occlusion", {"patch": 24, "stride": 24})]
    fast = {m: nbx.attribute(model, x, m, **kw)[0].raw for m, kw in methods}
    swapped = []
    real = kernels._unpadded
    monkeypatch.setattr(kernels, "_unpadded", lambda conv: swapped.append(conv) or real(conv))
    nbx.attribute(model, x, "saliency")
    assert set(swapped) == set(convs)
    assert all("forward" not in c.__dict__ for c in convs)
    monkeypatch.setattr(context, "substitutes", lambda modules: [])
    for m, kw in methods:
        assert_close(nbx.attribute(model, x, m, **kw)[0].raw, fast[m], rtol=1e-5)


def test_nchw_max_pooling_runs_channels_last_with_the_same_maps_and_layout(monkeypatch):
    from nbexplain import kernels
    model = make_model("resnet")
    pools = [m for m, _ in kernels.substitutes(list(model.modules())) if isinstance(m, nn.MaxPool2d)]
    assert pools, "test_resnet has a max-pool stem"
    seen = []
    pools[0].register_forward_hook(lambda mod, inp, out: seen.append((inp[0].is_contiguous(), out.is_contiguous())))
    x = make_input(1, 96)
    methods = [("saliency", {}), ("gradcam", {"layer": "layer2"}), ("integrated_gradients", {"steps": 4})]
    fast = {m: nbx.attribute(model, x, m, target=TARGET, **kw)[0].raw for m, kw in methods}
    assert seen and all(out for inp, out in seen if inp), "an NCHW input must leave the pool as NCHW"
    layouts = []
    real = nn.MaxPool2d.forward
    monkeypatch.setattr(nn.MaxPool2d, "forward", lambda self, t: layouts.append(
        t.is_contiguous(memory_format=torch.channels_last)) or real(self, t))
    nbx.attribute(model, x, "gradcam", target=TARGET, layer="layer2")   # no gradient through the pool
    assert layouts == [True] and all("forward" not in p.__dict__ for p in pools)
    layouts.clear()
    nbx.attribute(model, x, "saliency", target=TARGET)                  # its backward: the plain kernel
    assert layouts == [False]
    monkeypatch.undo()
    monkeypatch.setattr(context, "substitutes", lambda modules: [])
    for m, kw in methods:
        assert torch.equal(nbx.attribute(model, x, m, target=TARGET, **kw)[0].raw, fast[m]), m


class SharedConvOutput(nn.Module):
    """MaxViT's stem in small: a conv whose output feeds its BatchNorm and, unnormalised, a shortcut."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, eps=1e-3)   # fresh statistics
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, eps=1e-3)
        self.shortcut, self.head = nn.Identity(), nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.head(torch.tanh(self.bn2(self.conv2(self.bn(y))) + self.shortcut(y)).mean((2, 3)))


def test_a_conv_output_that_also_feeds_a_shortcut_is_not_folded_even_with_fresh_statistics():
    """A fresh BN is the identity within its eps, so folding it into a conv whose output the shortcut reads
    too moved the logits by 1e-4 of their scale (under the probe's tolerance) and the input gradients by
    1e-3 (MaxViT in random weights). A module that reads the conv output besides its BN rules the pair
    out (the other pairs fold); a function that does (below: the shortcut made a plain sum) shows in the
    probe, whose statistics are moved, and turns folding off."""
    torch.manual_seed(0)
    model = SharedConvOutput().eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    assert plan(model, x).pairs == ((model.conv2, model.bn2),)
    functional = SharedConvOutput().eval()
    functional.forward = lambda t: functional.head(torch.tanh(              # y read by the sum itself
        functional.bn2(functional.conv2(functional.bn(y := functional.conv(t)))) + y).mean((2, 3)))
    assert plan(functional, x).pairs == ()
    twin = SharedConvOutput().double().eval()
    twin.load_state_dict(model.state_dict())
    xi = x.double().requires_grad_()
    ref, = torch.autograd.grad(twin(xi)[:, 1].sum(), xi)
    got = torch.cat([a.raw for a in nbx.attribute(model, x, "saliency", target=1)])
    assert_close(got, ref.float())
    assert model.bn.running_var.eq(1).all() and model.bn.running_mean.eq(0).all()     # the user's, untouched
