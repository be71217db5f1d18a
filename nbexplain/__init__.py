"""nbexplain: see why a vision model decided, from a notebook."""
from __future__ import annotations

__version__ = "0.1.0"

from . import methods  # noqa: E402  (callable: nbx.methods() lists them)
from .api import attribute, layers  # noqa: E402
from .attribution import Attribution  # noqa: E402
from .export import replay  # noqa: E402
from .images import Preprocess  # noqa: E402
from .models import load_model  # noqa: E402
from .samples import sample_image, sample_images  # noqa: E402

__all__ = ["Attribution", "Preprocess", "TrustPanel", "attribute", "explain", "explain_batch", "export_bar",
           "gallery", "layers", "load_model", "methods", "replay", "sample_image", "sample_images"]

# the widget stack (anywidget, ipywidgets, bqplot) loads only when a widget is used
_LAZY = {"explain": "widget", "gallery": "gallery", "explain_batch": "batch", "export_bar": "export_bar",
         "TrustPanel": "trust.panel"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nbexplain' has no attribute {name!r}")
