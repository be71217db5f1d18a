"""Error helpers: messages that name the argument and suggest the fix."""
from __future__ import annotations

import difflib
from typing import Any, Iterable

import numpy as np


def closest(name: str, options: Iterable[str], n: int = 3) -> str:
    """' Did you mean: a, b?' for the closest options, or '' when none is close."""
    hits = difflib.get_close_matches(str(name), list(options), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(h) for h in hits)}?" if hits else ""


def unknown(kind: str, name: str, options: Iterable[str]) -> ValueError:
    options = list(options)
    shown = ", ".join(repr(o) for o in options[:12]) + (" …" if len(options) > 12 else "")
    return ValueError(f"unknown {kind} {name!r}.{closest(name, options)} Valid: {shown}")


class NotAnInteger(TypeError, ValueError):
    """A count given as something else (2.5, True, '8'): a TypeError, and a ValueError as the other
    argument checks of a call raise."""


def positive_int(name: str, value: Any, meaning: str = "") -> int:
    """``value`` as an int, or an error naming the argument: counts (steps, batch sizes) are whole and >= 1."""
    note = f" ({meaning})" if meaning else ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise NotAnInteger(f"{name}={value!r}: expected a positive integer{note}")
    if value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer{note}")
    return int(value)
