"""The trust panel (randomisation, deletion/insertion, agreement, warnings) and the explorer's export bar."""
from __future__ import annotations

import datetime
import html
import os
import re

import numpy as np
import pytest
from PIL import Image

import nbexplain as nbx
from nbexplain.export_bar import ExportBar, export_bar, file_name
from nbexplain.synthetic import make_batch
from nbexplain.trust import layer_groups
from nbexplain.trust.panel import TrustPanel


@pytest.fixture(scope="module")
def cnn():
    return nbx.load_model("synthetic-cnn")


@pytest.fixture(scope="module")
def image():
    return make_batch(2, seed=31)["images"][0]


def test_run_fills_every_plot_and_states_pass_fail_with_the_threshold(cnn, image, edge_foil):
    methods = ["gradcam", "saliency", edge_foil]
    panel = TrustPanel(cnn, image, methods=methods)
    assert len(panel.random_lines.x) == 0 and "Press Run checks" in panel.reading.value
    assert panel.run() is panel
    groups = layer_groups(cnn)[::-1]
    # randomisation: one line per method over the layer groups (top first), and the threshold line
    assert list(panel.random_lines.x) == ["original", *groups] and panel.random_lines.y.shape == (3, len(groups) + 1)
    assert np.allclose(panel.random_lines.y[:, 0], 1)
    np.testing.assert_allclose(panel.random_lines.y[:, 1:], [panel.report.scores[m]["spearman_abs"] for m in methods])
    assert list(panel.threshold_line.y) == [0.5, 0.5]
    assert panel.report.passed == {"gradcam": True, "saliency": True, edge_foil: False}
    assert [s.split(":")[1].strip() for s in panel.random_lines.labels] == ["PASS", "PASS", "FAIL"]
    text = panel.reading.value
    assert "PASS" in text and "FAIL" in text and f"below <b>0.5</b> once all {len(groups)} layer groups" in text
    # deletion and insertion: every method plus a random ranking, AUC in the legend
    for marks, kind in ((panel.deletion_lines, "deletion"), (panel.insertion_lines, "insertion")):
        assert len(marks) == 4
        for mark, name in zip(marks, methods + ["random"]):
            assert len(mark.x) == len(mark.y) == 21
            auc = getattr(panel.curves[name], f"{kind}_auc")
            assert mark.labels == [f"{name} (AUC {auc:.3f})"]
    assert panel.curves["gradcam"].deletion_auc < panel.curves["random"].deletion_auc
    # agreement matrix
    color = np.asarray(panel.agreement_map.color)
    assert color.shape == (3, 3) and np.allclose(np.diag(color), 1) and np.allclose(color, color.T)
    assert list(panel.agreement_map.row) == methods
    # warnings: the foil fails; the disagreement line appears exactly when the methods disagree
    assert any(edge_foil in w and "randomisation" in w for w in panel.warnings)
    assert "⚠" in panel.warning.value
    assert ("methods disagree" in panel.warning.value) == panel.agreement.disagree
    assert panel.status.value.startswith("done") and panel.progress.value == panel.progress.max
    assert "blue" in panel.title.value or "explaining" in panel.title.value


def test_disagreeing_methods_get_a_warning_line(cnn, image, monkeypatch):
    import nbexplain.trust.panel as panel_module
    monkeypatch.setattr(panel_module, "rank_agreement", lambda exps: np.array([[1.0, -0.2], [-0.2, 1.0]]))
    panel = TrustPanel(cnn, image, methods=["gradcam", "saliency"], groups=["layer4.0", "fc"]).run()
    assert panel.agreement.disagree
    assert "methods disagree: mean rank correlation -0.20 &lt; 0.3" in panel.warning.value
    assert list(panel.random_lines.x) == ["original", "fc", "layer4.0"]  # randomised from the top down


def test_the_button_runs_the_checks_in_the_background(cnn, image):
    panel = TrustPanel(cnn, image, methods=["saliency"], groups=["fc"])
    panel.button.click()
    panel.wait(120)
    assert not panel.button.disabled and panel.report is not None
    assert "saliency" in panel.report.passed and len(panel.deletion_lines[0].y) == 21
    assert panel.agreement_figure.layout.display == "none" and "methods disagree" not in panel.warning.value

    with pytest.raises(ValueError, match="unknown method 'no_such_method'"):
        TrustPanel(cnn, image, methods=["no_such_method"])             # refused before any work
    broken = TrustPanel(cnn, image, methods=["saliency"], target=10**6)
    broken.button.click()
    with pytest.raises(ValueError, match="out of range"):
        broken.wait(60)
    assert broken.status.value.startswith("error") and not broken.button.disabled


# --- the export bar -------------------------------------------------------------------------------------
@pytest.fixture
def explorer(cnn):
    w = nbx.explain(cnn, list(make_batch(2, seed=3)["images"]), method="gradcam", opacity=0.8,
                    colormap="viridis", sign="absolute", clip=95.0)
    w.wait()
    yield w
    w.close()


def test_export_buttons_write_every_format_with_the_view_settings(explorer, tmp_path):
    folder = tmp_path / "out <b>&"                               # created on first save; shown escaped
    bar = export_bar(explorer, folder)
    assert isinstance(bar, ExportBar) and list(bar.buttons) == ["png", "npz", "json", "html"]
    result = explorer.result
    written = {}
    for ext, button in bar.buttons.items():
        button.click()
        path = bar.last_path
        assert path and os.path.isfile(path) and path.endswith(f".{ext}")
        name = os.path.basename(path)
        assert re.fullmatch(rf"gradcam_{result.target}-[a-z0-9-]+_\d{{8}}-\d{{6}}\.{ext}", name), name
        assert bar.message.value == f"saved <code>{html.escape(path)}</code>"
        assert "<b>" not in bar.message.value
        written[ext] = path
    # the PNG is drawn with the view's settings, not the defaults
    settings = dict(opacity=0.8, colormap="viridis", sign="absolute", clip=95.0)
    assert bar.view_settings() == settings
    same = np.asarray(Image.open(result.save(tmp_path / "ref.png", **settings)))
    default = np.asarray(Image.open(result.save(tmp_path / "default.png")))
    got = np.asarray(Image.open(written["png"]))
    assert np.array_equal(got, same) and not np.array_equal(got, default)
    with np.load(written["npz"]) as z:
        np.testing.assert_array_equal(z["map"], result.map)
    again = nbx.replay(open(written["json"]).read(), explorer.view._session.model)
    np.testing.assert_allclose(again.map, result.map, atol=1e-5)
    assert "<!doctype html>" in open(written["html"], encoding="utf-8").read()
    bar.buttons["png"].click()                                    # a second save keeps the first file
    assert bar.last_path != written["png"] and os.path.isfile(written["png"])


def test_export_reports_problems_next_to_the_buttons(explorer, tmp_path, monkeypatch):
    bar = export_bar(explorer.view, tmp_path)                     # a bare ExplorerView works too
    monkeypatch.setattr(explorer.view, "result", None)
    bar.buttons["json"].click()
    assert "export failed" in bar.message.value and "no result" in bar.message.value
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        bar.save("gif")
    assert file_name(type("R", (), {"method": "gradcam++", "target": 3, "label": "tiger cat, Felis"})(), "png",
                     datetime.datetime(2025, 1, 2, 3, 4, 5)) == "gradcam_3-tiger-cat_20250102-030405.png"


def test_explorer_opens_a_trust_panel_on_what_it_shows(explorer):
    explorer.view.target = 2
    explorer.view.layer = "layer1"
    panel = explorer.trust(groups=["fc", "layer4"])
    assert panel.methods[0] == "gradcam" and panel.target == 2
    assert panel.params["gradcam"]["layer"] == "layer1"
    panel.run()
    assert panel.report is not None and panel.report.steps == ["fc", "layer4"]   # top first


def test_the_checks_leave_the_model_as_the_user_left_it_while_they_run(image, monkeypatch):
    """The Run button computes in a background thread: during every pass, another cell sees the model's
    own state_dict, requires_grad and train flags, and no hooks."""
    from conftest import assert_same_view, user_view
    from nbexplain.context import Context
    model = nbx.load_model("synthetic-cnn").train()
    before, passes = user_view(model), []
    real = Context.forward

    def forward(ctx, xs):
        passes.append(ctx.model is not model)
        assert_same_view(user_view(model), before)
        return real(ctx, xs)
    monkeypatch.setattr(Context, "forward", forward)
    panel = TrustPanel(model, image, methods=["gradcam", "integrated_gradients"], groups=layer_groups(model)[-1:])
    panel._clicked()
    panel.wait()
    assert passes and all(passes) and panel.report is not None
    assert_same_view(user_view(model), before)


def test_the_panel_takes_one_image_and_each_method_once(cnn, image):
    with pytest.raises(ValueError, match=r"image: the trust panel takes one image, got 2"):
        TrustPanel(cnn, [image, image])
    with pytest.raises(ValueError, match=r"methods: 'saliency' is listed twice"):
        TrustPanel(cnn, image, methods=["saliency", "saliency"])
    assert TrustPanel(cnn, [image], methods=["saliency"]).image is image
