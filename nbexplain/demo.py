"""``python -m nbexplain.demo``: JupyterLab on 127.0.0.1 with the quickstart notebook, until Ctrl-C.

Headless: it opens no browser, it prints the URL (with its token) to open. By default the server works on
a temporary copy of the repository's ``notebooks/`` folder, deleted on exit, so running the demo never
leaves outputs in the files kept in git; ``--in-place`` serves the folder itself.
"""
from __future__ import annotations

import argparse
import contextlib
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

NOTEBOOK = "01_quickstart.ipynb"
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # JupyterLab shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group started below: the server and its kernels
            proc.wait()


def command(root: Path, port: int, token: str) -> list[str]:
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           # offline-friendly: no news feed, no PyPI queries from the extension manager
           "--LabApp.news_url=None", "--LabApp.extension_manager=readonly", "--ServerApp.log_level=WARN"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers often run as root; JupyterLab refuses it otherwise
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbexplain.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--in-place", action="store_true",
                        help="serve the repository's notebooks/ itself (saved edits and outputs stay there)")
    args = parser.parse_args(argv)

    if not (NOTEBOOKS / NOTEBOOK).is_file():
        print(f"nbexplain demo: {NOTEBOOKS / NOTEBOOK} not found; the demo notebooks live in the source "
              "repository (notebooks/), run the demo from a clone", file=sys.stderr)
        return 2
    tmp = None
    if args.in_place:
        root = NOTEBOOKS
    else:
        tmp = Path(tempfile.mkdtemp(prefix="nbexplain-demo-"))
        for nb in NOTEBOOKS.glob("*.ipynb"):
            shutil.copy(nb, tmp / nb.name)
        root = tmp
    port = args.port or _free_port()
    token = secrets.token_hex(24)
    base = f"http://127.0.0.1:{port}"

    # Own session: Ctrl-C reaches only this script, which then stops the server cleanly (JupyterLab
    # would otherwise ask "Shutdown this Jupyter server (y/[n])?" on the terminal).
    proc = subprocess.Popen(command(root, port, token), cwd=root, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if not _wait_ready(f"{base}/api/status?token={token}", proc):
            print("nbexplain demo: JupyterLab did not start (see its log above)", file=sys.stderr)
            return proc.poll() or 1
        where = "a temporary copy of " if tmp else ""
        print(f"\nnbexplain demo: JupyterLab serves {where}{NOTEBOOKS}" + (f" in {tmp}" if tmp else ""), flush=True)
        print(f"open  {base}/lab/tree/{NOTEBOOK}?token={token}", flush=True)
        print("Ctrl-C stops the server" + (" and deletes the copy" if tmp else "") + ".\n", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print("\nnbexplain demo: stopping JupyterLab", flush=True)
        return 0
    finally:
        _stop(proc)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
