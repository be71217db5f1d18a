"""Trust: sanity checks, faithfulness, agreement, shortcut flags, provenance export and replay."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import nbexplain as nbx
from nbexplain import trust
from nbexplain.methods import REGISTRY, register
from nbexplain.synthetic import make_batch


@pytest.fixture(scope="module")
def cnn():
    return nbx.load_model("synthetic-cnn")


@pytest.fixture(scope="module")
def batch():
    return make_batch(16, seed=31)


def test_randomization_flags_a_weight_independent_map_and_passes_gradients(cnn, batch, edge_foil):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    report = trust.randomization_test(cnn, batch["images"][0], ["gradcam", "saliency", edge_foil])
    assert report.steps[0] == "fc" and len(report.steps) >= 4           # top-down, from the logits
    assert report.passed["saliency"] and report.passed["gradcam"]
    assert not report.passed[edge_foil]
    assert all(v > 0.99 for v in report.scores[edge_foil]["spearman_abs"])
    assert "FAIL" in report.reading() and "0.5" in report.reading()
    for k, v in cnn.state_dict().items():                                # the user's model is untouched
        assert torch.equal(v, before[k])
    independent = trust.randomization_test(cnn, batch["images"][0], ["saliency"], mode="independent")
    assert len(independent.scores["saliency"]["ssim"]) == len(independent.steps)


def test_gradcam_and_ig_beat_a_random_map_on_deletion_and_insertion(cnn, batch):
    rng = np.random.default_rng(0)
    scores = {"gradcam": [], "integrated_gradients": [], "random": []}
    for img in batch["images"][:8]:
        exps = {"gradcam": nbx.attribute(cnn, img, "gradcam"),
                "integrated_gradients": nbx.attribute(cnn, img, "integrated_gradients", steps=16)}
        for name, e in exps.items():
            c = trust.deletion_insertion(cnn, e, fill="blur")
            scores[name].append((c.deletion_auc, c.insertion_auc))
        c = trust.deletion_insertion(cnn, exps["gradcam"], saliency=rng.random((64, 64)), fill="blur")
        scores["random"].append((c.deletion_auc, c.insertion_auc))
    mean = {k: np.mean(v, 0) for k, v in scores.items()}
    for method in ("gradcam", "integrated_gradients"):
        assert mean[method][0] < mean["random"][0], (method, mean)
        assert mean[method][1] > mean["random"][1], (method, mean)


def test_pointing_games_against_the_object_mask(cnn, batch):
    e = nbx.attribute(cnn, batch["images"][1], "gradcam", target=int(batch["labels"][1]))
    mask = batch["object_mask"][1]
    assert trust.pointing_game(e.map, mask) in (True, False)
    assert 0.0 <= trust.energy_pointing_game(e.map, mask) <= 1.0
    assert trust.pointing_game(mask.astype(float), mask) and trust.energy_pointing_game(mask.astype(float), mask) == 1
    with pytest.raises(ValueError, match="shape"):
        trust.pointing_game(e.map, mask[:10])


def test_agreement_matrix_and_disagreement_warning(cnn, batch):
    a = trust.agreement(cnn, batch["images"][2], ["gradcam", "integrated_gradients", "occlusion"],
                        params={"integrated_gradients": {"steps": 16}})
    assert a.matrix.shape == (3, 3) and np.allclose(np.diag(a.matrix), 1) and np.allclose(a.matrix, a.matrix.T)
    try:
        @register("noise_map", kind="pixel", signed=False, summary="random noise (disagrees with everything)")
        def noise_map(ctx):
            return torch.rand(ctx.x.shape, generator=torch.Generator().manual_seed(0))
        with pytest.warns(UserWarning, match="disagree"):
            trust.agreement(cnn, batch["images"][2], ["noise_map", "gradcam"])
    finally:
        REGISTRY.pop("noise_map", None)


def _stamped_non_red(n=40, seed=21):
    b = make_batch(n, seed=seed, stamp=True)
    keep = b["labels"] != 0
    return list(b["images"][keep]), list(b["object_mask"][keep])


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_clever_hans_flag_fires_on_the_shortcut_model_only(arch):
    images, masks = _stamped_non_red()
    rates = {}
    for name in (f"synthetic-{arch}-hans", f"synthetic-{arch}"):
        exps = nbx.attribute(nbx.load_model(name), images, "integrated_gradients", steps=16)
        maps = [e.map for e in exps]
        hot, _ = trust.fixed_hotspots(maps)
        rates[name] = (trust.flag_outside(maps, masks).mean(), hot.mean())
    hans, clean = rates[f"synthetic-{arch}-hans"], rates[f"synthetic-{arch}"]
    assert hans[0] >= 0.7 and clean[0] <= 0.3, rates              # with masks: evidence off the object
    assert hans[1] >= 0.7 and clean[1] <= 0.35, rates             # mask-free: the hotspot never moves


def test_replay_from_json_reproduces_the_map(cnn, batch, tmp_path):
    e = nbx.attribute(cnn, batch["images"][3], "smoothgrad", samples=4, noise=0.2, seed=5, target=2)
    path = e.save(tmp_path / "x.json")
    doc = json.loads(open(path).read())
    for key in ("model", "weights_sha256", "preprocess", "method", "params", "target", "label", "versions",
                "device", "time"):
        assert key in doc, key
    again = nbx.replay(open(path).read(), cnn)
    np.testing.assert_allclose(again.map, e.map, atol=1e-6)
    other = nbx.load_model("synthetic-cnn-hans")
    with pytest.raises(ValueError, match="weights differ"):
        nbx.replay(doc, other)


def test_replay_of_a_tensor_input(cnn, batch):
    x = torch.randn(1, 3, 64, 64)
    e = nbx.attribute(cnn, x, "gradcam", layer="layer1")[0]
    np.testing.assert_allclose(nbx.replay(e.to_json(), cnn).map, e.map, atol=1e-6)


def test_exports_png_npz_html_carry_provenance_and_escape_labels(cnn, batch, tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    e = nbx.attribute(cnn, batch["images"][4], "gradcam", labels=[evil, "b", "c", "d"], target=0)
    png = Image.open(e.save(tmp_path / "x.png"))
    assert json.loads(png.text["nbexplain"])["label"] == evil and png.size == (64, 64)
    npz = np.load(e.save(tmp_path / "x.npz"))
    np.testing.assert_array_equal(npz["map"], e.map)
    page = open(e.save(tmp_path / "x.html"), encoding="utf-8").read()
    assert evil not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "http" not in page.replace("http-equiv", "")                  # self-contained, renders offline
    with pytest.raises(ValueError, match=r"\.png"):
        e.save(tmp_path / "x.gif")
