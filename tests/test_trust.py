"""Trust: sanity checks, faithfulness, agreement, shortcut flags, provenance export and replay."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

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


def test_randomization_does_not_pass_a_method_whose_map_is_empty(cnn, batch):
    """VarGrad of one sample is zero everywhere: a constant map correlates with nothing (Spearman 0),
    which used to read as a pass."""
    report = trust.randomization_test(cnn, batch["images"][0], ["vargrad", "saliency"],
                                      params={"vargrad": {"samples": 1}})
    assert report.empty == ["vargrad"] and not report.passed["vargrad"] and report.passed["saliency"]
    assert "vargrad: FAIL (its map of the trained model is constant" in report.reading()


def test_a_map_that_randomisation_blanks_gets_no_verdict(cnn, batch):
    """A randomised network that passes no signal (norm gains re-drawn around 0 silenced the bundled model's
    last stage) gives a constant map, whose Spearman of 0 read as a PASS."""
    trained = cnn.fc.weight.detach().clone()

    @register("blank_once_random", kind="pixel", signed=False, summary="gradients, blank on other weights")
    def blank_once_random(ctx):
        grads, _ = ctx.input_grads(ctx.x, ctx.targets)
        return grads.abs() * float(torch.equal(ctx.model.fc.weight, trained))
    try:
        report = trust.randomization_test(cnn, batch["images"][0], ["blank_once_random", "saliency"],
                                          groups=["layer4", "fc"])
    finally:
        REGISTRY.pop("blank_once_random")
    assert report.dead == ["blank_once_random"] and not report.passed["blank_once_random"]
    assert report.passed["saliency"]
    assert "blank_once_random: NO VERDICT (its map of the randomised model is constant" in report.reading()
    assert "once all 2 layer groups are randomised" in report.reading()


def test_the_cascade_runs_top_down_whatever_order_the_groups_come_in(cnn, batch):
    for groups in (["fc", "layer4", "layer1"], ["layer1", "fc", "layer4"]):
        report = trust.randomization_test(cnn, batch["images"][0], ["saliency"], groups=groups)
        assert report.steps == ["fc", "layer4", "layer1"]


def test_a_full_cascade_redraws_every_parameter_of_a_vit():
    """A ViT's class token and position embedding belong to no child module, so no group re-drew them."""
    from nbexplain.trust.randomization import _group_parameters
    vit = nbx.load_model("synthetic-vit")
    drawn = {id(p) for g in trust.layer_groups(vit) for p in _group_parameters(vit, g)}
    assert drawn == {id(p) for p in vit.parameters()}


def test_randomization_copes_with_a_model_deepcopy_refuses_and_checks_its_arguments(cnn, batch):
    import threading

    class Locked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lock = cnn, threading.Lock()

        def forward(self, x):
            return self.model(x)

    model = Locked().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))    # preprocessed: a bare wrapper
    report = trust.randomization_test(model, x, ["saliency"], groups=["model.fc"])
    assert report.passed["saliency"] is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # the copy's own weights
    with pytest.raises(TypeError, match=r"params: expected a dict of each method's parameters"):
        trust.randomization_test(cnn, batch["images"][0], ["saliency"], params=[{"steps": 4}])
    with pytest.raises(ValueError, match=r"params: 'gradcam' is not among the methods tested"):
        trust.randomization_test(cnn, batch["images"][0], ["saliency"], params={"gradcam": {}})
    with pytest.raises(TypeError, match=r"seed: expected a non-negative whole number, got '1'"):
        trust.randomization_test(cnn, batch["images"][0], ["saliency"], seed="1")


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


def test_replay_reads_export_files_and_names_what_is_wrong(cnn, batch, tmp_path):
    """A path was parsed as JSON text (JSONDecodeError), and a corrupt input raised a bare KeyError."""
    image = batch["images"][3]
    e = nbx.attribute(cnn, image, "saliency", target=2)
    for ext in ("json", "png", "npz"):
        path = e.save(tmp_path / f"x.{ext}")
        for doc in (path, Path(path)):
            again = nbx.replay(doc, cnn, image=None if ext == "json" else image)
            np.testing.assert_allclose(again.map, e.map, atol=1e-6)
    with pytest.raises(ValueError, match=r"carries no input; pass image="):
        nbx.replay(tmp_path / "x.png", cnn)
    with pytest.raises(ValueError, match=r"not valid JSON.*pass exp.to_json\(\)"):
        nbx.replay(e.to_json()[:300], cnn)
    with pytest.raises(FileNotFoundError, match="no file"):
        nbx.replay(tmp_path / "missing.json", cnn)
    doc = json.loads(e.to_json())
    with pytest.raises(ValueError, match=r"input is corrupt.*pass image="):
        nbx.replay(dict(doc, input={"data": "aaaa"}), cnn)
    for bad in ({"params": [1]}, {"preprocess": {"size": "abc"}}, {"preprocess": {"foo": 1}}):
        with pytest.raises(ValueError, match=r"preprocess or params field is corrupt"):
            nbx.replay(dict(doc, **bad), cnn)
    with pytest.raises(IsADirectoryError, match="is a folder; pass a file name in it"):
        e.save(tmp_path)
    for ext in ("json", "npz", "png"):         # a typo is refused for every format, not only the drawn ones
        with pytest.raises(TypeError, match=r"save: unexpected keyword 'opacty'; the view settings are opacity"):
            e.save(tmp_path / f"z.{ext}", opacty=0.3)
    with pytest.raises(TypeError, match=r"opacity: expected a number, got str '0.5'"):
        e.save(tmp_path / "z.png", opacity="0.5")
    assert not list(tmp_path.glob("z.*"))
    # an upper-case extension: numpy appended ".npz" to the path, so save returned a file it had not written
    path = e.save(tmp_path / "y.NPZ")
    assert sorted(p.name for p in tmp_path.glob("y*")) == ["y.NPZ"]
    np.testing.assert_allclose(nbx.replay(path, cnn, image=image).map, e.map, atol=1e-6)
    html_path = e.save(tmp_path / "x.html")
    with pytest.raises(ValueError, match=r"an \.html report.*replay the \.json, \.png or \.npz export"):
        nbx.replay(html_path, cnn)
    with pytest.raises(TypeError, match="model must be the torch.nn.Module.*got NoneType"):
        nbx.replay(doc, None)
    t = json.loads(nbx.attribute(cnn, torch.randn(1, 3, 64, 64), "saliency", target=2)[0].to_json())
    for cut in (8, 200):                                                            # a truncated .npy
        with pytest.raises(ValueError, match=r"input is corrupt"):
            nbx.replay(dict(t, input=dict(t["input"], data=t["input"]["data"][:cut])), cnn)
    with pytest.raises(ValueError, match=r"tensor parameter 'baseline' is corrupt"):
        nbx.replay(dict(doc, params=dict(doc["params"], baseline={"tensor": 5})), cnn)


def test_replay_says_when_the_same_weights_sit_in_another_architecture(cnn, batch):
    """Weights loaded into a sibling architecture (timm's efficientnet_lite0 pads unlike tf_efficientnet_lite0)
    pass the weights check but compute another map."""
    e = nbx.attribute(cnn, batch["images"][3], "saliency", target=2)
    doc = json.loads(e.to_json())
    with pytest.warns(UserWarning, match=r"computed with model 'other_net' and this is"):
        nbx.replay(dict(doc, model="other_net"), cnn)
    with pytest.warns(UserWarning, match=r"computed with nbexplain 0\.0\.1 and this is"):
        nbx.replay(dict(doc, versions=dict(doc["versions"], nbexplain="0.0.1")), cnn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nbx.replay(doc, cnn)


def test_replay_uses_the_batch_size_the_caller_chose(batch):
    """One sample per pass runs the model as defined, larger passes with BatchNorm folded (maps ~1e-3 apart on
    a ReLU6 net): an export made with batch_size=1 replays exactly only with it."""
    model = nbx.load_model()
    e = nbx.attribute(model, batch["images"][3], "integrated_gradients", steps=4, batch_size=1)
    assert e.meta["batch_size"] == 1
    np.testing.assert_array_equal(nbx.replay(e.to_json(), model).map, e.map)


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


# --- hostile input: every check refuses bad arguments up front and leaves the model as it was ---------
@pytest.fixture(scope="module")
def mixed():
    """A model in a state a restore bug would disturb: training mode with one frozen parameter."""
    model = nbx.load_model("synthetic-cnn").train()
    model.fc.bias.requires_grad_(False)
    return model


def _rejected(model, fn, error, pattern):
    """``fn()`` raises ``error`` matching ``pattern``, and another cell sees the model unchanged."""
    from conftest import assert_same_view, user_view
    before = user_view(model)
    with pytest.raises(error, match=pattern):
        fn()
    assert_same_view(user_view(model), before)


@pytest.mark.filterwarnings("ignore:methods disagree")
def test_randomization_and_agreement_take_one_image_and_say_how_to_run_several(mixed, batch):
    two = [batch["images"][0], batch["images"][1]]
    for images in (two, torch.randn(2, 3, 64, 64)):
        _rejected(mixed, lambda: trust.randomization_test(mixed, images, ["saliency"], groups=["fc"]),
                  ValueError, r"image: randomization_test takes one image, got 2; call it once per image in a loop")
        _rejected(mixed, lambda: trust.agreement(mixed, images, ["saliency", "gradcam"]),
                  ValueError, r"image: agreement takes one image, got 2; call it once per image in a loop")
    _rejected(mixed, lambda: trust.agreement(mixed, [], ["saliency", "gradcam"]), ValueError, r"image: .*empty")
    one = nbx.attribute(mixed, batch["images"][0], "saliency").input     # a (1,C,H,W) batch of one is one image
    assert trust.agreement(mixed, one, ["saliency", "gradcam"]).matrix.shape == (2, 2)
    assert trust.randomization_test(mixed, [batch["images"][0]], ["saliency"], groups=["fc"]).steps == ["fc"]


def test_method_lists_are_checked_before_any_map_is_computed(mixed, batch, monkeypatch):
    import sys

    def computed(*args, **kwargs):
        raise AssertionError("a map was computed before the method list was checked")
    for module in ("nbexplain.trust.agreement", "nbexplain.trust.randomization"):
        monkeypatch.setattr(sys.modules[module], "attribute", computed)
    img = batch["images"][0]
    _rejected(mixed, lambda: trust.randomization_test(mixed, img, [], groups=["fc"]),
              ValueError, r"methods: the list is empty; name at least one method, e\.g\. \['saliency'\]")
    _rejected(mixed, lambda: trust.agreement(mixed, img, []),
              ValueError, r"methods: agreement compares at least two methods, got 0; .*\['gradcam', 'saliency'\]")
    _rejected(mixed, lambda: trust.agreement(mixed, img, ["saliency"]),
              ValueError, r"methods: agreement compares at least two methods, got 1")
    for check in (trust.agreement, trust.randomization_test):
        _rejected(mixed, lambda: check(mixed, img, "saliency"),
                  TypeError, r"methods: expected a list of method names, got the string 'saliency'; "
                             r"wrap it: \['saliency'\]")
        _rejected(mixed, lambda: check(mixed, img, ["saliency", "saliency"]),
                  ValueError, r"methods: 'saliency' is listed twice; list each method once")
        _rejected(mixed, lambda: check(mixed, img, ["saliency", "gradcma"]), ValueError, r"Did you mean: 'gradcam'")


@pytest.mark.filterwarnings("ignore:methods disagree")
def test_a_pixel_baseline_on_a_bare_module_names_the_fixes_the_trust_checks_take():
    """IG's default baseline (black pixels) needs mean/std: the trust checks' error names the routes they
    take (preprocess=, as attribute takes it; a model loaded with its preprocessing; a baseline in model
    units), and each works."""
    def bare():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    m, x, pre = bare(), torch.randn(3, 16, 16), nbx.Preprocess(size=16)
    routes = r"pass preprocess=nbx\.Preprocess\(\.\.\.\) to this check, or load the model with " \
             r"nbx\.load_model\(model, preprocess=.*params=\{'integrated_gradients': \{'baseline': 'zeros'\}"
    for check in (lambda: trust.randomization_test(m, x, ["integrated_gradients"], groups=["4"]),
                  lambda: trust.agreement(m, x, ["saliency", "integrated_gradients"])):
        _rejected(m, check, ValueError, r"integrated_gradients: baseline='black' is defined in pixels.*" + routes)
    with pytest.raises(ValueError, match=r"pass preprocess=nbx\.Preprocess\(\.\.\.\) \(or .*nbx\.load_model"):
        nbx.attribute(m, x, "integrated_gradients")          # attribute itself does take preprocess=
    params = {"integrated_gradients": {"steps": 4}}
    assert trust.agreement(m, x, ["saliency", "integrated_gradients"], params=params,
                           preprocess=pre).matrix.shape == (2, 2)
    assert trust.randomization_test(m, x, ["integrated_gradients"], groups=["4"], params=params,
                                    preprocess=pre).steps == ["4"]
    zeros = {"integrated_gradients": {"baseline": "zeros", "steps": 4}}
    assert trust.agreement(m, x, ["saliency", "integrated_gradients"], params=zeros).matrix.shape == (2, 2)
    loaded = nbx.load_model(bare(), preprocess=pre)
    report = trust.randomization_test(loaded, x, ["integrated_gradients"], groups=["4"],
                                      params={"integrated_gradients": {"steps": 4}})
    assert report.steps == ["4"]


@pytest.mark.filterwarnings("ignore:methods disagree")
def test_the_trust_checks_take_the_preprocessing_a_picture_needs():
    """A plain module given a picture needs preprocess=, which the error advises: the checks take it, and
    an explorer opened with it hands it to its trust panel."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    pre = nbx.Preprocess(size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"pass preprocess=nbx\.Preprocess"):
        trust.agreement(m, picture, ["saliency", "gradcam"])
    assert trust.agreement(m, picture, ["saliency", "gradcam"], preprocess=pre).matrix.shape == (2, 2)
    report = trust.randomization_test(m, picture, ["saliency"], groups=["5"], preprocess=pre)
    assert report.steps == ["5"]
    w = nbx.explain(m, [picture], method="saliency", preprocess=pre)
    w.wait()
    panel = w.trust(methods=["saliency", "gradcam"], steps=4)
    panel.run()
    assert panel.error is None and panel.agreement.matrix.shape == (2, 2)
    w.close()
    # preprocess= goes to every method without hiding a params key no method uses
    with pytest.raises(ValueError, match=r"params: 'gradcam' is not among the methods tested"):
        trust.randomization_test(m, picture, ["saliency"], groups=["5"], preprocess=pre,
                                 params={"gradcam": {}})
    panel = nbx.TrustPanel(m, picture, ["saliency", "occlusion"], groups=["5"], preprocess=pre,
                           params={"gradcam": {}})
    assert panel.params["gradcam"] == {} and panel.params["saliency"] == {"preprocess": pre}


def test_randomization_refuses_groups_without_parameters_and_lists_those_with(mixed, batch):
    img = batch["images"][0]
    _rejected(mixed, lambda: trust.randomization_test(mixed, img, ["saliency"], groups=["act1"]),
              ValueError, r"groups: 'act1' has no parameters, so randomising it changes nothing; "
                          r"use groups with parameters: .*'fc'")
    _rejected(mixed, lambda: trust.randomization_test(mixed, img, ["saliency"], groups=["fcc"]),
              ValueError, r"groups: unknown module 'fcc'\. Did you mean: 'fc'.*trust\.layer_groups\(model\)")
    _rejected(mixed, lambda: trust.randomization_test(mixed, img, ["saliency"], groups="fc"),
              TypeError, r"groups: expected a list of module names, got the string 'fc'; wrap it: \['fc'\]")


def test_deletion_insertion_checks_its_arguments_up_front(mixed, batch):
    e = nbx.attribute(mixed, batch["images"][0], "saliency", target=3)
    for kw, error, pattern in [
            ({"steps": -1}, ValueError, r"steps=-1: expected a positive integer"),
            ({"steps": 0}, ValueError, r"steps=0: expected a positive integer"),
            ({"steps": 2.5}, TypeError, r"steps=2\.5: expected a positive integer"),
            ({"steps": True}, TypeError, r"steps=True: expected a positive integer"),
            ({"batch_size": 0}, ValueError, r"batch_size=0: expected a positive integer"),
            ({"batch_size": 1.5}, TypeError, r"batch_size=1\.5: expected a positive integer"),
            ({"saliency": np.full((64, 64), np.nan)}, ValueError, r"saliency: the map contains NaN or infinite"),
            ({"saliency": np.zeros((50, 60))}, ValueError, r"saliency: expected a map of shape \(64, 64\) .*"
                                                           r"model-input grid")]:
        _rejected(mixed, lambda: trust.deletion_insertion(mixed, e, **kw), error, pattern)
    _rejected(mixed, lambda: trust.deletion_insertion(mixed, e.map), TypeError,
              r"exp: expected an Attribution from nbx\.attribute, got ndarray")
    _rejected(mixed, lambda: trust.deletion_insertion(mixed, [e, e]), TypeError,
              r"exp: expected an Attribution .*got list; .*nbx\.explain_batch\(model, images, faithfulness=True\)")
    two_classes = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2)).train()
    with pytest.warns(UserWarning, match="other weights"):              # another model: said twice
        _rejected(two_classes, lambda: trust.deletion_insertion(two_classes, e), ValueError,
                  r"exp: its target 3 is out of range for this model's 2 classes; .*the model it was computed on")
    steps1 = trust.deletion_insertion(mixed, e, steps=1, batch_size=1)    # the smallest valid call still runs
    assert steps1.deletion.shape == (2,) and steps1.insertion.shape == (2,)


def test_deletion_insertion_refuses_an_attribution_of_a_model_with_other_channels():
    """An attribution of a 1-channel model given with a 4-channel one failed inside torch's conv; the same
    architecture with other weights is legitimate (fine-tuned since) but worth a warning."""
    import warnings

    def model(channels, seed=0):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
        return nbx.load_model(net, preprocess=nbx.Preprocess(size=16, mean=(0.5,) * channels, std=(0.5,) * channels))
    gray, four = model(1), model(4)
    e = nbx.attribute(gray, torch.randn(1, 16, 16), "saliency")
    _rejected(four, lambda: trust.deletion_insertion(four, e, steps=2), ValueError,
              r"exp: its input has 1 channel, but this model takes 4: the attribution was computed on another "
              r"model .*Pass the model it was computed on, or recompute it with nbx\.attribute\(model, \.\.\.\)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trust.deletion_insertion(gray, e, steps=2)                        # its own model: silent
    with pytest.warns(UserWarning, match=r"exp was computed with other weights than this model's"):
        curves = trust.deletion_insertion(model(1, seed=1), e, steps=2)
    assert curves.deletion.shape == (3,)


def test_shortcut_flags_refuse_mismatched_or_empty_input():
    a, b = np.zeros((8, 8)), np.ones((8, 8))
    with pytest.raises(ValueError, match=r"masks: got 1 masks for 2 maps; pass one mask per map"):
        trust.flag_outside([a, b], [b.astype(bool)])
    with pytest.raises(ValueError, match=r"maps: the list is empty; pass the maps of several images"):
        trust.fixed_hotspots([])
    with pytest.raises(ValueError, match=r"maps: shapes differ \(\(8, 8\), \(4, 4\)\); peaks are compared "
                                         r"in pixels, so resample the maps to one shape first"):
        trust.fixed_hotspots([a, np.zeros((4, 4)), b])
    with pytest.raises(ValueError, match=r"maps\[0\]: expected a 2-D \(H, W\) map with pixels, got shape \(8, 8, 3\)"):
        trust.fixed_hotspots([np.zeros((8, 8, 3))] * 2)
    with pytest.raises(ValueError, match=r"maps\[0\]: expected a 2-D \(H, W\) map with pixels, got shape \(0, 0\)"):
        trust.flag_outside([np.zeros((0, 0))], [np.zeros((0, 0), bool)])


def test_shortcut_flags_take_attributions_and_list_masks(cnn, batch):
    """What nbx.attribute returns raised AttributeError: 'Attribution' object has no attribute 'shape'."""
    exps = nbx.attribute(cnn, list(batch["images"][:3]), "saliency")
    masks = [np.ones(e.map.shape, int).tolist() for e in exps]
    assert trust.flag_outside(exps, masks).tolist() == trust.flag_outside([e.map for e in exps], masks).tolist()
    assert not trust.flag_outside(exps, masks).any()                     # the whole image is the object
    flags, _ = trust.fixed_hotspots(exps)
    assert flags.tolist() == trust.fixed_hotspots([e.map for e in exps])[0].tolist()


def test_deletion_insertion_of_a_one_logit_model_follows_its_sigmoid():
    """A softmax over one logit is always 1: the curves were flat, whatever the map."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 1)).eval()
    exp = nbx.attribute(model, torch.randn(3, 32, 32), "saliency")
    curves = trust.deletion_insertion(model, exp, steps=4)
    assert curves.deletion[0] == pytest.approx(exp.probs[0][2], abs=1e-5)
    assert 0 < curves.deletion.min() < 1 and len(set(np.round(curves.deletion, 6))) > 1


def test_constant_maps_point_nowhere():
    """argmax of a constant map is pixel (0, 0): it was read as a shared hotspot, and as a pointing-game hit."""
    flags, where = trust.fixed_hotspots([np.zeros((8, 8))] * 5)
    assert not flags.any() and where is None
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = True
    assert trust.pointing_game(np.zeros((8, 8)), mask) is False
    peak = np.zeros((8, 8))
    peak[0, 0] = 1.0
    assert trust.pointing_game(peak, torch.from_numpy(mask)) is True      # a torch mask is taken too


def test_a_wrapped_model_is_randomised_block_by_block(cnn):
    """A wrapper (a LightningModule's self.model) gave one group, 'model', randomised all at once."""
    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = cnn

        def forward(self, x):
            return self.model(x)

    assert trust.layer_groups(Wrap()) == ["model." + g for g in trust.layer_groups(cnn)]
    assert len(trust.layer_groups(cnn)) > 3


def test_similarity_of_maps_of_different_shapes_is_refused_clearly():
    """ssim raised torch's size mismatch and spearman numpy's, deep inside."""
    for f in (trust.ssim, trust.spearman):
        with pytest.raises(ValueError, match=r"shapes \(4, 4\) and \(5, 5\) differ"):
            f(np.random.rand(4, 4), np.random.rand(5, 5))


def test_maps_of_a_photo_are_compared_where_the_model_saw_it(cnn):
    """A wide photo's map is zero outside the model's centre crop (half of it here): counted, those pixels
    agreed between any two maps, and the default model's saliency failed the randomisation test on the
    bundled cat photo (Spearman 0.89 where the crop gives 0.15)."""
    img = make_batch(1, seed=3)["images"][0]
    noise = np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    wide = np.concatenate([noise, img, noise[:, ::-1]], 1)
    methods = ["saliency", "gradcam"]
    assert nbx.attribute(cnn, wide, "saliency").meta["crop_box"] == [32.0, 0.0, 96.0, 64.0]
    agree = {name: trust.agreement(cnn, pic, methods).matrix[0, 1] for name, pic in (("wide", wide), ("seen", img))}
    assert agree["wide"] == pytest.approx(agree["seen"], abs=1e-3)
    groups = ["fc", "layer4"]
    rand = {name: trust.randomization_test(cnn, pic, ["saliency"], groups=groups).scores["saliency"]["spearman_abs"]
            for name, pic in (("wide", wide), ("seen", img))}
    np.testing.assert_allclose(rand["wide"], rand["seen"], atol=1e-3)


def test_spearman_gives_tied_values_their_average_rank():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
    a[:, :12] = b[:, :12] = 0                             # a shared ReLU'd area
    a[0, 12:] = 3.0                                       # and ties of another value
    assert trust.spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)


def test_the_compared_region_is_where_the_map_is_placed_on_the_photo():
    """The crop box's edges were rounded one way to place the map and another to pick the compared region:
    a row or column of zeros was compared, or one of the map left out (2 of 3 photo sizes)."""
    from nbexplain.images import crop_slices, to_original_grid
    pre = nbx.Preprocess(size=224)
    for h, w in [(200, 200), (200, 207), (333, 500), (481, 641), (1000, 75)]:
        _, box = pre(Image.new("RGB", (w, h)))
        filled = to_original_grid(np.ones((224, 224), np.float32), box, (h, w)) > 0
        region = np.zeros((h, w), bool)
        region[crop_slices(box)] = True
        assert np.array_equal(filled, region), (h, w, box)
