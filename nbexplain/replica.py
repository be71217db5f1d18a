"""A private copy of the user's module tree, for explaining in a background thread.

A pass borrows the model: eval mode, frozen parameters, BatchNorm folded into conv weights, fast paths
swapped in. On the notebook's own thread nothing else runs meanwhile, but the widget and the trust panel
compute in the background, where the next cell may save, train or inspect the model mid-pass. Their
passes run on this copy instead: its own module and parameter objects over the model's own storage, so
it costs no weight memory and always computes with the current weights.
"""
from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from .hygiene import model_lock, module_tree, settle
from .digest import tensor_key
from .models import describe, register


class Replica:
    """``get()``: the copy of ``model``, made again whenever the model is no longer what it copied.
    ``refresh()`` does the same check and returns the tensors and their versions (the widget's fingerprint),
    so a widget update walks the model once; ``copy`` is the copy as of the last check; ``generation``
    counts the copies made (a new one: new modules, hooks or forward overrides, which change the maps)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._copy: nn.Module | None = None
        self._layout: tuple | None = None
        self.generation = 0
        self._lock = threading.Lock()

    def get(self) -> nn.Module:
        self.refresh()
        return self._copy

    @property
    def copy(self) -> nn.Module:
        return self._copy if self._copy is not None else self.get()

    def refresh(self) -> tuple[tuple[int, ...], list[torch.Tensor]]:
        """The copy brought up to date; returns each of the model's tensors' (address, in-place version)
        and the tensors (whose values the widget checks itself: ``digest.fingerprint_of``)."""
        # under the model's own lock: a pass on the model itself (another thread's nbx.attribute) has
        # its hooks, folded weights and frozen flags on it, which a copy must not take
        with self._lock, model_lock(self.model):
            layout, tensors = _walk(self.model)
            if layout != self._layout:
                self._copy, self._layout = settle(_copy(self.model)), layout
                self.generation += 1
                if self._copy is not self.model:
                    register(self._copy, describe(self.model))   # the labels and preprocessing it was given
            return tensor_key(tensors, values=False), tensors


def _walk(model: nn.Module) -> tuple[tuple, list[torch.Tensor]]:
    """What the copy must match (every module object, its hooks and forward overrides, where each tensor's
    storage is: training in place keeps it, ``.to()``, ``p.data = ...`` or a new layer does not), and the
    tensors, in one walk (1 ms for EfficientNet-Lite0)."""
    mods = module_tree(model)
    tensors = [t for m in mods for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
    hooks = [k for m in mods for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                       m._backward_pre_hooks) if d for k in d]
    layout = (tuple(map(id, mods)), tuple([t.data_ptr() for t in tensors]), tuple([t.shape for t in tensors]),
              tuple([m.__dict__.get("forward") for m in mods]), tuple(hooks))
    return layout, tensors


def _copy(model: nn.Module) -> nn.Module:
    """Modules copied; parameters aliased (same storage, own ``requires_grad``, which ``settle`` turns
    off); buffers shared (a pass only reads them). A model that cannot be deep-copied (a lock, an open file,
    an old-style weight_norm after a backward) gets a copy of its module tree alone (``tree_copy``)."""
    params = {id(p): nn.Parameter(p.detach(), p.requires_grad) for p in model.parameters()}
    try:
        return copy.deepcopy(model, {id(b): b for b in model.buffers()} | params)
    except Exception:   # noqa: BLE001 - whatever deepcopy refuses, the tree copy does not need
        return tree_copy(model, params, {})


def tree_copy(module: nn.Module, params: dict, done: dict) -> nn.Module:
    """Each module copied shallowly: its own attribute dict, with its own dicts of children, parameters,
    buffers and hooks (what a pass changes: flags, swapped weights, forward overrides, hooks); any other
    attribute (the lock deepcopy refused) is shared with the model's module."""
    if id(module) in done:
        return done[id(module)]
    twin = done[id(module)] = copy.copy(module)
    for name, value in module.__dict__.items():
        if isinstance(value, dict) and name.startswith("_"):
            twin.__dict__[name] = copy.copy(value)
    twin._parameters.update({n: params.get(id(p), p) for n, p in module._parameters.items() if p is not None})
    twin._modules.update({n: tree_copy(c, params, done) for n, c in module._modules.items() if c is not None})
    return twin
