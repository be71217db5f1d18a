"""The method registry: each attribution method is one decorated function with a parameter schema."""
from __future__ import annotations

import math
import sys
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .._errors import unknown


@dataclass(frozen=True)
class Param:
    """One method parameter: enough for validation, docs and the widget's controls."""

    name: str
    type: str                                   # int | float | choice | bool
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple = ()
    special: tuple = ()                          # extra accepted values, e.g. "auto" for steps
    tensor: bool = False                         # a tensor is also accepted (e.g. a custom IG baseline)
    # the real range is the model's (a ViT's blocks, heads): the method checks it and names the model's
    # count; min/max only size the widget's slider
    model_range: bool = False

    def validate(self, method: str, value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.ndim > 0:
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            if not self.tensor:
                raise TypeError(f"{method}: {self.name}: a tensor is not accepted here")
            if value.is_complex():
                raise ValueError(f"{method}: {self.name}: a tensor {self.name} must hold real numbers, got {value.dtype}")
            value = value if value.is_floating_point() else value.float()       # integer zeros are zeros
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{method}: {self.name}: a tensor {self.name} must hold finite values (got NaN or Inf)")
            return value                         # shape is checked where it is used (make_baseline)
        if isinstance(value, np.generic):        # numpy scalars: np.int64(32) is 32
            value = value.item()
        where = f"{method}: {self.name}={value!r}"
        if isinstance(value, str) and value in self.special:
            return value
        if self.type == "choice":
            if value not in self.choices:
                raise unknown(f"value for {self.name!r} of {method!r}:", value, self.choices)
            return value
        if self.type == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{where}: expected True or False")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.type == "int" and not float(value).is_integer()):
            extra = f" or {', '.join(map(repr, self.special))}" if self.special else ""
            raise TypeError(f"{where}: expected {'an integer' if self.type == 'int' else 'a number'}{extra}")
        value = int(value) if self.type == "int" else float(value)
        if self.model_range:
            return value
        if not math.isfinite(value) or (self.min is not None and value < self.min) or \
                (self.max is not None and value > self.max):
            raise ValueError(f"{where}: must be within [{self.min}, {self.max}]")
        return value

    def schema(self) -> dict:
        d = asdict(self)
        d["choices"] = list(self.choices)
        d["special"] = list(self.special)
        return d


@dataclass(frozen=True)
class Method:
    """A registered method. ``fn(ctx, **params)`` returns the method-native ``raw`` tensor."""

    name: str
    fn: Callable
    kind: str                     # pixel (input-shaped) | cam (N,h,w at a layer) | attention (N,h,w, ViT)
    summary: str
    signed: bool                  # the display map keeps its sign
    params: tuple[Param, ...] = ()
    needs_layer: bool = False
    vit_only: bool = False
    reduce: str = "sum"           # pixel methods: how channels collapse for display (sum | absmax)
    reference: str = ""
    tags: tuple[str, ...] = field(default=())

    def validate(self, given: dict) -> dict:
        known = {p.name: p for p in self.params}
        extra = [k for k in given if k not in known]
        if extra:
            raise unknown(f"parameter for {self.name!r}:", extra[0], known) if known else \
                TypeError(f"{self.name!r} takes no parameters, got {', '.join(extra)}")
        return {name: p.validate(self.name, given.get(name, p.default)) for name, p in known.items()}

    def schema(self) -> dict:
        return {"name": self.name, "kind": self.kind, "summary": self.summary, "signed": self.signed,
                "needs_layer": self.needs_layer, "vit_only": self.vit_only, "reference": self.reference,
                "params": [p.schema() for p in self.params]}


REGISTRY: dict[str, Method] = {}


def register(name: str, **spec: Any) -> Callable[[Callable], Callable]:
    """Decorator: add ``fn`` to the registry under ``name``."""
    def deco(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        REGISTRY[name] = Method(name=name, fn=fn, **spec)
        return fn
    return deco


def get(name: str) -> Method:
    if not isinstance(name, str):
        raise TypeError(f"method: expected a method name such as 'gradcam', got {type(name).__name__}")
    if name not in REGISTRY:
        raise unknown("method", name, REGISTRY)
    return REGISTRY[name]


def schemas() -> list[dict]:
    """Every method with its parameter schema (name, type, default, range, help)."""
    return [m.schema() for m in REGISTRY.values()]


class _Listing(types.ModuleType):
    """``nbx.methods()`` lists the methods while ``nbexplain.methods`` stays this package: a function
    of that name in ``nbexplain`` would shadow it (``import nbexplain.methods.integrated`` failed)."""

    def __call__(self) -> list[dict]:
        return schemas()


sys.modules[__name__].__class__ = _Listing

SEED = Param("seed", "int", 0, "random seed: the same seed gives the same map", 0, 2**31 - 1, 1)

# importing the method modules fills the registry
from . import gradients, smoothgrad, integrated, cams, occlusion, attention  # noqa: E402,F401
