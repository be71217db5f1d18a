"""Engine behaviour: batches, targets, map geometry, layer defaults, ViT token layouts, attention."""
from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import nbexplain as nbx
from nbexplain.trust.faithfulness import input_map
from conftest import assert_close, make_input, make_model

METHODS = {m["name"]: m for m in nbx.methods()}
LIGHT = {"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 4}, "smoothgrad_sq": {"samples": 4},
         "vargrad": {"samples": 4}, "occlusion": {"patch": 16, "stride": 16}}


def run(model, images, method, **kw):
    return nbx.attribute(model, images, method, **{**LIGHT.get(method, {}), **kw})


@pytest.fixture(scope="module")
def cnn():
    return make_model("test_resnet")


@pytest.fixture(scope="module")
def vit():
    return make_model("test_vit")            # class token, 'token' pooling, dynamic image size


def reg_vit(**kw):
    """test_vit with 4 register tokens on a non-square 64x96 input (a 4x6 grid)."""
    return make_model("test_vit", reg_tokens=4, img_size=(64, 96), dynamic_img_size=False, **kw)


# --------------------------------------------------------------------------------------- batches


BATCH_METHODS = ["saliency", "gradient_x_input", "guided_backprop", "integrated_gradients", "smoothgrad",
                 "vargrad", "gradcam", "gradcam++", "layercam", "eigencam", "scorecam", "guided_gradcam",
                 "occlusion"]


@pytest.mark.parametrize("method", BATCH_METHODS)
def test_batch_gives_per_image_results_with_per_image_targets(cnn, method):
    x = make_input(3, 64)
    targets = [3, 17, 3]
    outs = run(cnn, x, method, target=targets)
    assert isinstance(outs, list) and len(outs) == 3
    for i, out in enumerate(outs):
        assert out.target == targets[i]
        assert out.raw.shape[0] == 1 and out.map.shape == (64, 64)
        # an image's result does not depend on the other images in its batch
        alone = run(cnn, x[i], method, target=targets[i])
        torch.testing.assert_close(out.raw, alone.raw, rtol=1e-4, atol=1e-5 * float(alone.raw.abs().max()))
    assert not torch.allclose(outs[0].raw, outs[2].raw)     # same target, different images


def test_list_input_gives_a_list_and_tensor_target_works(cnn):
    xs = [make_input(1, 64, seed=s)[0] for s in (1, 2)]
    outs = nbx.attribute(cnn, xs, "saliency", target=torch.tensor([3, 4]))
    assert [o.target for o in outs] == [3, 4]
    single = nbx.attribute(cnn, xs[0], "saliency")
    assert isinstance(single, nbx.Attribution)
    one_batch = nbx.attribute(cnn, xs[0][None], "saliency")
    assert isinstance(one_batch, list) and len(one_batch) == 1


def test_uniform_baseline_does_not_depend_on_the_batch(cnn):
    x = make_input(2, 64)
    both = run(cnn, x, "integrated_gradients", baseline="uniform", seed=4, target=3)
    alone = run(cnn, x[1], "integrated_gradients", baseline="uniform", seed=4, target=3)
    torch.testing.assert_close(both[1].raw, alone.raw, rtol=1e-4, atol=1e-6)


def test_default_target_is_the_prediction_and_probs_are_reported(cnn):
    x = make_input(1, 64)[0]
    out = nbx.attribute(cnn, x, "saliency")
    with torch.no_grad():
        logits = cnn(x[None])[0]
    assert out.target == int(logits.argmax())
    (top, label, p), *_ = out.probs
    assert top == out.target and p == pytest.approx(float(logits.softmax(0).max()), rel=1e-5)
    assert len(out.probs) == 5 and label == out.label


def test_batch_size_changes_nothing_but_the_chunking(cnn):
    x = make_input(2, 64)
    a = run(cnn, x, "integrated_gradients", steps=10, target=3)
    # chunks of 4 (20 samples): every pass takes the fast paths, as the single pass of 20 does; a smaller
    # chunk than the model's Plan.min_batch (3 here) would run the plain model, whose float rounding can
    # flip a ReLU of this random net (0.25% of the map's peak)
    b = run(cnn, x, "integrated_gradients", steps=10, target=3, batch_size=4)
    for u, v in zip(a, b):
        torch.testing.assert_close(u.raw, v.raw, rtol=1e-4, atol=1e-5 * float(u.raw.abs().max()))


def test_progress_reaches_one(cnn):
    seen = []
    nbx.attribute(cnn, make_input(1, 64)[0], "integrated_gradients", steps=8, batch_size=2,
                  progress=seen.append)
    assert seen and seen[-1] == pytest.approx(1.0)
    assert all(0 <= p <= 1 for p in seen) and seen == sorted(seen)


# --------------------------------------------------------------------------------------- targets


def test_target_by_class_name(cnn):
    x = make_input(2, 64)
    out = nbx.attribute(cnn, x[0], "saliency", target="goldfish")
    assert out.target == 1 and "goldfish" in out.label
    by_index = nbx.attribute(cnn, x[0], "saliency", target=1)
    assert torch.equal(out.raw, by_index.raw)
    outs = nbx.attribute(cnn, x, "gradcam", target=["goldfish", "tench"])
    assert [o.target for o in outs] == [1, 0]
    assert out.meta["target"] == 1 and out.meta["label"] == out.label


def test_target_changes_the_map(cnn):
    x = make_input(1, 64)[0]
    a, b = (nbx.attribute(cnn, x, "integrated_gradients", steps=4, target=t) for t in (1, 2))
    assert not torch.allclose(a.raw, b.raw)


# ----------------------------------------------------------------------------------- map geometry


def test_map_matches_the_original_image_for_pil_input(cnn):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (70, 50, 3), dtype=np.uint8))    # 50 wide, 70 high
    out = nbx.attribute(cnn, img, "gradcam")
    assert out.map.shape == (70, 50)
    assert out.image.shape == (70, 50, 3)
    assert out.meta["crop_box"] is not None
    grids = {layer["name"]: tuple(layer["grid"]) for layer in nbx.layers(cnn)}    # at the model's 160 px
    assert out.raw.shape[1:] == grids[out.meta["layer"]]


def test_a_picture_smaller_than_the_input_gets_the_average_of_what_each_pixel_covers(cnn):
    """A saliency map is sparse at the model's resolution; shrunk onto a tiny picture each pixel must
    summarise its area, not copy a point of it (a 1x1 picture's map was then 0)."""
    rng = np.random.default_rng(0)
    for side in (1, 8):
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        out = nbx.attribute(cnn, img, "saliency", target=1)
        full = out.raw.abs().amax(1)[0]                                  # the map at the model's input
        area = torch.nn.functional.adaptive_avg_pool2d(full[None, None], side)[0, 0]
        assert out.map.shape == (side, side) and (out.map != 0).all()
        corr = np.corrcoef(out.map.ravel(), area.numpy().ravel())[0, 1] if side > 1 else 1.0
        assert corr > 0.9


def test_map_matches_the_tensor_for_tensor_input(cnn, vit):
    out = nbx.attribute(cnn, make_input(1, (48, 80))[0], "saliency")
    assert out.map.shape == (48, 80) and out.raw.shape == (1, 3, 48, 80)
    out = nbx.attribute(vit, make_input(1, (32, 80))[0], "gradcam")
    assert out.map.shape == (32, 80) and out.raw.shape == (1, 2, 5)
    assert out.meta["crop_box"] is None


@pytest.mark.filterwarnings("ignore:guided_backprop")
@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_every_method_gives_a_finite_normalised_map(cnn, vit, arch):
    model = cnn if arch == "cnn" else vit
    x = make_input(1, 64)[0]
    for name, spec in METHODS.items():
        if spec["vit_only"] and arch == "cnn":
            continue
        out = run(model, x, name)
        m = out.map
        assert m.shape == (64, 64) and m.dtype == np.float32, name
        assert np.isfinite(m).all(), name
        assert m.min() >= -1 - 1e-6 and m.max() <= 1 + 1e-6, name
        assert np.abs(m).max() == pytest.approx(1.0) or np.abs(m).max() == 0, name
        if not out.signed:
            assert m.min() >= 0, name
        assert out.meta["method"] == name and np.isfinite(out.raw.numpy()).all(), name


# ------------------------------------------------------------------------------------ layer choice


def test_default_layer_on_a_cnn(cnn):
    out = nbx.attribute(cnn, make_input(1, 96)[0], "gradcam")
    layers = {layer["name"]: layer for layer in nbx.layers(cnn, make_input(1, 96))}
    assert out.meta["layer"] == "layer2"             # the last stage whose grid is still >= 7 (12x12)
    assert min(layers["layer2"]["grid"]) >= 7 and min(layers["layer3"]["grid"]) < 7
    assert out.raw.shape == (1, 12, 12)
    big = nbx.attribute(cnn, make_input(1, 224)[0], "gradcam")
    assert big.meta["layer"] == "layer4" and big.raw.shape == (1, 7, 7)


def test_default_layer_on_a_cls_pooled_vit(vit):
    out = nbx.attribute(vit, make_input(1, 64)[0], "gradcam")
    assert out.meta["layer"] == f"blocks.{len(vit.blocks) - 1}.norm1"
    assert out.raw.shape == (1, 4, 4)
    assert float(out.raw.abs().max()) > 0


def test_default_layer_on_an_avg_pooled_vit():
    model = reg_vit(class_token=False, global_pool="avg")
    out = nbx.attribute(model, make_input(1, (64, 96))[0], "gradcam")
    assert out.meta["layer"] == f"blocks.{len(model.blocks) - 1}"


def test_default_layer_on_a_hierarchical_token_model_keeps_a_grid_of_seven():
    """PVT's stages shrink their token grid like a CNN's: at 96x128 its last stage is 3x4, and the default
    layer is the last stage still at least 7 cells on its short side, as on a CNN (it was the 3x4 one)."""
    import timm
    model = timm.create_model("pvt_v2_b0", pretrained=False, num_classes=10).eval()
    grids = {layer["name"]: layer["grid"] for layer in nbx.layers(model, make_input(1, (96, 128)))}
    out = nbx.attribute(model, make_input(1, (96, 128))[0], "gradcam", target=1)
    assert out.meta["layer"].startswith("stages.1.") and min(grids[out.meta["layer"]]) >= 7
    assert any(min(g) < 7 for name, g in grids.items() if name.startswith("stages.3."))
    assert out.map.shape == (96, 128)


def test_layers_lists_patch_embed_channels_first(vit):
    # test_vit's patch embedding returns NHWC (dynamic image size); it must be read as a grid
    found = {layer["name"]: layer for layer in nbx.layers(vit, make_input(1, 64))}
    assert found["patch_embed"]["grid"] == [4, 4] and found["patch_embed"]["channels"] == vit.embed_dim
    out = nbx.attribute(vit, make_input(1, 64)[0], "layercam", layer="patch_embed", target=3)
    assert out.raw.shape == (1, 4, 4)


def _grad_cam_layer_map(model, layer, x, target, reshape):
    import copy

    class Probe(GradCAM):
        def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
            acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
            grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
            self.layer_cam = np.maximum(self.get_cam_image(input_tensor, None, targets, acts[0], grads[0],
                                                           False), 0)
            return super().compute_cam_per_layer(input_tensor, targets, eigen_smooth)

    mine = copy.deepcopy(model)
    with Probe(mine, [dict(mine.named_modules())[layer]], reshape_transform=reshape) as cam:
        cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(target)])
    return cam.layer_cam


def _drop_prefix_reshape(t, prefix, grid):
    return t[:, prefix:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("kw,prefix", [({"class_token": False, "global_pool": "avg"}, 4), ({}, 5)],
                         ids=["reg4-gap", "cls-reg4"])
@pytest.mark.parametrize("layer", ["blocks.2", "blocks.5.norm1"])
def test_cam_on_a_vit_with_register_tokens_and_non_square_grid(kw, prefix, layer):
    model = reg_vit(**kw)
    assert model.num_prefix_tokens == prefix
    x = make_input(1, (64, 96))
    out = nbx.attribute(model, x[0], "gradcam", layer=layer, target=3)
    assert out.raw.shape == (1, 4, 6) and out.map.shape == (64, 96)
    reshape = functools.partial(_drop_prefix_reshape, prefix=prefix, grid=(4, 6))
    ref = _grad_cam_layer_map(model, layer, x, 3, reshape)
    assert float(np.abs(ref).max()) > 0
    np.testing.assert_allclose(out.raw.numpy(), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_cam_methods_on_a_timm_reg4_gap_model():
    torch.manual_seed(0)
    import timm
    model = timm.create_model("vit_little_patch16_reg4_gap_256", pretrained=False, img_size=(64, 96),
                              depth=2).eval()
    x = make_input(1, (64, 96))[0]
    for method in ("gradcam", "gradcam++", "layercam", "eigencam", "attention_rollout", "grad_rollout"):
        out = nbx.attribute(model, x, method)
        assert out.raw.shape == (1, 4, 6), method
        assert np.isfinite(out.map).all() and out.map.shape == (64, 96), method


@pytest.mark.parametrize("name,kw,layer,grid,channels", [
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, depths=(1, 1, 1, 1), embed_dim=32,
                                          num_heads=(1, 1, 1, 1)), "layers.1", (8, 8), 64),
    ("test_mambaout", {}, "stages.1", (8, 8), 32),
    # VOLO's stages run channels last without saying so (no output_fmt): read from the shape
    ("volo_d1_224", dict(img_size=64), "network.0", (8, 8), 192),
])
def test_channels_last_models_are_read_as_grids(name, kw, layer, grid, channels):
    # Swin and MambaOut run their stages channels last (timm: model.output_fmt == 'NHWC')
    model = make_model(name, **kw)
    x = make_input(1, 64)
    found = {entry["name"]: entry for entry in nbx.layers(model, x)}
    assert tuple(found[layer]["grid"]) == grid and found[layer]["channels"] == channels
    out = nbx.attribute(model, x[0], "gradcam", target=3)
    assert out.meta["layer"] == layer and out.raw.shape == (1, *grid)
    ref = _grad_cam_layer_map(model, layer, x, 3, lambda t: t.permute(0, 3, 1, 2))
    assert float(np.abs(ref).max()) > 0
    np.testing.assert_allclose(out.raw.numpy(), ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_tokens_that_only_fit_the_input_by_an_unknown_patch_size_are_not_read_as_a_grid():
    """CrossViT resizes each stream to its own size whatever the input: at 96x128 its 1 + 14x14 tokens also
    fit '5 prefix tokens + 12x16 patches of 8 px', a patch no conv of the model makes, and were read so
    (every CAM silently scrambled). Its tokens are grids at its own input size."""
    model = make_model("crossvit_tiny_240", depth=((1, 1, 0),) * 3)
    odd = {entry["name"]: entry["grid"] for entry in nbx.layers(model, make_input(1, (96, 128)))}
    assert [12, 16] not in odd.values()
    native = {entry["name"]: entry["grid"] for entry in nbx.layers(model, make_input(1, 240))}
    assert native and set(map(tuple, native.values())) == {(20, 20)}     # the 12-px stream, 1 + 20x20 tokens
    out = nbx.attribute(model, make_input(1, 240)[0], "gradcam")
    assert out.raw.shape == (1, 20, 20) and np.isfinite(out.map).all()


def test_pil_input_on_a_vit_created_with_another_img_size():
    model = make_model("test_vit", img_size=96, dynamic_img_size=False)
    img = Image.fromarray(np.zeros((50, 70, 3), np.uint8))
    out = nbx.attribute(model, img, "gradcam")
    assert out.raw.shape == (1, 6, 6)


# -------------------------------------------------------------------------------- attention (ViTs)


class ReferenceAttention:
    """Attention probabilities recomputed from each block's q/k while the model runs *fused*.

    ``torch.nn.functional.scaled_dot_product_attention`` is replaced by an explicit softmax that keeps
    its probabilities (with gradients), so nothing of nbexplain's own capture path is used.
    """

    def __init__(self, monkeypatch):
        self.maps = []
        original = torch.nn.functional.scaled_dot_product_attention

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
            assert attn_mask is None and not is_causal
            a = ((q * (scale or q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)).softmax(-1)
            a.retain_grad()
            self.maps.append(a)
            return a @ v
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        self.original = original

    def run(self, model, x, target):
        self.maps.clear()
        assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
        xr = x[None].clone().requires_grad_(True)
        model(xr)[0, target].backward()
        return [a.detach() for a in self.maps], [a.grad for a in self.maps]


def abnar_rollout(fused, discard_ratio):
    """Attention rollout: Â = (A + I) / 2 row-normalised, multiplied from the first block on;
    optionally dropping the weakest links of each block first (vit-explain), never link (0, 0)."""
    t = fused[0].shape[-1]
    result = torch.eye(t)
    for a in fused:
        a = a.clone()
        if discard_ratio:
            flat = a.reshape(-1)
            idx = flat.topk(int(flat.numel() * discard_ratio), largest=False).indices
            flat[idx[idx != 0]] = 0
        a = (a + torch.eye(t)) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result


def patches(rows, prefix, grid, cls):
    return (rows[0, prefix:] if cls else rows[prefix:, prefix:].mean(0)).reshape(grid)


@pytest.mark.parametrize("variant", ["cls", "reg4-gap"])
def test_attention_methods_match_an_independent_reference(monkeypatch, variant):
    model = make_model("test_vit") if variant == "cls" else reg_vit(class_token=False, global_pool="avg")
    size = (64, 64) if variant == "cls" else (64, 96)
    grid = (size[0] // 16, size[1] // 16)
    prefix, cls = model.num_prefix_tokens, variant == "cls"
    x = make_input(1, size)[0]
    target = 3

    a_last = nbx.attribute(model, x, "attention", block=-1, target=target)
    a_head = nbx.attribute(model, x, "attention", block=1, head=1, fusion="max", target=target)
    roll = nbx.attribute(model, x, "attention_rollout", discard_ratio=0.0, target=target)
    roll_d = nbx.attribute(model, x, "attention_rollout", discard_ratio=0.6, fusion="max", target=target)
    grad = nbx.attribute(model, x, "grad_rollout", discard_ratio=0.0, target=target)
    grad_d = nbx.attribute(model, x, "grad_rollout", discard_ratio=0.5, target=target)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")), "fused_attn not restored"

    ref = ReferenceAttention(monkeypatch)
    maps, grads = ref.run(model, x, target)
    assert len(maps) == len(model.blocks)
    maps = [m[0] for m in maps]
    grads = [g[0] for g in grads]

    def check(out, expected):
        assert out.raw.shape == (1, *grid)
        torch.testing.assert_close(out.raw[0], expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))

    check(a_last, patches(maps[-1].mean(0), prefix, grid, cls))
    check(a_head, patches(maps[1][1], prefix, grid, cls))
    check(roll, patches(abnar_rollout([m.mean(0) for m in maps], 0.0), prefix, grid, cls))
    check(roll_d, patches(abnar_rollout([m.amax(0) for m in maps], 0.6), prefix, grid, cls))
    weighted = [(m * g).mean(0).clamp(min=0) for m, g in zip(maps, grads)]
    check(grad, patches(abnar_rollout(weighted, 0.0), prefix, grid, cls))
    check(grad_d, patches(abnar_rollout(weighted, 0.5), prefix, grid, cls))
    assert a_last.meta["layer"] == f"block {len(model.blocks) - 1}"


@pytest.mark.parametrize("method", ["attention", "attention_rollout", "grad_rollout"])
def test_attention_methods_work_with_fused_attention_and_restore_it(vit, method):
    flags = [m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)                          # timm's default
    out = nbx.attribute(vit, make_input(1, 64)[0], method)
    assert out.raw.shape == (1, 4, 4) and float(out.raw.max()) > 0
    assert [m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")] == flags


def test_grad_rollout_is_class_specific_and_rollout_is_not(vit):
    x = make_input(1, 64)[0]
    r1, r2 = (nbx.attribute(vit, x, "attention_rollout", target=t) for t in (1, 2))
    g1, g2 = (nbx.attribute(vit, x, "grad_rollout", target=t) for t in (1, 2))
    assert torch.equal(r1.raw, r2.raw)
    assert not torch.allclose(g1.raw, g2.raw)


def attention_probabilities(model, x):
    """Every block's attention, read by hooks on timm's attn_drop with fused attention off (the test's own
    capture, restored after)."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    maps = []
    handles = [m.register_forward_hook(lambda _m, _i, out: maps.append(out.detach()[0]))
               for n, m in model.named_modules() if n.endswith("attn_drop")]
    try:
        for m, _ in fused:
            m.fused_attn = False
        with torch.no_grad():
            model(x[None])
    finally:
        for h in handles:
            h.remove()
        for m, flag in fused:
            m.fused_attn = flag
    return maps


def test_rollout_through_cait_class_attention():
    """CaiT: self-attention among the 16 patches before the class token joins, then class attention
    where only the class token queries. Each block is the identity on the tokens it does not update. The
    self-attention mixes its heads after the softmax (talking heads): its negative weights are clipped."""
    model = make_model("cait_xxs24_224", img_size=64, embed_dim=32, depth=2, num_heads=2, depth_token_only=1)
    x = make_input(1, 64)[0]
    roll = nbx.attribute(model, x, "attention_rollout", discard_ratio=0.0, target=3)
    last = nbx.attribute(model, x, "attention", block=-1, target=3)
    maps = attention_probabilities(model, x)
    assert [tuple(a.shape[1:]) for a in maps] == [(16, 16), (16, 16), (1, 17)]
    assert any(bool((a < 0).any()) for a in maps)
    eye, result = torch.eye(17), torch.eye(17)
    for a in maps:
        a = a.clamp(min=0)
        block = torch.eye(17)
        if a.shape[-1] == 16:
            block[1:, 1:] = a.mean(0)
        else:
            block[:1] = a.mean(0)
        block = (block + eye) / 2
        result = block / block.sum(-1, keepdim=True) @ result
    torch.testing.assert_close(roll.raw[0], result[0, 1:].reshape(4, 4), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(last.raw[0], maps[-1].mean(0)[0, 1:].reshape(4, 4), rtol=1e-4, atol=1e-7)


NOT_ON_THE_GRID = [
    # windows: 16x16 patches in 4 windows of 8x8, then one 8x8 window (the last block lies on the grid)
    ("swin_tiny_patch4_window7_224", dict(img_size=64, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                          window_size=8),
     r"block 0 \(layers\.0\.blocks\.0\.attn\) has attention within 4 windows per image", (8, 8)),
    # cross-covariance: 24x24 channel attention, then class attention over the 4x4 patches
    ("xcit_nano_12_p16_224", dict(img_size=64, embed_dim=48, depth=2, num_heads=2, cls_attn_layers=1),
     r"block 0 \(blocks\.0\.attn\) has attention over 24 keys that are not patches.*channel attention",
     (4, 4)),
    # pooling: a 15x15 grid, then 8x8
    ("pit_ti_224", dict(img_size=64, patch_size=8, stride=4, base_dims=[8, 8], depth=[1, 1], heads=[1, 2]),
     r"different token sets \(15x15 at block 0, 8x8 at block 1\)", (8, 8)),
]


def test_a_batch_of_a_hybrid_vit_gets_each_images_own_rollout():
    """A conv stem makes the first batched pass probe its fast paths (``speed.plan``); those probe forwards
    must not run under the attention hooks, which recorded every block three times."""
    import timm
    model = timm.create_model("vit_tiny_r_s16_p8_224", img_size=64, num_classes=5).eval()
    x = make_input(2, 64)
    for method in ("attention_rollout", "grad_rollout"):
        batch = nbx.attribute(model, x, method, target=3)
        for i, exp in enumerate(batch):
            alone = nbx.attribute(model, x[i], method, target=3)
            assert torch.allclose(exp.raw, alone.raw, atol=1e-6), (method, i)


@pytest.mark.parametrize("arch,kw,why,last_grid", NOT_ON_THE_GRID, ids=["swin", "xcit", "pit"])
def test_rollout_refuses_attention_that_is_not_over_the_patch_grid(arch, kw, why, last_grid):
    from nbexplain.hygiene import hook_count
    model = make_model(arch, **kw)
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    x = make_input(1, 64)[0]
    for method in ("attention_rollout", "grad_rollout"):
        with pytest.raises(ValueError, match=rf"{method}: .*{why}.*Use 'attention' at a block that lies on the grid"):
            nbx.attribute(model, x, method)
    # the last block lies on the grid (one window, class attention, the pooled grid): raw attention works
    out = nbx.attribute(model, x, "attention", block=-1, target=3)
    assert out.raw.shape == (1, *last_grid) and torch.isfinite(out.raw).all() and float(out.raw.min()) >= 0
    a = attention_probabilities(model, x)[-1].mean(0)
    patches = last_grid[0] * last_grid[1]
    # Swin pools the average token, so its map is the mean row; the others read the class token's row
    expected = a.mean(0) if arch.startswith("swin") else a[0, -patches:]
    torch.testing.assert_close(out.raw[0], expected.reshape(last_grid), rtol=1e-4, atol=1e-7)
    assert hook_count(model) == 0
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused


def test_raw_attention_at_a_windowed_block_names_the_blocks_that_work():
    arch, kw, *_ = NOT_ON_THE_GRID[0]
    with pytest.raises(ValueError, match=r"attention: block 0 .*windowed attention.*Use 'attention' at a block "
                                         r"that lies on the grid \(block 1\)"):
        nbx.attribute(make_model(arch, **kw), make_input(1, 64)[0], "attention", block=0)


def test_guided_backprop_on_a_gelu_vit_warns_and_equals_saliency(vit):
    x = make_input(1, 64)[0]
    with pytest.warns(UserWarning, match="no nn.ReLU/ReLU6 modules"):
        gbp = nbx.attribute(vit, x, "guided_backprop", target=3)
    sal = nbx.attribute(vit, x, "saliency", target=3)
    assert torch.equal(gbp.raw, sal.raw)
    assert not isinstance(gbp.meta["warnings"], str)
    assert [w for w in gbp.meta["warnings"] if "ReLU" in w]
    with pytest.warns(UserWarning, match="ReLU"):
        sg = nbx.attribute(vit, x, "smoothgrad", base="guided_backprop", samples=6, batch_size=2)
    assert len(sg.meta["warnings"]) == 1


class _ClampedGradient(torch.autograd.Function):
    """The guided rule written independently: an identity whose backward keeps the positive gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)


class _InPlaceAfterRelus(nn.Module):
    """An in-place add on a ReLU6 output (legal: its backward reads its input), an in-place ReLU module
    called twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), \
            nn.Conv2d(6, 6, 3, padding=1)
        self.act, self.relu, self.fc = nn.ReLU6(), nn.ReLU(inplace=True), nn.Linear(6, 4)

    def forward(self, x):
        a = self.act(self.conv1(x) * 3)
        a += 0.5
        c = self.relu(self.conv2(a))
        return self.fc(self.relu(self.conv3(c)).mean((2, 3)))


def test_guided_backprop_clamps_the_gradient_at_every_relu_call_through_in_place_ops():
    torch.manual_seed(0)
    model, x = _InPlaceAfterRelus().eval(), torch.randn(1, 3, 16, 16)
    (ours,) = [r.raw for r in nbx.attribute(model, x, "guided_backprop", target=2)]
    relus = [model.act, model.relu]
    handles = [m.register_forward_hook(lambda _m, _i, out: _ClampedGradient.apply(out)) for m in relus]
    try:
        xi = x.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(model(xi)[0, 2], xi)
    finally:
        for h in handles:
            h.remove()
    assert_close(ours, ref)
    xi = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(xi)[0, 2], xi)
    assert not torch.allclose(ours, plain, rtol=1e-2, atol=0)     # the rule changed something


def test_guided_backprop_on_a_relu_cnn_does_not_warn(cnn, recwarn):
    nbx.attribute(cnn, make_input(1, 64)[0], "guided_backprop")
    assert not [w for w in recwarn if "ReLU" in str(w.message)]


# ---------------------------------------------------------------------------------- provenance


def test_meta_records_what_was_run(cnn):
    out = nbx.attribute(cnn, make_input(1, 64)[0], "integrated_gradients", steps=4, rule="riemann_left",
                        baseline=torch.zeros(3, 64, 64), target=2)
    meta = out.meta
    assert meta["method"] == "integrated_gradients" and meta["model"] == "test_resnet"
    assert meta["params"]["steps"] == 4 and meta["params"]["rule"] == "riemann_left"
    assert meta["params"]["baseline"]["tensor"] == [3, 64, 64] and len(meta["params"]["baseline"]["sha256"]) == 64
    assert len(meta["weights_sha256"]) == 64 and meta["target"] == 2
    assert meta["preprocess"]["size"] == [160, 160]


def test_a_custom_baseline_travels_with_the_export_and_replays(cnn, tmp_path):
    """A tensor baseline is part of what was computed: the JSON export carries it, a PNG's provenance its
    hash (replay then asks for it), and a different tensor is refused."""
    x = make_input(2, 64)
    base = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))   # one baseline per image
    outs = nbx.attribute(cnn, x, "integrated_gradients", steps=4, baseline=base, target=2)
    for i, out in enumerate(outs):
        again = nbx.replay(out.to_json(), cnn)
        np.testing.assert_allclose(again.map, out.map, atol=1e-6)
        alone = nbx.attribute(cnn, x[i], "integrated_gradients", steps=4, baseline=base[i], target=2)
        np.testing.assert_allclose(alone.map, out.map, atol=1e-6)
    outs[0].save(tmp_path / "a.png")
    doc = json.loads(Image.open(tmp_path / "a.png").text["nbexplain"])
    doc["input"] = json.loads(outs[0].to_json())["input"]
    with pytest.raises(ValueError, match=r"replay: baseline was a tensor \(1, 3, 64, 64\).*pass it again"):
        nbx.replay(doc, cnn)
    np.testing.assert_allclose(nbx.replay(doc, cnn, baseline=base[:1]).map, outs[0].map, atol=1e-6)
    with pytest.raises(ValueError, match=r"replay: baseline differs .*sha256 mismatch"):
        nbx.replay(doc, cnn, baseline=base[1:])
    for bad, what in ((None, "'NoneType'"), ({"format": "nbexplain/attribution@1"}, "lacks weights_sha256")):
        with pytest.raises(ValueError, match=rf"replay: .*{what}"):
            nbx.replay(bad, cnn)


# ------------------------------------------------------------------------------------- precision


def test_float64_model_with_float64_input(cnn):
    import copy
    model = copy.deepcopy(cnn).double()
    out = nbx.attribute(model, make_input(1, 64)[0].double(), "saliency", target=3)
    assert out.raw.shape == (1, 3, 64, 64)


def test_ig_auto_says_when_it_stopped_short(monkeypatch):
    from nbexplain.methods import integrated as ig
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3)).eval()
    x = torch.randn(1, 3, 4, 4) * 3
    monkeypatch.setattr(ig, "MAX_AUTO_STEPS", 3)       # the first grid and the adaptive rule's first round
    with pytest.warns(UserWarning, match="without reaching tolerance"):
        out = nbx.attribute(model, x, "integrated_gradients", steps="auto", baseline="zeros", tolerance=1e-6)[0]
    first = next(ig.refinements("gausslegendre"))                  # the default rule's first grid
    assert out.meta["quadrature"] == "adaptive_simpson" and out.meta["steps"] == 5      # two Simpson panels
    assert out.meta["evaluations"] == first + 5 + 2                # + f at x and at the baseline
    assert any("tolerance" in w for w in out.meta["warnings"])
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)).eval()
    exact = nbx.attribute(linear, x, "integrated_gradients", steps="auto", baseline="zeros")[0]
    assert exact.meta["steps"] == first and abs(exact.delta) < 1e-4    # linear: exact at the first grid
    assert exact.meta["evaluations"] == first + 2                      # the grid, f at x, f at the baseline


def test_a_4d_output_that_is_not_an_image_map_is_no_cam_layer():
    """CoaT's position terms are (N, heads, tokens, channels): 4-d, but not a grid over the image."""
    class PerHead(nn.Module):
        def forward(self, a):                                  # (N,8,16,16) -> (N, 2 heads, 16 tokens, 4)
            return nn.functional.adaptive_avg_pool2d(a, 4).flatten(2).transpose(1, 2).reshape(len(a), 16, 2, 4) \
                .transpose(1, 2)

    class CoaTLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.heads, self.fc = nn.Conv2d(3, 8, 3, stride=4, padding=1), PerHead(), nn.Linear(8, 5)

        def forward(self, x):
            a = self.stem(x)
            return self.fc(a.mean((2, 3)) + self.heads(a).mean((1, 2)).repeat(1, 2))

    model = CoaTLike().eval()
    assert [layer["name"] for layer in nbx.layers(model, torch.zeros(1, 3, 64, 64), all=True)] == ["stem"]
    assert nbx.attribute(model, torch.randn(3, 64, 64), "gradcam").meta["layer"] == "stem"


def test_a_cam_at_a_layer_the_score_does_not_read_says_so(recwarn):
    """Under class-token pooling a ViT's last block output reaches the head only through the class token:
    every patch position has zero gradient, and an empty map must not pass silently."""
    vit, x = make_model("vit"), make_input(1)[0]
    last = f"blocks.{len(vit.blocks) - 1}"
    with pytest.warns(UserWarning, match=rf"gradcam: the target's gradient is zero at every position of layer '{last}'"):
        out = nbx.attribute(vit, x, "gradcam", layer=last)
    assert out.map.max() == 0 and "norm1" in out.meta["warnings"][0]
    recwarn.clear()
    assert nbx.attribute(vit, x, "gradcam").map.max() > 0 and not recwarn.list


def test_a_strip_shaped_input_keeps_its_cam_layers(cnn):
    """At 7x500 a stride-4 map is 2x125: the short side is all rounding, yet it is the image's map."""
    for shape in ((3, 7, 500), (3, 500, 7)):
        grids = {d["name"]: tuple(d["grid"]) for d in nbx.layers(cnn, torch.zeros(shape))}
        assert "layer4" in grids and min(grids["layer4"]) == 1, grids
        out = nbx.attribute(cnn, torch.randn(shape), "gradcam", layer="layer2")
        assert out.map.shape == shape[1:] and np.isfinite(out.map).all()


def test_named_blocks_in_a_features_sequence_are_cam_candidates():
    """DenseNet-style naming (features.denseblock1, features.transition1) has no numbered blocks."""
    from collections import OrderedDict

    class DenseNetLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(OrderedDict(
                conv0=nn.Conv2d(3, 8, 3, stride=2, padding=1),
                denseblock1=nn.Sequential(OrderedDict(denselayer1=nn.Conv2d(8, 8, 3, padding=1), relu=nn.ReLU())),
                transition1=nn.Conv2d(8, 16, 1), norm5=nn.BatchNorm2d(16)))
            self.classifier = nn.Linear(16, 5)

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    class Nested(nn.Module):
        """No sequence names at all: the shallowest spatial modules stand in for blocks."""
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"a": nn.Conv2d(3, 4, 3, padding=1), "b": nn.Conv2d(4, 4, 3, padding=1)})
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.body["b"](self.body["a"](x)).mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    for model, expected in ((DenseNetLike().eval(), ["features.conv0", "features.denseblock1",
                                                     "features.transition1", "features.norm5"]),
                            (Nested().eval(), ["body.a", "body.b"])):
        names = [layer["name"] for layer in nbx.layers(model, x)]
        assert names == expected, names
        out = nbx.attribute(model, x, "gradcam")[0]
        assert out.meta["layer"] == expected[-1]


@pytest.mark.parametrize("method", ["attention", "attention_rollout", "gradcam"])
def test_a_padded_patch_grid_is_laid_over_the_padded_extent_not_stretched(method):
    """timm's dynamic_img_pad pads a 100x70 input with zeros to 112x80 (7x5 patches of 16): the map of
    the image must be the map of the explicitly padded image, cropped — not the grid stretched over
    100x70, which shifts the last cells by most of a patch."""
    model = make_model("test_vit", img_size=96, dynamic_img_size=True, dynamic_img_pad=True)
    x = make_input(size=(100, 70))[0]
    padded = torch.nn.functional.pad(x, (0, 10, 0, 12))
    a = nbx.attribute(model, x, method)
    ref = nbx.attribute(model, padded, method)
    assert a.raw.shape == ref.raw.shape == (1, 7, 5)
    assert a.meta["grid_extent"] == [112, 80] and "grid_extent" not in ref.meta
    assert_close(a.map * a.scale, (ref.map * ref.scale)[:100, :70])
    assert_close(input_map(a), a.map * a.scale)       # the faithfulness curves rank the same pixels


def test_the_methods_package_is_importable_and_nbx_methods_lists_it():
    """``nbx.methods()`` must not shadow the package a user imports to add a method of their own."""
    import importlib
    integrated = importlib.import_module("nbexplain.methods.integrated")
    exec("import nbexplain.methods.integrated as by_statement", ns := {})
    assert ns["by_statement"] is integrated
    from nbexplain.methods import REGISTRY
    assert [m["name"] for m in nbx.methods()] == list(REGISTRY)


def test_smoothgrad_with_fewer_samples_resumes_from_the_nearest_cached_chunk(zoo):
    """The explorer keeps the running sums at every chunk end: after 50 samples (in passes of 7 or 8:
    ends 7, 14, 21...), asking for 20 costs the 6 past the chunk end at 14 (it used to redraw all 20), and
    the map is the 20-sample one."""
    from nbexplain.api import compute
    from nbexplain.methods import get
    from nbexplain.models import describe
    model, x = zoo("resnet"), make_input()
    spec, memo = get("smoothgrad"), {}
    with torch.no_grad():
        logits = model(x)                               # as the explorer passes its forward stage's logits
    run = lambda n: compute(model, x, spec, spec.validate({"samples": n, "seed": 5}), target=7, layer=None,  # noqa: E731
                            info=describe(model), batch_size=8, memo=memo, logits=logits, keep_intermediates=True)
    run(50)
    fewer = run(20)
    assert fewer.meta["evaluations"] == 6
    direct = nbx.attribute(model, x, "smoothgrad", samples=20, seed=5, target=7)
    torch.testing.assert_close(fewer.raw, direct[0].raw, rtol=1e-4, atol=1e-6)


def test_expanded_work_runs_in_the_fewest_passes_of_even_sizes(zoo):
    """25 SmoothGrad samples with batch_size=8 run as four passes of 6-7, not 8+8+8+1: a pass of one sample
    takes none of the batched fast paths and costs more per sample. IG's 12 points likewise run as 6+6."""
    model, x = zoo("resnet"), make_input()
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    try:
        nbx.attribute(model, x, "smoothgrad", samples=25, target=3, batch_size=8)
        assert sorted(s for s in sizes if s > 1) == [6, 6, 6, 7], sizes
        sizes.clear()
        nbx.attribute(model, x, "integrated_gradients", steps=12, baseline="zeros", target=3, batch_size=8)
        assert sorted(s for s in sizes if s > 2) == [6, 6], sizes      # (a pass of 2: x and the baseline)
    finally:
        handle.remove()


def test_an_output_that_folds_positions_into_the_batch_is_no_cam_layer():
    """MobileViT's transformers run on (N*4, tokens, C): the first dimension is not the batch, so reading
    it as N maps would give image 0 the map of one patch position (and Score-CAM a shape error)."""
    model = make_model("mobilevit_xxs")
    x = torch.randn(2, 3, 64, 64)
    names = [layer["name"] for layer in nbx.layers(model, x, all=True)]
    assert "stages.4" in names and not [n for n in names if ".transformer." in n]
    for method in ("gradcam", "scorecam"):
        out = nbx.attribute(model, x, method, target=3)
        assert out[0].meta["layer"] == "stages.2" and out[1].raw.shape == (1, 8, 8)   # last grid >= 7
    with pytest.raises(ValueError, match="per image"):
        nbx.attribute(model, x[0], "gradcam", layer="stages.4.1.transformer.0.norm1")


def test_mobilevit_v2_attention_is_refused_for_what_it_is():
    """Its separable attention scores each key per pixel of a patch; the error must not call it sub-sampled."""
    model = make_model("mobilevitv2_050")
    with pytest.raises(ValueError, match=r"not a token-to-token matrix \(separable linear attention\)"):
        nbx.attribute(model, torch.randn(1, 3, 64, 64), "attention")


def test_hiera_tokens_are_read_in_their_place_on_the_grid():
    """Hiera keeps its tokens unrolled (each mask unit's tokens together) until the last stage; an earlier
    block's CAM must put each token where the model's own reroll does, not in sequence order."""
    model = make_model("hiera_tiny_224")
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))   # timm inits it ~0
    x = make_input(1, 224)
    block = 2                                            # stage 2: 28x28 tokens, still unrolled
    seen = {}
    handle = model.blocks[block].register_forward_hook(lambda m, i, o: seen.update(out=o) or o.retain_grad())
    try:
        model(x)[0, 3].backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    acts, grads = (model.reroll(t, block) for t in (seen["out"].detach(), seen["out"].grad))   # (1, h, w, C)
    ref = torch.relu((acts * torch.relu(grads)).sum(-1))                           # LayerCAM: per-cell weights
    out = nbx.attribute(model, x[0], "layercam", target=3, layer=f"blocks.{block}")
    assert out.raw.shape == (1, 28, 28) and float(ref.abs().max()) > 0
    torch.testing.assert_close(out.raw, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert nbx.attribute(model, x[0], "gradcam").meta["layer"] == "blocks.11.norm1"   # last stage: raster


def test_a_model_that_takes_one_image_only_still_has_cam_layers():
    """Layer discovery probes with two images; a model hard-wired to one (view(1, -1)) is probed with one."""
    class OneImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.Linear(4 * 16 * 16, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(1, -1))

    model = OneImage().eval()
    out = nbx.attribute(model, torch.randn(3, 64, 64), "gradcam", target=2)
    assert out.meta["layer"] == "conv" and out.raw.shape == (1, 16, 16)


class _CountingNet(nn.Module):
    """A small CNN that counts its forwards and adds a per-model constant map (a learned bias image)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bias_map = nn.Conv2d(1, 8, 1)              # applied to a fixed (1,1,16,16) grid: no image in it
        self.register_buffer("grid", torch.ones(1, 1, 16, 16))
        self.fc = nn.Linear(8, 5)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc((a + self.bias_map(self.grid)).mean((2, 3)))


def test_a_named_layer_needs_no_probe_forward_and_a_constant_map_is_no_layer():
    """A first CAM call at a named layer is one forward (its capture checks the layer); the default layer
    costs one probe more. The probe runs one image and keeps only outputs that depend on it: a map that
    is the same for every image (a learned bias image) is no CAM layer."""
    torch.manual_seed(0)
    x = torch.randn(3, 64, 64)
    model = _CountingNet().eval()
    named = nbx.attribute(model, x, "gradcam", target=1, layer="conv2")
    assert model.calls == 1 and named.meta["layer"] == "conv2" and named.raw.shape == (1, 16, 16)
    fresh = _CountingNet().eval()
    fresh.load_state_dict(model.state_dict())
    default = nbx.attribute(fresh, x, "gradcam", target=1)
    assert fresh.calls == 2 and default.meta["layer"] == "conv2"
    torch.testing.assert_close(default.raw, named.raw)
    names = [layer["name"] for layer in nbx.layers(fresh, x, all=True)]
    assert names == ["conv1", "conv2"]                   # not bias_map: its (1, 8, 16, 16) ignores the image
    with pytest.raises(ValueError, match="layer 'fc' has no spatial output per image"):
        nbx.attribute(_CountingNet().eval(), x, "gradcam", target=1, layer="fc")


def test_a_layer_that_is_one_cell_at_this_input_size_says_so_and_names_one_with_a_grid():
    """CIFAR-size images: a ResNet's last stage is 1x1 at 32 px, where a CAM is one value. The error says
    that (not that the layer has no spatial output) and names the default layer, which keeps a grid."""
    model = make_model("resnet18", num_classes=10)
    x = make_input(1, 32)
    with pytest.raises(ValueError, match=r"layer 'layer4' is a 1x1 grid at this 32x32 input.*e\.g\. 'layer1'"):
        nbx.attribute(model, x, "gradcam", target=1, layer="layer4")
    with pytest.raises(ValueError, match=r"layer 'fc' has no spatial output.*its output at one image is \(1, 10\)"):
        nbx.attribute(model, x, "gradcam", target=1, layer="fc")
    assert nbx.attribute(model, x, "gradcam", target=1)[0].meta["layer"] == "layer1"


def test_an_image_explained_among_others_replays_to_its_own_map():
    """The passes of a batch fold BatchNorm and a pass of one image does not; on a net with max pooling the
    other summation order moved pixels of a saliency map by up to 8%, so replay (one image) gave another map.
    It runs as many copies of the image as the original call had images; IG runs batched passes either way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10)).eval()
    pre = nbx.Preprocess(size=128, mean=(0.5,) * 3, std=(0.25,) * 3)
    pictures = [nbx.sample_image(n).convert("RGB").resize((260, 210)) for n in ("cat", "coffee", "astronaut", "rocket")]
    for method, kw in (("saliency", {}), ("integrated_gradients", {"steps": 8})):
        for out in nbx.attribute(model, pictures, method, preprocess=pre, **kw):
            again = nbx.replay(out.to_json(), model)
            np.testing.assert_allclose(again.map, out.map, rtol=0, atol=1e-6 * np.abs(out.map).max())
            copies = len(pictures) if method == "saliency" else 1          # IG's 8 steps are not run 4 times
            assert again.meta["evaluations"] * len(pictures) == out.meta["evaluations"] * copies
    single = nbx.attribute(model, pictures[1], "saliency", preprocess=pre)
    assert "batch_images" not in single.meta
    np.testing.assert_array_equal(nbx.replay(single.to_json(), model).map, single.map)


def test_the_weights_digest_is_of_the_weights_as_they_are_when_read():
    """The provenance's sha256 is hashed in a worker thread while the passes run (BatchNorm folding swaps
    weights meanwhile): it equals a hash of the state_dict, and a weight changed in place after the hash
    began gives the new weights' digest, not the old one."""
    import hashlib
    from nbexplain.digest import start_digest, weights_digest

    def sha(model):
        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    model = make_model("resnet18", num_classes=10)
    out = nbx.attribute(model, make_input(1, 64)[0], "integrated_gradients", steps=8, target=1)   # folded passes
    assert out.meta["weights_sha256"] == sha(model)
    with torch.no_grad():
        model.fc.bias[0] += 1.0
    start_digest(model)
    with torch.no_grad():
        model.fc.bias[1] += 1.0                 # after the worker took the tensors: must not be missed
    assert weights_digest(model) == sha(model) != out.meta["weights_sha256"]
    # an edit through .data moves no version counter (hand-written SGD): the digest, and replay's check
    # of it, must still see new weights
    exported = nbx.attribute(model, make_input(1, 64)[0], "saliency", target=1)
    for p in model.parameters():
        p.data -= 0.01 * torch.ones_like(p)
    assert weights_digest(model) == sha(model) != exported.meta["weights_sha256"]
    with pytest.raises(ValueError, match="weights differ"):
        nbx.replay(exported.to_json(), model)
    # edits of a part of a tensor: a class's head row zeroed, a channel ablated through a numpy view; a sign
    # flipped (which keeps every norm), of a tensor and of a single value
    for edit in (lambda: model.fc.weight.data[1].zero_(),
                 lambda: model.layer3[0].conv1.weight.detach().numpy().__setitem__(7, 0.0),
                 lambda: model.fc.weight.data.neg_(),
                 lambda: model.layer2[0].conv2.weight.data[3, 2, 1, 1].neg_()):
        exported = nbx.attribute(model, make_input(1, 64)[0], "saliency", target=1)
        edit()
        assert weights_digest(model) == sha(model) != exported.meta["weights_sha256"]
        with pytest.raises(ValueError, match="weights differ"):
            nbx.replay(exported.to_json(), model)
    # channels-last weights are not read in place but by their sums (as a GPU's are)
    model = model.to(memory_format=torch.channels_last)
    before = weights_digest(model)
    for p in model.parameters():
        p.data.mul_(1.01)
    assert weights_digest(model) == sha(model) != before



def test_the_state_dict_is_reused_while_the_model_holds_the_same_tensors(monkeypatch):
    """The digest's state dict (names and tensors) is built once while the modules hold the same tensors:
    an edit of values is still hashed anew, a module replaced gets a new state dict, and a model whose state
    dict holds more than its tensors (extra state) gets a new one every call."""
    import hashlib
    from nbexplain import digest
    from nbexplain.digest import weights_digest

    def sha(state):
        h = hashlib.sha256()
        for name, t in state.items():
            h.update(name.encode())
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    model = make_model("resnet18", num_classes=10)
    first = weights_digest(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(model, "state_dict", lambda *a, **k: pytest.fail("state dict rebuilt"))
    assert weights_digest(model) == first
    model.fc.weight.data.neg_()                                  # values: read when hashed
    state["fc.weight"] = state["fc.weight"].neg()
    assert weights_digest(model) == sha(state) != first
    monkeypatch.undo()
    model.fc = nn.Linear(512, 10)                                # other tensors: a new state dict
    assert weights_digest(model) == sha(model.state_dict())
    model.fc.double()                        # the same Parameter objects with new data: grouped anew
    assert weights_digest(model) == sha(model.state_dict())
    tensors = digest.module_tensors(model)                       # (a GPU's group cannot mix devices)
    groups, _ = digest._layout(model, tensors, digest.tensor_key(tensors, values=False)[::2])
    assert all(len({(t.device, t.dtype) for t in group}) == 1 for group in groups.floats)

    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"calls": 1}

        def set_extra_state(self, state):
            pass
    model = Extra(4, 2)
    built = []
    state_dict = model.state_dict
    monkeypatch.setattr(model, "state_dict", lambda *a, **k: built.append(1) or state_dict(*a, **k))
    weights_digest(model)
    weights_digest(model)
    assert len(built) == 2                                       # more than its tensors: built every call


def test_a_gpus_weights_are_summed_in_chunks_that_see_the_same_edits(monkeypatch):
    """Off the CPU the weights' sums are taken in fixed chunks of the tensors laid end to end (a few kernels,
    not one per tensor, queued by the calling thread): forced here on the CPU, with runs and chunks small
    enough that tensors share chunks and runs, every edit still moves the digest's key, and the same values
    give the same key."""
    from nbexplain import digest
    monkeypatch.setattr(digest, "_fused", lambda group: True)
    monkeypatch.setattr(digest, "_CHUNK", 64)
    monkeypatch.setattr(digest, "_RUN", 5000)
    model = make_model("resnet18", num_classes=10)
    tensors = digest.module_tensors(model)
    groups = digest.fingerprint_groups(tensors)
    queued = digest.queue_sums(groups)
    assert queued.floats and digest.fingerprint_of(groups, queued) == digest.fingerprint_of(groups) \
        == digest.value_fingerprint(tensors)
    total = sum(float(t.double().sum()) for t in groups.floats[0])
    assert float(queued.floats[0].double().sum()) == pytest.approx(total, rel=1e-6)
    for edit in (lambda: model.fc.weight.data[1].zero_(),
                 lambda: model.layer3[0].conv1.weight.detach().numpy().__setitem__(7, 0.0),
                 lambda: model.fc.weight.data.neg_(),
                 lambda: model.layer2[0].conv2.weight.data[3, 2, 1, 1].neg_(),
                 lambda: model.bn1.running_var.data.mul_(1.5)):
        before = digest.value_fingerprint(tensors)
        edit()
        assert digest.value_fingerprint(tensors) != before
    bf16 = make_model("resnet18", num_classes=10).to(torch.bfloat16)
    key = digest.value_fingerprint(digest.module_tensors(bf16))
    bf16.fc.weight.data[0, 0] += 0.5                    # summed in fp32: one bf16 value's edit is seen
    assert digest.value_fingerprint(digest.module_tensors(bf16)) != key


def test_a_digest_under_a_known_key_is_returned_at_once_and_a_new_key_is_hashed_anew(monkeypatch):
    """The widget passes its weights key on every control change: a digest made under that key comes back
    without a state dict (2 ms a change); a key that moved (an edit) gets the new weights' digest."""
    from nbexplain.digest import module_tensors, start_digest, tensor_key
    model = make_model("resnet18", num_classes=10)
    key = tensor_key(module_tensors(model), values=True)
    first = start_digest(model, key).result()
    monkeypatch.setattr(model, "state_dict", lambda *a, **k: pytest.fail("state dict rebuilt for a known key"))
    assert start_digest(model, key).result() == first
    monkeypatch.undo()
    model.fc.weight.data[0].zero_()
    moved = tensor_key(module_tensors(model), values=True)
    assert moved != key and start_digest(model, moved).result() != first

def test_imagenet_class_names_are_timms():
    """A 1000-class model is labelled with timm's ImageNet-1k names (read from timm's files directly)."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    out = nbx.attribute(make_model("resnet18"), make_input(1, 64)[0], "saliency", target=1)
    assert out.label == info.index_to_description(1) == "goldfish, Carassius auratus"
    assert [label for _, label, _ in out.probs] == [info.index_to_description(i) for i, _, _ in out.probs]


def test_a_binary_model_with_one_logit_reports_its_sigmoid():
    """A one-output classifier's probability is the sigmoid of its logit (a softmax over one output is 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)).eval()
    x = make_input(1, 32)[0]
    out = nbx.attribute(model, x, "saliency")
    (index, _, p), = out.probs
    assert index == 0 and p == pytest.approx(float(torch.sigmoid(model(x[None])[0, 0])), rel=1e-5) and p < 1


def test_a_map_that_is_zero_everywhere_comes_with_a_warning(cnn):
    """VarGrad of one sample (the variance of one gradient) is zero: the user is told, not shown a blank map."""
    with pytest.warns(UserWarning, match="vargrad: the map is zero everywhere"):
        out = nbx.attribute(cnn, make_input(1, 64)[0], "vargrad", samples=1, target=1)
    assert not out.raw.any() and "zero everywhere" in out.meta["warnings"][0]
    # noise 0: E[a²] − E[a]² rounds to ±1e-13, which a normalised map would stretch to full contrast
    with pytest.warns(UserWarning, match="vargrad: the map is zero everywhere"):
        out = nbx.attribute(cnn, make_input(1, 64)[0], "vargrad", samples=4, noise=0.0, target=1)
    assert not out.raw.any() and not out.map.any()


def test_a_model_whose_parameters_sit_in_its_first_layer_lists_its_layers():
    """``core`` took the one parameter-owning child, a leaf conv, for the network inside a wrapper: no layer
    was listed and CAMs said the model had no spatial output."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = make_input(1, 32)
    assert [layer["name"] for layer in nbx.layers(model, x)] == ["0", "1"]
    assert nbx.attribute(model, x[0], "gradcam").meta["layer"] in ("0", "1")


class TokenStem(nn.Module):
    """A conv stem whose BatchNorm output becomes patch tokens (x.flatten(2).transpose(1, 2)), as in XCiT
    and LeViT, then a linear head over the tokens."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16 * 36, 5)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.normal_()

    def forward(self, x):
        tokens = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        return self.head(torch.tanh(tokens * torch.linspace(-1, 1, 16)).flatten(1))


@pytest.mark.parametrize("arch", ["token_stem", "xcit_nano_12_p16_224"])
def test_one_images_gradient_through_a_batchnorm_before_tokens_is_exact(arch):
    """PyTorch's BatchNorm backward read a single image's odd-strided gradient in the wrong order (CPU):
    XCiT's saliency came out 100% off, and from the second call (channels-last) right. The reference is the
    same image's gradient in a batch of two, in float64."""
    import timm
    torch.manual_seed(0)
    model = TokenStem().eval() if arch == "token_stem" else \
        timm.create_model(arch, num_classes=5, img_size=48).eval()
    x = torch.randn(1, 3, 12 if arch == "token_stem" else 48, 12 if arch == "token_stem" else 48)
    twin = (TokenStem() if arch == "token_stem" else timm.create_model(arch, num_classes=5, img_size=48)).eval()
    twin.load_state_dict(model.state_dict())
    pair = x.double().expand(2, -1, -1, -1).clone().requires_grad_()
    ref, = torch.autograd.grad(twin.double()(pair)[:, 1].sum(), pair)
    for _ in range(3):                                   # the first call, then the fast paths' calls
        got = nbx.attribute(model, x, "saliency", target=1)[0].raw
        assert_close(got, ref[:1].float())


def test_a_layer_whose_tuple_output_the_head_reads_in_part_gives_a_zero_cam_with_a_warning():
    """PiT's stages return (patch tokens, class tokens) and its head reads only the class tokens: the
    gradient at the patch tokens is zero, which a warning says; it was 'scores carry no gradient'."""
    model = make_model("pit_ti_224", img_size=64)
    x = make_input(1, 64)[0]
    with pytest.warns(UserWarning, match="gradient is zero at every position"):
        out = nbx.attribute(model, x, "gradcam", layer="transformers", target=1)
    assert not out.map.any()
    with warnings.catch_warnings(record=True) as caught:   # an earlier stage's tokens reach the class token
        warnings.simplefilter("always")
        nbx.attribute(model, x, "gradcam", layer="transformers.1", target=1)
    assert not any("gradient is zero" in str(w.message) for w in caught)


def test_talking_heads_attention_is_shown_by_its_positive_weights():
    """CaiT mixes its heads after the softmax, so a head's weights can all be negative: the unsigned map
    read -1..-0.996. The negative weights are clipped, with a warning."""
    model = make_model("cait_xxs24_224", img_size=64, embed_dim=32, depth=2, num_heads=2, depth_token_only=1)
    x = make_input(1, 64)[0]
    for head in range(2):
        with pytest.warns(UserWarning, match="talking-heads"):
            out = nbx.attribute(model, x, "attention", block=0, head=head, target=3)
        assert out.map.min() >= 0 and out.map.max() <= 1


def test_occlusion_says_when_no_window_moves_the_score_beyond_rounding():
    """A net that barely sees the image (RepVGG in random weights: drops of 1e-8) gave a full-range map of
    rounding noise with no word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    x = torch.randn(3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbx.attribute(model, x, "occlusion", patch=8, stride=4)
    with torch.no_grad():
        model[0].weight.mul_(1e-9)
        model[4].bias.fill_(5.0)
    with pytest.warns(UserWarning, match="occlusion: no window moves the score by more than rounding"):
        nbx.attribute(model, x, "occlusion", patch=8, stride=4)


class ListBlocks(nn.Module):
    """SelecSLS's pattern: each block returns [features, skip] and wraps any other input in a list."""

    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)

        def forward(self, x):
            if not isinstance(x, list):
                x = [x]
            return [torch.relu(self.conv(x[0])), x[0]]

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(self.Block(3, 8), self.Block(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x)[0].mean((2, 3)))


def test_a_cam_at_a_layer_that_returns_a_list_hands_the_next_layer_a_list():
    """The capture hook returned a tuple for any output that is no tensor: SelecSLS's next block wrapped
    it in a list and conv2d got a tuple (TypeError from inside the model)."""
    torch.manual_seed(0)
    model = ListBlocks().eval()
    x = torch.randn(2, 3, 16, 16)
    for method in ("gradcam", "scorecam"):
        out = nbx.attribute(model, x, method, layer="features.0", target=1)
        assert out[0].map.shape == (16, 16) and np.isfinite(out[0].map).all()
