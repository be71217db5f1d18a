"""Context managers that leave the user's model exactly as they found it."""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .allocator import reused_memory


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per model: hooks are module state, so two threads explaining the same
    model at once (a widget computing while the notebook calls nbx.attribute) would see each
    other's hooks. Every borrowed() holds it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def borrowed(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, parameters frozen, fused attention as requested; everything restored on exit.

    Restoring each module's own flags (not calling ``model.train()``) keeps mixed train/eval
    states intact, and freezing parameters means autograd only ever produces input gradients,
    so ``.grad`` of the user's parameters is never touched. Every computation with the model runs in
    this scope, so it is also where a CPU call keeps its large buffers for reuse (``reused_memory``).
    """
    with model_lock(model):
        walks = _SCOPE.__dict__.setdefault("walks", {})
        if id(model) in walks:
            yield model      # nested in this thread: the outer scope has set the flags and restores them
            return
        settled = _SETTLED.get(model)
        walks[id(model)] = (model, settled[0] if settled else module_tree(model))
        try:
            with reused_memory(model_device(model)):
                yield from (_attention_restored(model, settled[1]) if settled else _borrowed(model))
        finally:
            del walks[id(model)]


_SETTLED: "weakref.WeakKeyDictionary[nn.Module, tuple[list, list]]" = weakref.WeakKeyDictionary()


def settle(private: nn.Module) -> nn.Module:
    """Put a private copy of a model (``replica``) in eval mode with frozen parameters for good, so that
    ``borrowed`` need not walk it to set and restore those flags at every pass (0.5 ms a widget change on
    EfficientNet-Lite0). Only for a copy nothing else sees: its module tree must not change after this."""
    mods = module_tree(private)
    for m in mods:
        m.training = False
        for p in m._parameters.values():
            if p is not None:
                p.requires_grad_(False)
    _SETTLED[private] = (mods, [m for m in mods if _has_fused_flag(m)])
    return private


def _has_fused_flag(m: nn.Module) -> bool:
    return "fused_attn" in m.__dict__ or hasattr(type(m), "fused_attn")   # hasattr(m) raises per module


def _attention_restored(model: nn.Module, mods: list[nn.Module]) -> Iterator[nn.Module]:
    """Yields ``model``; on exit puts back the attention flags of ``mods`` that a pass may turn off (all that a
    settled copy needs restored, part of what ``_borrowed`` restores)."""
    saved = [(m, m.fused_attn) for m in mods]
    try:
        yield model
    finally:
        for m, flag in saved:
            m.fused_attn = flag


_SCOPE = threading.local()     # per thread: the module list of each model borrowed (``modules_of``)


def module_tree(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` at twice its speed: no names are built (0.1 ms on EfficientNet-Lite0)."""
    out, seen = [model], {id(model)}

    def visit(m: nn.Module) -> None:
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
                visit(child)
    visit(model)
    return out


def modules_of(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())``, walked once per ``borrowed`` scope: a call reads the module tree several
    times (flags, weights' versions, probe keys), ~0.4 ms a walk on resnet50, which a GPU call notices."""
    walked = getattr(_SCOPE, "walks", {}).get(id(model))
    return walked[1] if walked is not None and walked[0] is model else module_tree(model)


def module_set(model: nn.Module) -> int:
    """A key of which module objects make up ``model``: it changes when a submodule is replaced (a BN
    swapped for Identity, a new patch embedding), so what was probed on the old ones is probed again."""
    return hash(tuple(map(id, modules_of(model))))


def _borrowed(model: nn.Module) -> Iterator[nn.Module]:
    # only what differs is changed and restored: setting ~10k module flags per call is measurable,
    # and one walk over the modules (not three) keeps a cached widget update at a few ms
    training, grads, fused = [], [], []
    for m in modules_of(model):
        if m.training:
            training.append(m)
        grads += [p for p in m._parameters.values() if p is not None and p.requires_grad]
        if _has_fused_flag(m):
            fused.append(m)
    try:
        for m in training:
            m.training = False
        for p in grads:
            p.requires_grad_(False)
        yield from _attention_restored(model, fused)
    finally:
        for m in training:
            m.training = True
        for p in grads:
            p.requires_grad_(True)


def hooked(m: nn.Module) -> bool:
    """Whether a module has hooks of its own: a fast path that changes what runs inside it must not
    change what they see."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def global_hook_keys() -> tuple[int, ...]:
    """The handles of the hooks registered for every module: they change what a forward computes."""
    g = nn.modules.module
    return tuple(k for d in (g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks,
                             g._global_backward_pre_hooks) for k in d)


def global_hooks() -> bool:
    """Whether hooks registered for every module are set (``nn.modules.module.register_module_forward_hook``
    and kin): they see every module, so no fast path may change what runs."""
    g = nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


@contextmanager
def full_precision() -> Iterator[None]:
    """FP32 convolutions and matmuls on CUDA (TF32 off) for the call, so GPU maps match the CPU's;
    the user's global flags are restored on exit."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[int]:
    """Turn timm's fused attention off so the attention matrix is materialised; yields how many."""
    mods = [m for m in model.modules() if getattr(m, "fused_attn", None) is not None]
    saved = [(m, m.fused_attn) for m in mods]
    try:
        for m in mods:
            m.fused_attn = False
        yield len(mods)
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]]) -> Iterator[None]:
    """Register forward hooks for the duration of a block; always removed, even on error."""
    handles = []
    try:
        for module, hook in pairs:
            if isinstance(module, torch.jit.ScriptModule):
                raise TypeError("model: this method reads the model's layers through forward hooks, which "
                                "TorchScript modules (torch.jit.script/trace) do not run; pass the original "
                                "nn.Module, or use 'saliency', 'integrated_gradients', 'smoothgrad' or 'occlusion'")
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def hook_count(model: nn.Module) -> int:
    """Total number of hooks of every kind on the model (tests use it to prove nothing leaks)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, n, {})) for m in model.modules() for n in names)


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The floating dtype of the model's parameters (a bf16/fp16 model gets bf16/fp16 inputs)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)
