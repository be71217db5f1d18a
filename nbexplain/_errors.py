"""Error helpers: messages that name the argument and suggest the fix."""
from __future__ import annotations

import difflib
from typing import Iterable


def closest(name: str, options: Iterable[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest options, or '' when none is close."""
    hits = difflib.get_close_matches(str(name), list(options), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(h) for h in hits)}?" if hits else ""


def unknown(kind: str, name: str, options: Iterable[str]) -> ValueError:
    options = list(options)
    shown = ", ".join(repr(o) for o in options[:12]) + (" …" if len(options) > 12 else "")
    return ValueError(f"unknown {kind} {name!r}.{closest(name, options)} Valid: {shown}")
