"""The explorer's pipeline: each control re-runs only the stages it touches."""
from __future__ import annotations

import random

import numpy as np
import pytest
import traitlets as t
import torch

import nbexplain as nbx
from nbexplain.synthetic import make_batch


@pytest.fixture(scope="module")
def cnn():
    return nbx.load_model("synthetic-cnn")


@pytest.fixture(scope="module")
def vit():
    return nbx.load_model("synthetic-vit")


@pytest.fixture
def images():
    return list(make_batch(3, seed=3)["images"])


def ran(w) -> set[str]:
    return {s["name"] for s in w.stages if s["ran"]}


def stage(w, name) -> dict:
    return next(s for s in w.stages if s["name"] == name)


def change(w, **traits):
    for k, v in traits.items():
        setattr(w, k, v)
    w.wait()
    return ran(w)


def test_first_update_runs_every_stage_and_shows_the_result(cnn, images):
    w = nbx.explain(cnn, images)
    w.wait()
    assert ran(w) == {"image", "preprocess", "forward", "workspace", "attribution", "display"}
    assert w.result.method == "gradcam" and w.result.map.shape == (64, 64)
    assert w.view._map["shape"] == [64, 64] and w.view._map["dtype"] == "float32"
    assert len(bytes(w.view._map["data"])) == 64 * 64 * 4          # raw float32, not PNG/base64
    assert np.allclose(np.frombuffer(bytes(w.view._map["data"]), np.float32).reshape(64, 64),
                       w.result.map * w.result.scale, atol=1e-5)
    assert len(w.view._predictions) == 4 and w.layer_used == "layer2"
    w.close()


@pytest.mark.parametrize("trait,value", [("opacity", 0.1), ("colormap", "viridis"), ("sign", "absolute"),
                                         ("clip", 95.0), ("zoom", 3)])
def test_view_controls_run_no_kernel_stage(cnn, images, trait, value):
    w = nbx.explain(cnn, images)
    w.wait()
    before = w.view._generation
    assert change(w, **{trait: value}) == set()
    assert w.view._generation == before                             # no request was even queued
    w.close()


def test_layer_switch_for_a_cam_runs_no_model_pass(cnn, images):
    w = nbx.explain(cnn, images, method="gradcam")
    w.wait()
    for layer in ("layer1", "layer3", "layer4", "layer2"):
        assert change(w, layer=layer) == {"attribution", "display"}
        assert stage(w, "attribution")["evaluations"] == 0
        assert w.layer_used == layer and w.result.raw.shape[1:] == {"layer1": (16, 16), "layer2": (8, 8),
                                                                  "layer3": (4, 4), "layer4": (2, 2)}[layer]
    # switching between CAM methods at a layer reuses the same capture too
    assert change(w, method="layercam") == {"attribution", "display"}
    assert stage(w, "attribution")["evaluations"] == 0
    w.close()


def test_view_settings_set_from_python_are_checked_when_set(cnn, images):
    """The view is drawn in the browser: a bad colormap, sign or NaN opacity set from Python was accepted
    silently and only failed in an export."""
    import traitlets
    w = nbx.explain(cnn, images, method="saliency")
    with pytest.raises(ValueError, match=r"colormap: unknown 'nope'; use one of .*viridis"):
        w.colormap = "nope"
    with pytest.raises(ValueError, match=r"sign: unknown 'bogus'; use auto or one of .*signed"):
        w.sign = "bogus"
    for name in ("opacity", "clip"):
        with pytest.raises(traitlets.TraitError, match=rf"{name}: NaN"):
            setattr(w, name, float("nan"))
    w.colormap, w.sign, w.opacity = "viridis", "signed", 0.3
    assert (w.colormap, w.sign, w.opacity) == ("viridis", "signed", 0.3)
    w.close()


def test_a_closed_or_failed_explorer_says_so(cnn, images, tmp_path):
    """Closing mid-compute left wait() returning None with status 'busy' forever, and a control set after
    close raised the executor's 'cannot schedule new futures'; the export bar saved the previous result
    after a failed request, and a folder that is a file raised FileExistsError."""
    from nbexplain.export_bar import export_bar
    w = nbx.explain(cnn, images, method="saliency")
    w.wait()
    w.method, w.layer = "gradcam", "nope"
    with pytest.raises(ValueError):
        w.wait()
    with pytest.raises(RuntimeError, match="last request failed"):
        export_bar(w, tmp_path).save("json")
    w.layer = ""
    w.wait()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        export_bar(w, tmp_path / "a_file").save("png")
    w.close()

    busy = nbx.explain(cnn, images, method="integrated_gradients", steps=512)
    busy.close()
    busy.wait(5)                                 # returns at once
    assert busy.status == "closed"
    with pytest.raises(RuntimeError, match="it is closed.*nbx.explain"):
        busy.method = "saliency"
    with pytest.raises(RuntimeError, match="explorer is closed"):
        export_bar(busy, tmp_path).save("json")


def test_an_export_right_after_a_change_never_saves_the_previous_map(cnn, images, tmp_path):
    """``status`` turns busy only when the worker picks a request up: an export in between saved the old
    method's map (20 times in 20)."""
    from nbexplain.export_bar import export_bar
    import threading
    w = nbx.explain(cnn, images, method="gradcam")
    w.wait()
    bar = export_bar(w, tmp_path)
    session, evaluate, go = w.view._session, w.view._session.evaluate, threading.Event()
    session.evaluate = lambda *a, **k: go.wait(60) and evaluate(*a, **k)    # the worker holds until told
    for i in range(4):
        go.clear()
        w.method = "saliency" if i % 2 == 0 else "gradcam"
        with pytest.raises(RuntimeError, match="still computing"):
            bar.save("json")
        go.set()
        w.wait()
        assert not w.view.computing and bar.save("json").rsplit("/", 1)[-1].startswith(w.method)
    w.close()


def test_a_superseded_request_leaves_the_shown_image_to_the_latest_one(cnn, images):
    """A request superseded after its last progress report (here while it makes the new image's pixels)
    noted that image as shown: the next request for it then sent no pixels, predictions or layers, and
    the frontend drew image 0 under image 1's map."""
    w = nbx.explain(cnn, images, method="gradcam")
    w.wait()
    session, real_pixels = w.view._session, w.view._session.pixels

    def pixels_then_a_new_target(shown):          # the frontend's next message lands at this moment
        if w.target != 2:
            w.target = 2
        return real_pixels(shown)
    session.pixels = pixels_then_a_new_target
    w.image = 1
    w.wait()
    session.pixels = real_pixels
    shown = np.frombuffer(bytes(w.view._image["data"]), np.uint8).reshape(w.view._image["shape"])[..., :3]
    assert np.abs(shown.astype(int) - images[1].astype(int)).mean() < 2, "image 0's pixels under image 1's map"
    fresh = nbx.explain(cnn, images, method="gradcam", image=1, target=2)
    fresh.wait()
    assert w.view._predictions == fresh.view._predictions and w.result.target == 2
    w.close(), fresh.close()


def test_a_layer_set_as_a_module_becomes_its_name(cnn, images):
    """``nbx.explain(..., layer=module)`` was accepted but ``w.layer = module`` raised a bare TraitError."""
    import copy
    w = nbx.explain(cnn, images, method="gradcam", layer=cnn.layer1)
    w.wait()
    assert w.layer == "layer1"
    w.layer = cnn.layer3
    w.wait()
    assert w.layer == "layer3" and w.layer_used == "layer3"
    with pytest.raises(ValueError, match="not a module of this model"):
        w.layer = copy.deepcopy(cnn.layer3)
    assert w.layer == "layer3"
    w.close()


def test_cam_results_equal_the_direct_api(cnn, images):
    w = nbx.explain(cnn, images, method="xgradcam", layer=cnn.layer3, target=2)   # a module works as a name
    w.wait()
    assert w.layer == w.layer_used == "layer3"
    direct = nbx.attribute(cnn, images[0], "xgradcam", layer="layer3", target=2)
    torch.testing.assert_close(w.result.raw, direct.raw, rtol=1e-5, atol=1e-6)
    w.close()


def test_target_switch_reuses_the_forward_pass(cnn, images):
    w = nbx.explain(cnn, images)
    w.wait()
    assert change(w, target=3) == {"workspace", "attribution", "display"}
    assert not stage(w, "forward")["ran"] and w.result.target == 3


def test_ig_steps_32_to_64_computes_only_the_new_points(cnn, images):
    w = nbx.explain(cnn, images, method="integrated_gradients", steps=32)
    w.wait()
    assert w.rule == "riemann_right"
    first = stage(w, "attribution")["evaluations"]
    assert first == 32 + 1                                          # 32 points + f(baseline)
    assert change(w, steps=64) == {"attribution", "display"}
    assert stage(w, "attribution")["evaluations"] == 32           # only the 32 new points
    direct = nbx.attribute(cnn, images[0], "integrated_gradients", steps=64, rule="riemann_right")
    torch.testing.assert_close(w.result.raw, direct.raw, rtol=1e-4, atol=1e-6)
    assert w.delta == pytest.approx(direct.delta, abs=1e-4)
    assert change(w, steps=32) == set()                            # going back: the 32-step map is cached
    w.close()


def test_ig_auto_on_a_relu_net_takes_the_adaptive_rule_and_reuses_the_grid_it_had(cnn, images):
    """The widget's Riemann-right grids can meet the delta on a ReLU net with the map far off: 'auto' takes
    the adaptive rule there, and its dyadic points include those of the 32-step grid already computed."""
    w = nbx.explain(cnn, images, method="integrated_gradients", steps=32)
    w.wait()
    assert change(w, steps="auto") == {"attribution", "display"}
    assert w.result.meta["quadrature"] == "adaptive_simpson" and w.rule == "riemann_right"
    points, evaluated = w.result.meta["steps"], stage(w, "attribution")["evaluations"]
    assert points > 32 and evaluated < points - 16      # most of the 32 grid's points were reused
    direct = nbx.attribute(cnn, images[0], "integrated_gradients", steps="auto")
    assert direct.meta["steps"] == points
    torch.testing.assert_close(w.result.raw, direct.raw, rtol=1e-3, atol=1e-3 * float(direct.raw.abs().max()))
    w.close()


def test_smoothgrad_more_samples_adds_only_the_new_ones(cnn, images):
    w = nbx.explain(cnn, images, method="smoothgrad", samples=25, noise=0.15, seed=7)
    w.wait()
    assert stage(w, "attribution")["evaluations"] == 25
    assert change(w, samples=50) == {"attribution", "display"}
    assert stage(w, "attribution")["evaluations"] == 25
    direct = nbx.attribute(cnn, images[0], "smoothgrad", samples=50, noise=0.15, seed=7)
    torch.testing.assert_close(w.result.raw, direct.raw, rtol=1e-4, atol=1e-6)
    change(w, noise=0.3)                                            # new noise level: a fresh set
    assert stage(w, "attribution")["evaluations"] == 50
    w.close()


def test_layer_change_does_not_rerun_a_pixel_method(cnn, images):
    w = nbx.explain(cnn, images, method="integrated_gradients", steps=8)
    w.wait()
    assert change(w, layer="layer1") == set()
    w.close()


def test_vit_attention_methods_share_one_capture(vit, images):
    w = nbx.explain(vit, images, method="attention_rollout")
    w.wait()
    assert "workspace" in ran(w)
    for k, v in [("discard_ratio", 0.5), ("fusion", "max"), ("method", "grad_rollout"), ("method", "attention")]:
        assert change(w, **{k: v}) == {"attribution", "display"}
        assert stage(w, "attribution")["evaluations"] == 0
    assert w.result.raw.shape[1:] == (8, 8)
    w.close()


def test_compare_shows_up_to_four_methods(cnn, images):
    w = nbx.explain(cnn, images, compare=["gradcam", "saliency", "occlusion"])
    w.wait()
    assert [c["method"] for c in w.view._compare_maps] == ["gradcam", "saliency", "occlusion"]
    assert all(c["map"]["shape"] == [64, 64] for c in w.view._compare_maps)
    w.compare = ["gradcam"] * 5
    with pytest.raises(ValueError, match="at most 4"):
        w.wait()
    w.close()


def test_errors_reach_the_widget_and_the_caller(cnn, images):
    w = nbx.explain(cnn, images)
    w.wait()
    w.layer = "layer9"
    with pytest.raises(ValueError, match="layer"):
        w.wait()
    assert w.status == "error" and "layer9" in w.error and "Did you mean" in w.error
    assert w.layer_used == ""               # no stale "layer9 → used layer3" beside the error
    outputs = w.errors.outputs
    assert any("layer9" in o.get("text", "") for o in outputs)
    w.layer = "layer3"
    w.wait()                                                        # recovers
    assert w.status == "idle" and w.error == ""
    w.close()


def test_out_of_range_controls_are_refused_by_name(cnn, images):
    import traitlets
    w = nbx.explain(cnn, images)
    w.wait()
    w.target = 5000
    with pytest.raises(ValueError, match=r"target=5000 is out of range: the model has \d+ classes"):
        w.wait()
    w.target = -2                                # only -1 means the predicted class, as in nbx.attribute
    with pytest.raises(ValueError, match=r"target=-2 is out of range.*-1: the predicted class"):
        w.wait()
    w.target = -1
    w.wait()
    for name, value in (("opacity", 2.0), ("opacity", -0.1), ("clip", 101.0), ("zoom", 0)):
        with pytest.raises(traitlets.TraitError, match=name):
            setattr(w, name, value)
    for bad in (dict(opacity=2.0), dict(opacity=float("nan")), dict(clip=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            w.result.save(f"/tmp/nbx-never-{next(iter(bad))}.png", **bad)
    w.close()


def test_a_frontend_value_a_control_cannot_hold_shows_in_the_widget(cnn, images):
    w = nbx.explain(cnn, images, method="gradcam")
    w.wait()
    sent = []
    w.view.send_state = lambda key=None: sent.append(key)
    w.view.set_state({"method": "saliency", "target": "tabby"})   # as a frontend message would carry it
    assert w.status == "error" and "target" in w.error
    assert any("target" in o.get("text", "") for o in w.errors.outputs)
    assert (w.method, w.target) == ("gradcam", -1)                # the whole message is rolled back
    assert sent and set(sent[-1]) == {"method", "target"}          # and the frontend gets the kept values
    w.view.set_state({"target": 1})
    w.wait()
    assert w.status == "idle" and w.error == "" and w.result.target == 1
    w.close()


def test_unknown_control_is_rejected(cnn, images):
    with pytest.raises(TypeError, match="unexpected keyword 'stpes'"):
        nbx.explain(cnn, images, stpes=3)
    with pytest.raises(ValueError, match=r"cache_bytes=-1: expected a positive integer \(bytes of results"):
        nbx.explain(cnn, images, cache_bytes=-1)


def test_rapid_changes_end_in_the_state_of_the_last(cnn, images):
    w = nbx.explain(cnn, images, method="gradcam")
    w.wait()
    layers = ["layer1", "layer2", "layer3"]
    rng = random.Random(0)
    for i in range(1000):
        w.layer = layers[i % 3]
        w.target = rng.randrange(4)
    w.layer, w.target = "layer1", 2
    w.wait()
    assert w.result.target == 2 and w.result.meta["layer"] == "layer1"
    assert w.view._map["target"] == 2
    direct = nbx.attribute(cnn, images[0], "gradcam", layer="layer1", target=2)
    torch.testing.assert_close(w.result.raw, direct.raw, rtol=1e-5, atol=1e-6)
    w.close()


def test_cache_stays_within_its_budget_on_a_random_walk(cnn, images):
    budget = 3 * 2**20
    w = nbx.explain(cnn, images, cache_bytes=budget)
    rng = random.Random(1)
    moves = [("method", ["gradcam", "layercam", "saliency", "smoothgrad", "integrated_gradients", "occlusion"]),
             ("layer", ["layer1", "layer2", "layer3"]), ("target", [-1, 0, 1, 2, 3]), ("image", [0, 1, 2]),
             ("samples", [2, 4, 6]), ("steps", [4, 8, 16]), ("noise", [0.1, 0.2])]
    for _ in range(60):
        name, values = rng.choice(moves)
        setattr(w, name, rng.choice(values))
        w.wait()
        assert w.cache.bytes <= budget
    w.close()
    assert w.cache.bytes == 0 and len(w.cache) == 0


def test_pipeline_graph_can_be_printed_and_drawn(cnn, images):
    w = nbx.explain(cnn, images)
    text = w.pipeline.describe()
    assert text.index("preprocess") < text.index("forward") < text.index("attribution") < text.index("display")
    assert '"forward" -> "workspace"' in w.pipeline.dot()
    w.close()


def test_model_version_bump_recomputes(cnn, images):
    w = nbx.explain(cnn, images)
    w.wait()
    assert change(w, model_version=1) >= {"preprocess", "forward", "workspace", "attribution"}
    w.close()


def test_weights_changed_in_place_recompute_a_cached_setting(images):
    model = nbx.load_model("synthetic-cnn")
    w = nbx.explain(model, images)
    w.wait()
    change(w, layer="layer1")
    with torch.no_grad():
        next(model.parameters()).mul_(2)                            # training, randomisation...
    assert change(w, layer="") >= {"preprocess", "forward", "workspace", "attribution", "display"}
    # through .data no version counter moves (a hand-written SGD step): the values still tell
    change(w, layer="layer1")
    for p in model.parameters():
        p.data -= 0.05 * torch.randn_like(p)
    assert change(w, layer="") >= {"preprocess", "forward", "workspace", "attribution", "display"}
    # one class's head row zeroed through a numpy view (an ablation), none of whose values a sample of a
    # few per tensor would read
    change(w, layer="layer1")
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.detach().numpy()[w.result.target, 8:-8] = 0
    assert change(w, layer="") >= {"preprocess", "forward", "workspace", "attribution", "display"}
    fresh = nbx.attribute(model, images[0], w.method, layer=w.layer_used)
    np.testing.assert_allclose(w.result.map, fresh.map, atol=1e-5)
    assert w.result.meta["weights_sha256"] == fresh.meta["weights_sha256"]
    # a layer not shown since the edit: its first evaluation runs under the old fingerprint, then again
    head.weight.detach().numpy()[w.result.target, :8] = 0
    assert change(w, layer="layer2") >= {"preprocess", "forward", "workspace", "attribution", "display"}
    fresh = nbx.attribute(model, images[0], w.method, layer="layer2")
    np.testing.assert_allclose(w.result.map, fresh.map, atol=1e-5)
    assert w.result.meta["weights_sha256"] == fresh.meta["weights_sha256"]
    w.close()


def test_a_hook_added_or_removed_recomputes_a_cached_setting(images):
    model = nbx.load_model("synthetic-cnn")
    w = nbx.explain(model, images, method="saliency")
    w.wait()
    shown, other = w.result.target, (w.result.target + 1) % 4
    change(w, target=shown)
    before = w.result.map.copy()
    change(w, target=other)
    handle = model.layer1.register_forward_hook(lambda m, i, o: o * 0.5)    # the user ablates a layer
    assert change(w, target=shown) >= {"forward", "attribution"}            # was cached before the hook
    np.testing.assert_allclose(w.result.map, nbx.attribute(model, images[0], "saliency", target=shown).map,
                               atol=1e-5)
    assert not np.allclose(w.result.map, before, atol=1e-3)
    handle.remove()
    assert change(w, target=other) >= {"forward", "attribution"}
    assert "attribution" in change(w, target=shown)
    np.testing.assert_allclose(w.result.map, before, atol=1e-5)
    # a hook on every module (torch's global registry) changes the maps as well
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: o.clamp(max=0.05) if isinstance(m, torch.nn.ReLU) else None)
    try:
        assert change(w, target=other) >= {"forward", "attribution"}
        change(w, target=shown)
        assert not np.allclose(w.result.map, before, atol=1e-3)
    finally:
        handle.remove()
    w.close()


def test_reselecting_a_cached_setting_reads_the_weights_once(cnn, images):
    w = nbx.explain(cnn, images)
    w.wait()
    change(w, layer="layer1")
    session, calls = w.view._session, []
    refresh = session.private.refresh                               # the walk over the weights
    session.private.refresh = lambda: calls.append(1) or refresh()
    assert change(w, layer="") == set()
    assert len(calls) == 1                                          # not once per model-dependent stage
    w.close()


def test_large_images_are_shown_at_display_resolution(cnn):
    from PIL import Image
    from nbexplain.session import DISPLAY_MAX_SIDE
    small = make_batch(1, seed=4)["images"][0]
    big = np.asarray(Image.fromarray(small).resize((3 * DISPLAY_MAX_SIDE // 2, DISPLAY_MAX_SIDE)))
    w = nbx.explain(cnn, [big])
    w.wait()
    height, width = DISPLAY_MAX_SIDE * 2 // 3, DISPLAY_MAX_SIDE
    assert w.view._map["shape"] == [height, width] and w.view._image["shape"] == [height, width, 4]
    shown = np.frombuffer(bytes(w.view._map["data"]), np.float32).reshape(height, width)
    assert np.isnan(shown[:, :width // 8]).all() and np.isnan(shown[:, -width // 8:]).all()   # outside the crop
    assert np.isfinite(shown[:, width // 4:-width // 4]).all()
    assert w.result.map.shape == (DISPLAY_MAX_SIDE, 3 * DISPLAY_MAX_SIDE // 2)   # the result keeps full size
    w.close()


def test_pixels_outside_the_models_crop_carry_no_attribution(cnn):
    wide = np.concatenate([make_batch(1, seed=4)["images"][0]] * 2, axis=1)[:, :96]   # 64 x 96
    w = nbx.explain(cnn, [wide])
    w.wait()
    shown = np.frombuffer(bytes(w.view._map["data"]), np.float32).reshape(w.view._map["shape"])
    assert shown.shape == (64, 96)
    assert np.isnan(shown[:, :8]).all() and np.isnan(shown[:, -8:]).all()      # centre crop keeps x 16..80
    assert np.isfinite(shown[:, 20:76]).all()
    assert w.result.meta["crop_box"] == [16.0, 0.0, 80.0, 64.0]
    w.close()


def test_shared_tensors_count_once_in_the_cache_budget():
    from nbexplain.pipeline import ByteLRU, nbytes
    t = torch.zeros(1000)                                            # 4,000 bytes
    assert nbytes((t,)) == nbytes((t, t, [t[10:]])) == 4000
    cache = ByteLRU(10_000)
    cache.put("small", torch.zeros(100))
    cache.put("huge", torch.zeros(10_000))                           # alone over budget: not kept...
    assert "huge" not in cache and cache.bytes <= 10_000
    cache.put("small2", torch.zeros(100))
    assert "small2" in cache


def test_a_stage_that_grows_its_input_has_it_recounted():
    from nbexplain.pipeline import ByteLRU, Graph, Stage
    cache = ByteLRU(10**6)
    graph = Graph([Stage("workspace", (), lambda s: (), lambda s, up: []),
                   Stage("use", ("workspace",), lambda s: (s["n"],),
                         lambda s, up: up["workspace"].append(torch.zeros(s["n"])) or s["n"],
                         grows=("workspace",))], cache)
    graph.evaluate("use", {"n": 1000})
    before = cache.bytes
    graph.evaluate("use", {"n": 2000})
    assert cache.bytes - before == 2000 * 4 + 64                    # the workspace's growth + the new entry
    with pytest.raises(ValueError, match="grow"):
        Graph([Stage("a", (), lambda s: (), lambda s, up: 0, grows=("b",))], cache)


def test_a_workspace_is_recounted_only_when_a_stage_wrote_to_it(monkeypatch):
    from nbexplain import pipeline
    from nbexplain.pipeline import ByteLRU, Graph, Stage, Workspace
    measured = []
    nbytes = pipeline.nbytes
    monkeypatch.setattr(pipeline, "nbytes", lambda v: measured.append(v) or nbytes(v))
    cache = ByteLRU(10**6)

    def use(s, up):
        if s["add"]:
            up["workspace"][s["n"]] = torch.zeros(s["n"])
        return s["n"]
    graph = Graph([Stage("workspace", (), lambda s: (), lambda s, up: Workspace()),
                   Stage("use", ("workspace",), lambda s: (s["n"], s["add"]), use, grows=("workspace",))], cache)
    graph.evaluate("use", {"n": 1000, "add": True})
    before = cache.bytes
    graph.evaluate("use", {"n": 2000, "add": True})
    assert cache.bytes - before >= 2000 * 4                         # recounted: it grew
    measured.clear()
    before = cache.bytes
    graph.evaluate("use", {"n": 3000, "add": False})
    assert not any(isinstance(v, Workspace) for v in measured)     # read only: not walked again
    assert cache.bytes - before == nbytes(3000)                     # just the new entry


def test_resnet_sized_cam_workspace_stays_cached(images):
    import timm
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    w = nbx.explain(model, images, preprocess=nbx.Preprocess(size=224, mean=(0.5,) * 3, std=(0.5,) * 3),
                    labels=list("abcd"), cache_bytes=256 * 2**20)
    w.wait()
    for layer in ("layer3", "layer4", "layer1"):                      # the capture of every layer is kept
        assert change(w, layer=layer) == {"attribution", "display"}
        assert stage(w, "attribution")["evaluations"] == 0
    w.close()


def test_image_pixels_are_sent_only_when_the_image_changes(cnn, images):
    w = nbx.explain(cnn, images)
    w.wait()
    sent = []
    w.view.observe(lambda change: sent.append(change["name"]), names=["_image", "_map"])
    change(w, method="layercam")
    change(w, target=(w.result.target + 1) % 4)
    assert sent == ["_map", "_map"]
    change(w, image=1)
    assert "_image" in sent and sent[-1] == "_map"
    w.close()


def test_attribute_while_a_widget_computes_on_the_same_model(images):
    """Hooks are module state: a notebook call during a widget's background work must not mix them."""
    from concurrent.futures import ThreadPoolExecutor
    model = nbx.load_model("synthetic-cnn")                          # fresh: its layer probe is not cached
    batch = list(make_batch(8, seed=0)["images"])
    expected = [nbx.attribute(nbx.load_model("synthetic-cnn"), im, "gradcam").raw for im in batch]
    with ThreadPoolExecutor(4) as pool:
        widgets = [pool.submit(nbx.explain, model, images, method=m, compare=["saliency"])
                   for m in ("gradcam", "layercam", "integrated_gradients")]
        results = [pool.submit(nbx.attribute, model, batch, "gradcam") for _ in range(3)]
        for r in results:
            for got, want in zip(r.result(), expected):
                torch.testing.assert_close(got.raw, want, rtol=1e-5, atol=1e-6)
        for w in widgets:
            w.result().wait()
            w.result().close()
    from nbexplain.hygiene import hook_count
    assert hook_count(model) == 0


def test_the_cache_counts_an_attribution_run_by_its_tensors():
    """The widget's cache is bounded in bytes: a computed run must weigh what its tensors hold."""
    from nbexplain.api import Run
    from nbexplain.pipeline import nbytes
    raw = torch.zeros(1, 3, 224, 224)
    run = Run(None, {}, raw, torch.zeros(1, dtype=torch.long), torch.zeros(1, 1000), {}, {}, torch.device("cpu"))
    assert nbytes(run) >= raw.nbytes + 1000 * 4


@pytest.mark.parametrize("copyable", [True, False], ids=["deepcopy", "holds-a-lock"])
def test_another_cell_sees_the_model_as_the_user_left_it_while_the_widget_computes(images, monkeypatch, copyable):
    """The widget computes in a background thread: a cell that saves, trains or inspects the model
    meanwhile must see its own state_dict (not folded weights), its requires_grad and train flags, no
    hooks; a change made meanwhile is kept, and the maps follow the model's current weights. A model that
    deepcopy refuses (it holds a lock) gets a copy of its module tree: it used to be computed on itself."""
    import threading
    from conftest import assert_same_view, user_view
    from nbexplain.context import Context
    model = nbx.load_model("synthetic-cnn").train()
    if not copyable:
        model.lock = threading.Lock()
    model.fc.weight.requires_grad_(False)
    before, passes = user_view(model), []
    real = Context.forward

    def forward(ctx, xs):           # every pass of the widget checks what the user sees meanwhile
        passes.append(ctx.model is not model)
        assert_same_view(user_view(model), before)
        return real(ctx, xs)
    monkeypatch.setattr(Context, "forward", forward)
    w = nbx.explain(model, images, method="integrated_gradients", steps=8)
    w.wait()
    change(w, method="gradcam")
    assert passes and all(passes)
    monkeypatch.setattr(Context, "forward", real)

    model.layer1.requires_grad_(False)                          # the user's own change, kept
    change(w, method="saliency")
    assert not any(p.requires_grad for p in model.layer1.parameters()) and model.training
    for edit in (lambda: model.fc.weight.mul_(-1), lambda: setattr(model.fc.weight, "data", model.fc.weight * 3)):
        with torch.no_grad():
            edit()                                              # in place (training) or rebound (.data =)
        change(w, layer="layer1")
        direct = nbx.attribute(model, images[w.image], "saliency", target=w.target if w.target >= 0 else None)
        np.testing.assert_allclose(w.result.map, direct.map, rtol=1e-5, atol=1e-6)
    w.close()


def test_a_low_precision_vit_runs_pixel_methods_in_the_widget(images):
    """The widget hands the model its float32 logits; the ViT tail check compares them with the bf16
    model's own (it failed with 'BFloat16 did not match Float')."""
    model = nbx.load_model("synthetic-vit").to(torch.bfloat16)
    w = nbx.explain(model, images, method="integrated_gradients", steps=4)
    w.wait()
    assert np.isfinite(w.result.map).all() and w.result.map.max() > 0
    w.close()


def test_the_package_functions_named_like_their_modules_stay_callable(cnn, images, tmp_path):
    """Opening an explorer imports nbexplain.export_bar, which made nbx.export_bar the module (and
    nbx.gallery after its first use): 'module' object is not callable."""
    import nbexplain.export_bar  # noqa: F401  (what the explorer does)
    import nbexplain.gallery  # noqa: F401
    w = nbx.explain(cnn, images, method="saliency")
    w.wait()
    path = nbx.export_bar(w, tmp_path).save("json")
    assert str(path).endswith(".json")
    g = nbx.gallery(cnn, images, "saliency", progress=False)
    assert len(g.result.items) == len(images)
    w.close()
    g.close()


def test_the_target_takes_a_class_name_as_attribute_does(cnn, images):
    names = [f"class {i}" for i in range(4)]
    w = nbx.explain(cnn, images, method="saliency", labels=names, target="class 3")
    w.wait()
    assert w.target == 3 and w.result.target == 3 and w.result.label == "class 3"
    w.target = "Class 2"
    w.wait()
    assert w.target == 2 and w.result.label == "class 2"
    with pytest.raises(t.TraitError, match="no class of that name"):
        w.target = "class 9"
    assert w.target == 2
    w.close()
