"""The shipped notebooks run headless (nbclient) without errors and save the explorer's widget state;
`python -m nbexplain.demo` serves the quickstart on 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> Path:
    """A kernelspec that runs *this* interpreter: a `python3` kernelspec in ~/.local/share/jupyter would
    otherwise win over the venv's and could run another Python without nbexplain."""
    d = tmp_path_factory.mktemp("kernels")
    spec = d / "nbx-test-python"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbexplain tests", "language": "python"}))
    return d


def execute(name: str, kernel_spec_dir: Path) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:  # stored clean: outputs are produced here, not kept in git
        assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name}: clear the outputs"
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    km = KernelManager(kernel_name="nbx-test-python",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    client = nbclient.NotebookClient(nb, km=km, timeout=300, store_widget_state=True,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.prefix  # the kernel ran in this environment
    return nb


def anywidget_models(nb) -> dict[str, dict]:
    state = nb.metadata["widgets"][WIDGET_STATE]
    assert state["version_major"] == 2
    return {k: v for k, v in state["state"].items() if v["model_module"] == "anywidget"}


def check_saved_state(nb, n_views: int) -> list[dict]:
    """Every explorer shown in a cell is in the saved state, with its ESM and its map as a binary buffer."""
    models = anywidget_models(nb)
    assert len(models) == n_views
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    shown = [o["data"][WIDGET_VIEW]["model_id"] for c in nb.cells if c.cell_type == "code"
             for o in c.outputs if WIDGET_VIEW in o.get("data", {})]
    assert len(shown) == n_views  # the Explorer VBoxes; each holds one explorer view
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    for box_id in shown:
        children = state[box_id]["state"]["children"]
        assert any(c.removeprefix("IPY_MODEL_") in models for c in children)
    out = []
    for model in models.values():
        s = model["state"]
        # the front end travels with the state (the bundle is minified: `export{X as default}`)
        assert re.search(r"export\s*(default|\{[^}]*\bas default\})", s["_esm"]) and "nbx-root" in s["_esm"]
        paths = [b["path"] for b in model["buffers"]]
        assert ["_map", "data"] in paths and ["_image", "data"] in paths
        assert s["status"] == "idle" and not s["error"]
        assert s["_map"]["dtype"] == "float32" and len(s["_map"]["shape"]) == 2
        out.append(s)
    return out


def stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


def test_quickstart(kernel_spec_dir):
    nb = execute("01_quickstart.ipynb", kernel_spec_dir)
    (s,) = check_saved_state(nb, 1)
    # the saved state is the last one, not the initial one
    assert (s["method"], s["target"], s["colormap"]) == ("gradcam", 285, "viridis")
    assert s["opacity"] == pytest.approx(0.6)
    text = stream_text(nb)
    assert "tiger cat" in text
    assert re.search(r"attribution\s+ran .*\(8 model evaluations\)", text)  # 8 -> 16 steps reused 8 points
    assert "after a view-only change: no stage ran" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the PIL overlay was not displayed"


def test_cnn_vs_vit(kernel_spec_dir):
    nb = execute("02_cnn_vs_vit.ipynb", kernel_spec_dir)
    states = check_saved_state(nb, 2)
    assert sorted(s["method"] for s in states) == ["attention_rollout", "gradcam"]
    for s in states:
        assert len(s["_compare_maps"]) == 2 and s["zoom"] == 4
    text = stream_text(nb)
    for row in ("CNN   gradcam", "ViT   attention_rollout", "chance (object area)"):
        assert row in text


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_demo_serves_the_quickstart():
    proc = subprocess.Popen([sys.executable, "-m", "nbexplain.demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
    try:
        url = None
        lines = []
        for line in proc.stdout:  # the demo prints the URL once the server answers
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/lab/tree/01_quickstart\.ipynb\?token=(\w+)", line)
            if m:
                url = m
                break
        assert url, "".join(lines)
        base, token = url.groups()
        with urllib.request.urlopen(f"{base}/api/contents/01_quickstart.ipynb?token={token}&content=0",
                                    timeout=10) as r:
            assert json.load(r)["type"] == "notebook"
        with pytest.raises(urllib.error.HTTPError):  # the token is required
            urllib.request.urlopen(f"{base}/api/contents", timeout=10)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
