"""nbexplain: see why a vision model decided, from a notebook."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import attribute, layers, methods  # noqa: E402
from .attribution import Attribution  # noqa: E402
from .export import replay  # noqa: E402
from .images import Preprocess  # noqa: E402
from .models import load_model  # noqa: E402
from .samples import sample_image, sample_images  # noqa: E402

__all__ = ["Attribution", "Preprocess", "attribute", "explain", "layers", "load_model", "methods", "replay",
           "sample_image", "sample_images"]


def __getattr__(name: str):
    # the widget stack (anywidget, ipywidgets, bqplot) loads only when the widget is used
    if name == "explain":
        from .widget import explain
        return explain
    raise AttributeError(f"module 'nbexplain' has no attribute {name!r}")
