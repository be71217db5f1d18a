"""`benchmarks/run.py --quick`: every section runs and every peer that should agree does (no timings)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_bench_runs_every_section_with_agreeing_peers(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    # exit 1 means a peer that must agree did not (written to bench.md under FAILURES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "bench.md").read_text()
    for heading in ("## Speed at equal results", "## Integrated Gradients at equal accuracy",
                    "## Widget: kernel time per control change", "## Peak memory", "## First call after loading"):
        assert heading in report, heading
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for r in data["rows"] if "error" not in r]
    assert rows and not data["failures"]
    methods = {r["method"] for r in rows}
    assert {"saliency", "gradcam", "integrated_gradients", "smoothgrad", "occlusion", "scorecam"} <= methods
    # every row has a checked peer; IG and SmoothGrad rows also carry the bare forward+backward bound
    assert all(r["checks"] for r in rows)
    assert all(r["bound_s"] for r in rows if r["method"] in ("integrated_gradients", "smoothgrad"))
    # first calls: every implementation timed in its own process
    assert {(r["method"], r["impl"]) for r in data["first_call"]} == {
        ("saliency", "nbexplain"), ("saliency", "captum"), ("gradcam", "nbexplain"), ("gradcam", "torchcam"),
        ("gradcam", "grad-cam"), ("gradcam (default layer)", "nbexplain")}
