"""Submodules named like the function they export (``nbx.gallery``, ``nbx.export_bar``) stay callable as it.

Importing ``nbexplain.gallery`` sets the package's ``gallery`` attribute to the module, hiding the function
``nbx.gallery`` had named until then (``'module' object is not callable``); so the module calls it."""
from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def callable_module(name: str) -> None:
    """Make module ``name`` (a ``__name__``) call its function of the same name."""
    sys.modules[name].__class__ = _CallableModule
