"""The explorer in a real browser: JupyterLab and Notebook 7 in headless Chromium, driven by mouse and keyboard.

Each flavour starts its own server on 127.0.0.1 (random port and token, isolated config), opens a small
notebook (the synthetic CNN on three synthetic images), runs it and then moves the controls as a user would.
Every check looks at both sides: the canvas pixels in the page, and the kernel's own account (``w.stages``,
``w.method``, ``w.view._generation``) read through the notebook's kernel connection.

Artifacts (screenshots, ``latency.json``) go to ``test-artifacts/`` (or ``$NBX_E2E_ARTIFACTS``).
``NBX_UPDATE_DOCS=1`` also copies the README screenshot to ``docs/screenshot.png``.
Without Chromium or Playwright the module is skipped, unless ``NBX_E2E_REQUIRE=1`` (CI), then it fails.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import pytest

from browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    ROOT_DATA_JS,
    SERVER_PYTHON,
    KERNEL_IDLE_JS,
    TIMEOUT_MS,
    JupyterServer,
    arm_latency,
    artifacts_dir,
    await_latency,
    canvas_signature,
    has_notebook7,
    kernel_eval,
    kernel_json,
    open_and_run,
    skip_or_fail,
    wait_drawn,
    write_notebook,
)

pytestmark = pytest.mark.browser

E2E_CELLS = [
    "import nbexplain as nbx\n"
    "from nbexplain.synthetic import make_batch\n"
    "model = nbx.load_model('synthetic-cnn')\n"
    "images = list(make_batch(3, seed=1)['images'])",
    "w = nbx.explain(model, images, zoom=4)\nw",
]
README_CELLS = [
    "import nbexplain as nbx\n"
    "model = nbx.load_model()\n"
    "photos = [nbx.sample_image(n) for n in ('cat', 'coffee', 'astronaut')]",
    "w = nbx.explain(model, photos, image_labels=['cat', 'coffee', 'astronaut'], method='gradcam', opacity=0.5)\nw",
]
TRUST_CELLS = [
    "import nbexplain as nbx\n"
    "from nbexplain.synthetic import make_batch\n"
    "model = nbx.load_model('synthetic-cnn-hans')\n"
    "b = make_batch(6, seed=2, stamp=True)",
    "g = nbx.gallery(model, list(b['images']), 'gradient_x_input', masks=list(b['object_mask']), columns=3)\ng",
    "p = nbx.TrustPanel(model, b['images'][0], methods=['gradcam', 'saliency'], groups=['fc', 'layer4'])\n"
    "p.run()\np",
]
WIDGET_OUTPUT = ".jp-OutputArea-output:has(.nbx-root)"
LATENCY: dict[str, dict] = {}


def stages_ran(page) -> dict[str, bool]:
    return {s["name"]: s["ran"] for s in kernel_json(page, "(w.wait(), w.stages)[1]")}


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"n": len(s), "median": round(statistics.median(s), 1), "min": round(s[0], 1), "max": round(s[-1], 1)}


def record(flavor: str, control: str, results: list[dict]) -> None:
    LATENCY.setdefault(flavor, {})[control] = {
        "input_to_redraw_ms": stats([r["draw"] for r in results]),
        "input_to_next_frame_ms": stats([r["frame"] for r in results]),
    }
    for r in results:
        assert r["draw"] < 30_000, (control, r)  # a sanity bound only: this machine is shared and slow


def measured(page, param: str, action, reason: str = "_map|layer_used") -> dict:
    """Do `action()` (a real mouse or keyboard action) and return the in-page input → redraw latency."""
    arm_latency(page, param, reason)
    action()
    return await_latency(page)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail("playwright is not installed")
    if not Path(CHROMIUM).exists():
        skip_or_fail(f"{CHROMIUM} missing: apt-get install -y chromium (or set NBX_E2E_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def notebooks(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("e2e-notebooks")
    return [write_notebook(d / "e2e.ipynb", E2E_CELLS), write_notebook(d / "readme.ipynb", README_CELLS),
            write_notebook(d / "trust.ipynb", TRUST_CELLS)]


@pytest.fixture(scope="module", params=["lab", "notebook"])
def jupyter(request, browser, notebooks):
    if request.param == "notebook" and not has_notebook7():
        skip_or_fail(f"notebook>=7 is not installed for {SERVER_PYTHON}")
    server = JupyterServer(request.param, notebooks)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(browser, jupyter):
    """The e2e notebook open, all cells run and the widget drawn with its first map."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    logs: list[str] = []
    pg.on("console", lambda m: logs.append(f"console.{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: logs.append(f"pageerror: {e}"))
    try:
        timings = open_and_run(pg, jupyter, "e2e.ipynb")
    except Exception:
        pg.screenshot(path=str(artifacts_dir() / f"{jupyter.flavor}_failure.png"))
        print("\n".join(logs[-30:]))
        print(jupyter.log_tail())
        raise
    print(f"\n[timing] {jupyter.flavor}: server {jupyter.startup_s:.1f}s, "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    pg.flavor = jupyter.flavor
    pg.logs = logs
    pg.server = jupyter
    yield pg
    context.close()


@pytest.fixture(scope="module", autouse=True)
def write_latency():
    yield
    if LATENCY:
        path = artifacts_dir() / "latency.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(LATENCY)
        path.write_text(json.dumps(old, indent=1))
        print(f"\n[latency] {json.dumps(LATENCY)}")


# --------------------------------------------------------------------------------------------- tests
def test_widget_renders(page):
    out = page.locator(WIDGET_OUTPUT)
    out.scroll_into_view_if_needed()
    out.screenshot(path=str(artifacts_dir() / f"{page.flavor}_widget.png"))
    page.screenshot(path=str(artifacts_dir() / f"{page.flavor}_page.png"))
    data = page.evaluate(ROOT_DATA_JS)
    assert (data["drawnMethod"], data["status"]) == ("gradcam", "idle")
    sig = canvas_signature(page)
    assert (sig["w"], sig["h"]) == (64, 64)
    box = page.locator(".nbx-canvas").bounding_box()
    assert box["width"] == pytest.approx(256, abs=1)  # zoom=4 is applied by the browser
    # the kernel behind the page is this project's Python, not some other python3 kernelspec
    assert kernel_eval(page, "import sys; sys.prefix") == repr(__import__("sys").prefix)
    assert kernel_json(page, "[w.method, w.layer_used]") == ["gradcam", "layer2"]
    # the probability chart rendered one bar per class
    assert page.locator(f"{WIDGET_OUTPUT} .bargroup rect.bar").count() == 2 * 4
    errors = [m for m in page.logs if m.startswith("pageerror") and ("nbx" in m or "anywidget" in m)]
    assert not errors, errors
    # anywidget warns when the ESM has a named `render` export (deprecated); ours only exports the default
    assert not [m for m in page.logs if "[anywidget] Deprecation" in m]


def test_method_select_by_mouse_and_keyboard(page):
    before = canvas_signature(page)
    select = page.locator('.nbx-root [data-param="method"]')
    r = measured(page, "method", lambda: select.select_option("integrated_gradients"))
    assert r["detail"]["method"] == "integrated_gradients"
    assert canvas_signature(page) != before
    assert kernel_json(page, "w.method") == "integrated_gradients"
    ran = stages_ran(page)
    assert not ran["forward"] and ran["attribution"] and ran["display"], ran  # the forward pass is reused
    # the signed IG map switched the colour bar to the signed scale in the browser
    assert page.get_attribute(".nbx-root", "data-drawn-sign") == "signed"
    results = [r]

    # keyboard: ArrowDown on the focused select picks the next method (Grad-CAM follows IG in the list)
    select.focus()
    r = measured(page, "method", lambda: page.keyboard.press("ArrowDown"))
    assert r["detail"]["method"] == "gradcam"
    assert kernel_json(page, "w.method") == "gradcam"
    assert canvas_signature(page) == before  # back to the first map, pixel for pixel
    results.append(r)
    record(page.flavor, "method (select)", results)


def test_layer_slider_by_mouse_and_keyboard(page):
    slider = page.locator('.nbx-root [data-param="layer"]')
    layers = kernel_json(page, "[l['name'] for l in w.view._layers]")
    assert int(slider.get_attribute("max")) == len(layers) - 1
    before = canvas_signature(page)
    gen = kernel_json(page, "w.view._generation")

    # mouse: click the track at about a third of its width
    box = slider.bounding_box()
    r = measured(page, "layer", lambda: page.mouse.click(box["x"] + box["width"] * 0.3,
                                                         box["y"] + box["height"] / 2))
    index = int(slider.input_value())
    assert kernel_json(page, "w.layer") == layers[index] != "layer2"
    assert kernel_json(page, "w.view._generation") == gen + 1
    ran = stages_ran(page)
    # Grad-CAM's workspace captured every candidate layer: a layer change only reruns the method
    assert not ran["forward"] and not ran["workspace"] and ran["attribution"], ran
    after_mouse = canvas_signature(page)
    assert after_mouse != before
    results = [r]

    # keyboard: ArrowRight / ArrowLeft on the focused slider, one layer per key press
    # (a layer seen before comes from the cache: the method does not run again)
    slider.focus()
    seen = {index}  # not layer2: the first map was computed for layer "" (auto), another cache key
    for key in ["ArrowRight", "ArrowRight", "ArrowLeft", "ArrowLeft", "ArrowRight"]:
        old = int(slider.input_value())
        results.append(measured(page, "layer", lambda: page.keyboard.press(key)))
        new = int(slider.input_value())
        assert new == old + (1 if key == "ArrowRight" else -1)
        assert kernel_json(page, "w.layer") == layers[new]
        ran = stages_ran(page)
        assert not ran["workspace"] and ran["attribution"] == (new not in seen), (layers[new], ran)
        seen.add(new)
    assert canvas_signature(page) != after_mouse
    record(page.flavor, "layer (slider)", results)
    page.locator(WIDGET_OUTPUT).screenshot(path=str(artifacts_dir() / f"{page.flavor}_layer.png"))
    # back to the default layer for the next tests
    page.locator(".nbx-root .nbx-layer-auto").click()
    page.wait_for_function("() => document.querySelector('.nbx-root .nbx-layer-name').textContent"
                           ".startsWith('auto:')")
    assert kernel_json(page, "(w.wait(), w.layer)[1]") == ""


def test_method_param_slider_by_keyboard(page):
    """A method parameter slider (SmoothGrad's `samples`) rebuilt when the method changes."""
    kernel_eval(page, "w.method = 'smoothgrad'; w.samples = 8; w.wait()")
    wait_drawn(page, "drawnMethod", "smoothgrad")
    slider = page.locator('.nbx-root [data-param="samples"]')
    slider.wait_for()
    assert slider.input_value() == "8"
    before = canvas_signature(page)
    slider.focus()
    r = measured(page, "samples", lambda: page.keyboard.press("ArrowRight"))
    assert kernel_json(page, "w.samples") == 9
    ran = stages_ran(page)
    assert ran["attribution"] and not ran["forward"], ran
    assert canvas_signature(page) != before
    record(page.flavor, "samples (slider)", [r])
    page.locator(WIDGET_OUTPUT).screenshot(path=str(artifacts_dir() / f"{page.flavor}_smoothgrad.png"))
    kernel_eval(page, "w.method = 'gradcam'; w.wait()")
    wait_drawn(page, "drawnMethod", "gradcam")


def test_view_controls_run_nothing_in_the_kernel(page):
    gen = kernel_json(page, "w.view._generation")
    before = canvas_signature(page)
    slider = page.locator('.nbx-root [data-param="opacity"]')

    # mouse: click near the right end of the opacity slider
    box = slider.bounding_box()
    r = measured(page, "opacity", lambda: page.mouse.click(box["x"] + box["width"] * 0.9,
                                                           box["y"] + box["height"] / 2), reason="opacity")
    value = float(slider.input_value())
    assert value > 0.75
    assert float(r["detail"]["opacity"]) == pytest.approx(value)
    mouse_sig = canvas_signature(page)
    assert mouse_sig != before
    results = [r]

    # keyboard
    slider.focus()
    for key in ["ArrowLeft"] * 3 + ["ArrowRight"] * 2:
        results.append(measured(page, "opacity", lambda: page.keyboard.press(key), reason="opacity"))
    assert float(slider.input_value()) == pytest.approx(value - 0.01)
    assert canvas_signature(page) != mouse_sig
    record(page.flavor, "opacity (slider, browser only)", results)

    # colour map: a select, also drawn by the browser alone
    r = measured(page, "colormap", lambda: page.locator('.nbx-root [data-param="colormap"]').select_option(
        label="viridis"), reason="colormap")
    assert r["detail"]["colormap"] == "viridis"
    record(page.flavor, "colormap (select, browser only)", [r])

    # the kernel ran no request at all, but it knows the new values (saved with the notebook)
    assert kernel_json(page, "w.view._generation") == gen
    assert kernel_json(page, "[s['ran'] for s in w.stages]") == [False] * 6
    assert kernel_json(page, "[w.opacity, w.colormap]") == [pytest.approx(value - 0.01), "viridis"]
    page.locator(WIDGET_OUTPUT).screenshot(path=str(artifacts_dir() / f"{page.flavor}_view.png"))
    kernel_eval(page, "w.opacity = 0.5; w.colormap = 'auto'")
    wait_drawn(page, "drawnOpacity", "0.5")


def test_click_on_a_bar_sets_the_target(page):
    preds = kernel_json(page, "w.view._predictions")
    assert kernel_json(page, "w.target") == -1
    rects = page.locator(f"{WIDGET_OUTPUT} .bargroup rect.bar")
    n = len(preds)
    assert rects.count() == 2 * n  # an invisible full-width hit bar under each visible bar
    visible = [rects.nth(n + i).bounding_box() for i in range(n)]
    assert visible[0]["width"] > 200 and visible[0]["y"] < visible[1]["y"]  # the most likely class on top

    # the runner-up has ~1 %: a bar a few pixels long. Click its row, right of the bar, as a user would.
    row = rects.nth(1).bounding_box()
    assert row["width"] > 300
    page.mouse.click(row["x"] + row["width"] * 0.6, row["y"] + row["height"] / 2)
    second = preds[1]["index"]
    wait_drawn(page, "drawnTarget", str(second))
    assert kernel_json(page, "(w.wait(), w.target)[1]") == second
    assert page.locator(".nbx-root [data-param='target']").input_value() == str(second)
    assert preds[1]["label"] in page.locator(".nbx-root .nbx-caption").inner_text()
    ran = stages_ran(page)
    assert not ran["forward"] and ran["workspace"], ran  # same logits, a new backward pass for the class
    page.locator(WIDGET_OUTPUT).screenshot(path=str(artifacts_dir() / f"{page.flavor}_target.png"))

    # a click on the visible bar of the top class
    page.mouse.click(visible[0]["x"] + visible[0]["width"] / 2, visible[0]["y"] + visible[0]["height"] / 2)
    wait_drawn(page, "drawnTarget", str(preds[0]["index"]))
    assert kernel_json(page, "(w.wait(), w.target)[1]") == preds[0]["index"]
    kernel_eval(page, "w.target = -1; w.wait()")


def test_kernel_error_is_shown_in_the_widget(page):
    kernel_eval(page, "w.layer = 'nope'")
    page.wait_for_selector(".nbx-root[data-status='error']")
    error = page.locator(".nbx-root .nbx-error")
    assert error.is_visible()
    assert "nope" in error.inner_text()
    # ...and in the cell's error log, below the chart
    page.wait_for_function("() => [...document.querySelectorAll('.jp-OutputArea-output')]"
                           ".some(o => o.textContent.includes('nbexplain:') && o.textContent.includes('nope'))")
    page.locator(WIDGET_OUTPUT).screenshot(path=str(artifacts_dir() / f"{page.flavor}_error.png"))
    kernel_eval(page, "w.layer = ''; w.wait()")
    page.wait_for_selector(".nbx-root[data-status='idle']")
    assert not page.locator(".nbx-root .nbx-error").is_visible()


def test_readme_screenshot(page, browser):
    """The default pretrained model on the sample photos: the picture in the README."""
    if page.flavor != "lab":
        pytest.skip("taken in JupyterLab")
    context = browser.new_context(viewport={"width": 1280, "height": 1100}, device_scale_factor=1)
    pg = context.new_page()
    try:
        open_and_run(pg, page.server, "readme.ipynb")
        data = pg.evaluate(ROOT_DATA_JS)
        assert (data["drawnMethod"], data["drawnTarget"], data["drawnOpacity"]) == ("gradcam", "282", "0.5")
        out = pg.locator(WIDGET_OUTPUT)
        out.scroll_into_view_if_needed()
        pg.mouse.move(0, 0)  # no hover readout or tooltip in the picture
        shot = artifacts_dir() / "readme_widget.png"
        out.screenshot(path=str(shot))
        if os.environ.get("NBX_UPDATE_DOCS") == "1":
            (ROOT / "docs").mkdir(exist_ok=True)
            shutil.copy(shot, ROOT / "docs" / "screenshot.png")
    finally:
        context.close()


def test_gallery_and_trust_panel_render_and_open_the_explorer(browser, jupyter):
    """The batch gallery shows its thumbnails with flags, the trust panel draws its bqplot curves, and a
    card's "open" button brings up an explorer that draws its map."""
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    pg = context.new_page()
    try:
        pg.goto(jupyter.notebook_url("trust.ipynb"))
        pg.wait_for_function(KERNEL_IDLE_JS, timeout=TIMEOUT_MS)
        pg.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        pg.wait_for_function("() => document.querySelectorAll('img.widget-image').length >= 6", timeout=TIMEOUT_MS)
        pg.wait_for_function("() => [...document.querySelectorAll('.bqplot path.curve, .bqplot path.line')]"
                             ".some(p => (p.getAttribute('d') || '').length > 20)", timeout=TIMEOUT_MS)
        assert pg.locator("text=flagged").count() >= 1                     # the marker model is caught
        pg.screenshot(path=str(artifacts_dir() / f"{jupyter.flavor}_trust.png"), full_page=True)
        pg.locator("button:has-text('open')").first.click()
        pg.wait_for_selector('.nbx-root[data-ready="1"]', timeout=TIMEOUT_MS)
        pg.wait_for_function("() => !!document.querySelector('.nbx-root').dataset.drawnMethod", timeout=TIMEOUT_MS)
        assert kernel_json(pg, "g.selected") == 0
    finally:
        context.close()
