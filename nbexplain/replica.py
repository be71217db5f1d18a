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

from torch import nn

from .hygiene import model_lock
from .models import describe, register


class Replica:
    """``get()``: the copy of ``model``, made again whenever the model is no longer what it copied."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._key: tuple | None = None
        self._copy: nn.Module | None = None
        self._lock = threading.Lock()

    def get(self) -> nn.Module:
        # under the model's own lock: a pass on the model itself (another thread's nbx.attribute) has
        # its hooks, folded weights and frozen flags on it, which a copy must not take
        with self._lock, model_lock(self.model):
            key = _shape_of(self.model)
            if key != self._key:
                self._copy, self._key = _copy(self.model), key
                if self._copy is not self.model:
                    register(self._copy, describe(self.model))   # the labels and preprocessing it was given
            return self._copy


def _shape_of(model: nn.Module) -> tuple:
    """What the copy must match: every module object, its hooks and forward overrides, and where each
    tensor's storage is (training in place keeps it; ``.to()``, ``p.data = ...`` or a new layer does not).
    Runs before every widget pass that uses the model: 1 ms for a ConvNeXt-Base."""
    mods = list(model.modules())
    return (tuple(map(id, mods)), tuple(m.__dict__.get("forward") for m in mods),
            tuple(tuple(h) for m in mods for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                                      m._backward_pre_hooks) if h),
            tuple((t.data_ptr(), t.shape) for m in mods for t in (*m._parameters.values(), *m._buffers.values())
                  if t is not None))


def _copy(model: nn.Module) -> nn.Module:
    """Modules copied; parameters aliased (same storage, own ``requires_grad``); buffers shared (a pass
    only reads them). A model that cannot be deep-copied is used as it is."""
    try:
        memo: dict = {id(b): b for b in model.buffers()}
        memo.update({id(p): nn.Parameter(p.detach(), p.requires_grad) for p in model.parameters()})
        return copy.deepcopy(model, memo)
    except Exception:   # noqa: BLE001 - locks, open files, parametrizations: fall back to the model itself
        return model
