"""Plumbing for the real-browser tests: a throw-away Jupyter server, Chromium, and in-page JS helpers.

Adapted from the tested recipe in shared/notes/browser.md. Nothing here talks to anything but 127.0.0.1.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("NBX_E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-background-networking",  # no update pings, no refused connections at start
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
REQUIRE = os.environ.get("NBX_E2E_REQUIRE") == "1"
SERVER_PYTHON = os.environ.get("NBX_E2E_SERVER_PYTHON", sys.executable)
TIMEOUT_MS = 90_000


def skip_or_fail(reason: str):
    if REQUIRE:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("NBX_E2E_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------- in-page JS
KERNEL_IDLE_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""

# Run Python in the notebook's kernel; returns the text/plain of the result (or 'ERROR ...').
KERNEL_EVAL_JS = """async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  const future = kernel.requestExecute({code, store_history: false, silent: false});
  let out = null;
  future.onIOPub = (msg) => {
    const t = msg.header.msg_type;
    if (t === 'execute_result') out = msg.content.data['text/plain'];
    if (t === 'error') out = 'ERROR ' + msg.content.ename + ': ' + msg.content.evalue;
  };
  await future.done;
  return out;
}"""

# A cheap fingerprint of what the main canvas shows: size plus sums over all channels.
CANVAS_SIGNATURE_JS = """(sel) => {
  const c = document.querySelector(sel || '.nbx-canvas');
  if (!c || !c.width || !c.height) return null;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let r = 0, g = 0, b = 0, h = 0;
  for (let i = 0; i < d.length; i += 4) {
    r += d[i]; g += d[i + 1]; b += d[i + 2];
    h = (h * 31 + d[i] * 7 + d[i + 1] * 3 + d[i + 2]) >>> 0;
  }
  return {w: c.width, h: c.height, r, g, b, hash: h};
}"""

# Arm a one-shot recorder: the first user `input`/`change` on the control named `param` starts the clock
# (performance.now, in the page), the first `nbx-drawn` whose reason matches `reason` stops it. The
# promise is left on window.__nbxLatency; await it with AWAIT_LATENCY_JS after acting on the page.
ARM_LATENCY_JS = """({param, reason, timeoutMs}) => {
  const root = document.querySelector('.nbx-root');
  const re = new RegExp(reason);
  window.__nbxLatency = new Promise((resolve, reject) => {
    let t0 = null;
    const start = (e) => {
      const el = e.target;
      if (t0 === null && el && el.dataset && el.dataset.param === param) t0 = performance.now();
    };
    const done = (e) => {
      if (t0 === null || !re.test(e.detail.reason)) return;
      const draw = performance.now() - t0;
      cleanup();
      requestAnimationFrame(() => resolve({draw, frame: performance.now() - t0, detail: e.detail}));
    };
    const cleanup = () => {
      clearTimeout(timer);
      root.removeEventListener('input', start, true);
      root.removeEventListener('change', start, true);
      root.removeEventListener('nbx-drawn', done);
    };
    const timer = setTimeout(() => { cleanup(); reject(new Error('no redraw after ' + param)); }, timeoutMs);
    root.addEventListener('input', start, true);
    root.addEventListener('change', start, true);
    root.addEventListener('nbx-drawn', done);
  });
  return true;
}"""

AWAIT_LATENCY_JS = "async () => await window.__nbxLatency"

# Set a slider from inside the page as a user's drag-and-release would (input, then change).
SET_INPUT_JS = """({param, value}) => {
  const el = document.querySelector(`.nbx-root [data-param="${param}"]`);
  el.value = String(value);
  el.dispatchEvent(new Event('input', {bubbles: true}));
  el.dispatchEvent(new Event('change', {bubbles: true}));
}"""

ROOT_DATA_JS = "() => ({...document.querySelector('.nbx-root').dataset})"


# ------------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http_ok(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{log.read_text() if log else ''}")


def has_notebook7(python: str = SERVER_PYTHON) -> bool:
    code = "import notebook, sys; sys.exit(0 if int(notebook.__version__.split('.')[0]) >= 7 else 1)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def write_notebook(path: Path, cells: list[str]) -> Path:
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(c) for c in cells], metadata={
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}})
    nbformat.write(nb, path)
    return path


class JupyterServer:
    """A JupyterLab or Notebook 7 server on 127.0.0.1 with a random port and token and isolated dirs."""

    def __init__(self, flavor: str, notebooks: list[Path], python: str = SERVER_PYTHON):
        assert flavor in ("lab", "notebook")
        self.flavor, self.python = flavor, python
        self.tmp = Path(tempfile.mkdtemp(prefix=f"nbx-e2e-{flavor}-"))
        self.root = self.tmp / "root"
        self.root.mkdir()
        for nb in notebooks:
            shutil.copy(nb, self.root / nb.name)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log = self.tmp / "server.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def notebook_url(self, name: str) -> str:
        path = "lab/tree" if self.flavor == "lab" else "notebooks"
        reset = "&reset" if self.flavor == "lab" else ""  # Lab: don't restore tabs of an earlier page
        return f"{self.base}/{path}/{name}?token={self.token}{reset}"

    def _write_settings(self) -> Path:
        settings = self.tmp / "lab-settings"
        (settings / "@jupyterlab/apputils-extension").mkdir(parents=True)
        (settings / "@jupyterlab/notebook-extension").mkdir(parents=True)
        # no "get notified about Jupyter news?" toast over the output, no update check
        (settings / "@jupyterlab/apputils-extension/notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        # every cell stays in the DOM
        (settings / "@jupyterlab/notebook-extension/tracker.jupyterlab-settings").write_text(
            json.dumps({"windowingMode": "none"}))
        return settings

    def start(self) -> "JupyterServer":
        cfg = self.tmp / "config"
        cfg.mkdir()
        env = dict(os.environ)
        env.update(
            JUPYTER_CONFIG_DIR=str(cfg),                    # ignore ~/.jupyter
            JUPYTER_DATA_DIR=str(self.tmp / "data"),        # ignore user kernelspecs: the venv's python3 runs
            JUPYTER_RUNTIME_DIR=str(self.tmp / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(self._write_settings()),
            JUPYTERLAB_WORKSPACES_DIR=str(self.tmp / "workspaces"),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
        )
        app = "LabApp" if self.flavor == "lab" else "JupyterNotebookApp"
        cmd = [
            self.python, "-m", "jupyterlab" if self.flavor == "lab" else "notebook",
            "--no-browser", "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            f"--{app}.expose_app_in_browser=True",          # window.jupyterapp for the tests
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        if self.flavor == "lab":
            # LabApp only: an unknown trait on JupyterNotebookApp silently breaks the notebook UI
            cmd += ["--LabApp.news_url=None", "--LabApp.extension_manager=readonly"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.root, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_http_ok(f"{self.base}/api/status?token={self.token}", self.proc, self.log)
        self.startup_s = time.perf_counter() - t0
        return self

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # only our own process group
        self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------- page helpers
def open_and_run(page, server: JupyterServer, name: str) -> dict:
    """Open a notebook, wait for its kernel, run all cells, wait until the widget drew a map."""
    t = {}
    t0 = time.perf_counter()
    page.goto(server.notebook_url(name))
    page.wait_for_function(KERNEL_IDLE_JS, timeout=TIMEOUT_MS)
    t["open_until_kernel_idle"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector('.nbx-root[data-ready="1"]', timeout=TIMEOUT_MS)
    wait_drawn(page, "_map")
    t["run_all_until_drawn"] = time.perf_counter() - t1
    return t


def wait_drawn(page, attr: str = "_map", value: str | None = None, timeout_ms: int = TIMEOUT_MS) -> None:
    """Wait until the root's data-drawn-method is set (attr '_map') or a data-* attribute has `value`."""
    if attr == "_map":
        js = "() => { const r = document.querySelector('.nbx-root'); return !!r && !!r.dataset.drawnMethod; }"
        page.wait_for_function(js, timeout=timeout_ms)
    else:
        page.wait_for_function("([a, v]) => document.querySelector('.nbx-root').dataset[a] === v",
                               arg=[attr, value], timeout=timeout_ms)


def kernel_eval(page, code: str) -> str:
    out = page.evaluate(KERNEL_EVAL_JS, code)
    assert out is None or not out.startswith("ERROR"), f"{code!r}: {out}"
    return out


def kernel_json(page, expr: str):
    """Evaluate a Python expression in the kernel and return it through JSON."""
    out = kernel_eval(page, f"import json as _j; _j.dumps({expr})")
    return json.loads(ast.literal_eval(out))  # text/plain is the repr of the JSON string


def canvas_signature(page, selector: str = ".nbx-canvas") -> dict | None:
    return page.evaluate(CANVAS_SIGNATURE_JS, selector)


def arm_latency(page, param: str, reason: str = "_map|layer_used", timeout_ms: int = 60_000) -> None:
    page.evaluate(ARM_LATENCY_JS, {"param": param, "reason": reason, "timeoutMs": timeout_ms})


def await_latency(page) -> dict:
    return page.evaluate(AWAIT_LATENCY_JS)
