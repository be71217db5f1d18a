"""nbexplain: see why a vision model decided, from a notebook."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import attribute, layers, methods  # noqa: E402
from .attribution import Attribution  # noqa: E402
from .images import Preprocess  # noqa: E402
from .models import load_model  # noqa: E402
from .widget import explain  # noqa: E402
from .export import replay  # noqa: E402
from .samples import sample_image, sample_images  # noqa: E402

__all__ = ["Attribution", "Preprocess", "attribute", "explain", "layers", "load_model", "methods", "replay", "sample_image",
           "sample_images"]
