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
            if value.is_meta or value.layout != torch.strided:
                raise ValueError(f"{method}: {self.name}: a tensor {self.name} must be a dense tensor with values, "
                                 f"got one {'on the meta device' if value.is_meta else f'of layout {value.layout}'}; "
                                 "pass e.g. torch.zeros(...) or call .to_dense()")
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
    reduce: str = "sum"           # pixel methods: how channels collapse for display (sum | mean | absmax)
    reference: str = ""
    tags: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        where = f"register({self.name!r})"
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"register: a method's name is a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"{where}: decorates a function fn(ctx, **params), got {type(self.fn).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind={self.kind!r}; use one of {', '.join(map(repr, KINDS))}")
        if self.reduce not in ("sum", "mean", "absmax"):
            raise ValueError(f"{where}: reduce={self.reduce!r}; use 'sum', 'mean' or 'absmax'")
        for p in self.params:
            if not isinstance(p, Param) or p.type not in ("int", "float", "choice", "bool"):
                raise TypeError(f"{where}: params are Param(name, type, default, help, ...) with type 'int', "
                                f"'float', 'choice' or 'bool', got {p!r}")

    def checked(self, raw: Any, x: torch.Tensor) -> torch.Tensor:
        """What ``fn`` returned, or an error that names the shape the method's kind needs."""
        n = len(x)
        need = f"(N,C,H,W) like the input {tuple(x.shape)}" if self.kind == "pixel" else f"(N,h,w) with N={n}"
        if not isinstance(raw, torch.Tensor):
            raise TypeError(f"method {self.name!r} returned {type(raw).__name__}; a {self.kind} method returns a "
                            f"torch.Tensor of shape {need}")
        if (raw.shape != x.shape) if self.kind == "pixel" else (raw.ndim != 3 or raw.shape[0] != n):
            raise ValueError(f"method {self.name!r} returned shape {tuple(raw.shape)}; a {self.kind} method "
                             f"returns {need}")
        return raw

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
KINDS = ("pixel", "cam", "attention")


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
