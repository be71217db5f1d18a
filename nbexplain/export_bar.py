"""A row of export buttons for the explorer: PNG, NPZ, JSON, HTML of the current result, drawn with the
current view settings (opacity, colour map, sign, clipping), saved into a folder with a readable name."""
from __future__ import annotations

import datetime
import html
import os
import re
from typing import Any

import ipywidgets

from .export import VIEW_SETTINGS

FORMATS = ("png", "npz", "json", "html")
_HELP = {"png": "the overlay as shown, provenance in the PNG's text chunk",
         "npz": "the map and the method's raw tensor, with provenance",
         "json": "provenance and input: nbx.replay(json, model) recomputes the map",
         "html": "a static, offline report: overlay, input, predictions, provenance"}


def _slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()
    return s[:limit].rstrip("-") or "x"


def file_name(result, ext: str, when: datetime.datetime | None = None) -> str:
    """``method_target-label_YYYYmmdd-HHMMSS.ext``, e.g. ``gradcam_285-egyptian-cat_20250101-120000.png``."""
    when = when or datetime.datetime.now()
    target = str(result.target) + (f"-{_slug(result.label.split(',')[0])}" if result.label else "")
    return f"{_slug(result.method)}_{target}_{when.strftime('%Y%m%d-%H%M%S')}.{ext}"


class ExportBar(ipywidgets.HBox):
    """Buttons that save the explorer's current result; ``bar.save('png')`` does what the button does.

    ``bar.last_path`` is the file last written, ``bar.message`` shows it (escaped) or the error.
    """

    def __init__(self, explorer: Any, folder: str | os.PathLike = ".") -> None:
        self.explorer = explorer
        self.folder = os.fspath(folder)
        self.last_path: str | None = None
        self.buttons = {}
        for ext in FORMATS:
            b = ipywidgets.Button(description=ext.upper(), icon="download", tooltip=f"save .{ext}: {_HELP[ext]}",
                                  layout=ipywidgets.Layout(width="80px"))
            b.on_click(lambda _b, e=ext: self._clicked(e))
            self.buttons[ext] = b
        self.message = ipywidgets.HTML("", layout=ipywidgets.Layout(margin="0 0 0 8px"))
        super().__init__([ipywidgets.Label("export:"), *self.buttons.values(), self.message])

    @property
    def view(self):
        """The ExplorerView (an Explorer's ``.view``, or a view passed directly)."""
        return getattr(self.explorer, "view", self.explorer)

    def view_settings(self) -> dict:
        view = self.view
        return {k: getattr(view, k) for k in VIEW_SETTINGS}

    def save(self, ext: str) -> str:
        """Save the current result as ``ext`` (png, npz, json, html) into the folder; returns the path."""
        ext = ext.lower().lstrip(".")
        if ext not in FORMATS:
            raise ValueError(f"export: unknown format {ext!r}; use {', '.join(FORMATS)}")
        view = self.view
        result = getattr(view, "result", None)
        status = getattr(view, "status", "idle")
        if status == "closed":
            raise RuntimeError("the explorer is closed, so its map may not match its controls; open a new one "
                               "with nbx.explain(...) to export")
        if status == "busy" or getattr(view, "computing", False):   # a change queued but not yet picked up
            raise RuntimeError("the explorer is still computing; export once the map is shown")
        if status == "error":        # the result held is the previous settings', not what the controls say
            raise RuntimeError("the explorer's last request failed, so no map matches its controls; fix the "
                               "setting its error names, then export")
        if result is None:
            raise RuntimeError("nothing to export yet: the explorer has no result")
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise NotADirectoryError(f"export: {self.folder!r} is a file, not a folder; pass a folder to save into")
        os.makedirs(self.folder, exist_ok=True)
        name = file_name(result, ext)
        path = os.path.join(self.folder, name)
        stem, n = path[: -len(ext) - 1], 1
        while os.path.exists(path):                      # two saves in the same second keep both files
            path = f"{stem}-{n}.{ext}"
            n += 1
        result.save(path, **self.view_settings())
        self.last_path = path
        return path

    def _clicked(self, ext: str) -> None:
        try:
            path = self.save(ext)
        except Exception as e:                             # shown next to the buttons, escaped
            self.message.value = (f"<span style='color:#b71c1c'>export failed: "
                                  f"{html.escape(f'{type(e).__name__}: {e}')}</span>")
            return
        self.message.value = f"saved <code>{html.escape(path)}</code>"


def export_bar(explorer: Any, folder: str | os.PathLike = ".") -> ExportBar:
    """Export buttons (PNG, NPZ, JSON, HTML) for ``explorer`` (what ``nbx.explain`` returns), saving
    ``explorer.view.result`` with the view's opacity/colormap/sign/clip into ``folder``."""
    return ExportBar(explorer, folder)


from ._callable import callable_module  # noqa: E402

callable_module(__name__)   # nbx.export_bar(...) once this module is imported
