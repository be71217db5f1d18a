"""The README documents every registered method (its table is generated from the registry)."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_readme_method_table_matches_the_registry():
    from method_table import method_table
    assert method_table() in (ROOT / "README.md").read_text(), "run scripts/method_table.py and update README"


def test_readme_test_command_is_what_ci_runs():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_the_readme_example_of_an_own_method_runs():
    """The snippet registers a method that nbx.attribute and nbx.methods() then know; it is removed after."""
    import re
    import torch
    import nbexplain as nbx
    from nbexplain.methods import REGISTRY
    code = re.search(r"<!-- own-method -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    model = nbx.load_model("synthetic-cnn")
    image = torch.randn(3, 64, 64)
    ns = {"nbx": nbx, "model": model, "image": image}
    try:
        exec(code, ns)
        assert "gradient_power" in [m["name"] for m in nbx.methods()]
        plain = nbx.attribute(model, image, "saliency", target=ns["maps"].target)
        torch.testing.assert_close(ns["maps"].raw, plain.raw.abs() ** 2)
    finally:
        REGISTRY.pop("gradient_power", None)


def test_the_readme_use_example_runs_as_written(tmp_path, monkeypatch):
    """Copied into a notebook, the first example must run: every file it reads, it wrote first."""
    import re
    import numpy as np
    import nbexplain as nbx
    code = re.search(r"<!-- use -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    code = code.replace('steps=64', 'steps=8')          # the same calls, fewer IG steps for the CPU
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(code, ns)
    w = ns["w"]
    try:
        assert w.result is not None and w.result.meta["layer"] == "blocks.5"
        assert ns["exp"].map.shape == np.asarray(ns["img"]).shape[:2]
        assert (tmp_path / "cat.png").exists()
    finally:
        w.close()
