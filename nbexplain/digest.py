"""The weights' identity: each tensor's address and in-place version, a fingerprint of their values (which
an edit through ``.data`` changes without a version), and the sha256 digest recorded in every result's
provenance, hashed in a worker thread while the passes run."""
from __future__ import annotations

import hashlib
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors

from .hygiene import modules_of

_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
# per model, one entry: its tensors' fingerprint groups and state dict, while it holds the same tensors (_layout)
_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def module_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer, from each module's own dicts (a state_dict() costs ~3x more)."""
    return [t for m in modules_of(model) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def tensor_key(tensors: list[torch.Tensor], values: bool = True) -> tuple[int, ...]:
    """Each tensor's (address, in-place version), interleaved, then (``values``) ``value_fingerprint`` of them
    all."""
    versions = tuple(v for t in tensors for v in (t.data_ptr(), t._version))
    return (*versions, value_fingerprint(tensors)) if values else versions


def value_fingerprint(tensors: list[torch.Tensor]) -> int:
    """A hash of every float tensor's sum and every other tensor's bytes. An edit through ``.data`` (or a
    numpy view) bumps no version counter: hand-written SGD (``p.data -= lr * p.grad``), a class's head row
    or a channel zeroed to ablate it, a layer's sign flipped. Three sampled values per tensor missed the
    zeroed row and channel, which left a stale weights digest (replay accepted the edited model) and a stale
    widget map; norms missed the sign flip. The sums read every value (on one CPU thread 6 ms for resnet50's
    100 MB, 7 ms for its norms); an edit that keeps a tensor's sum (a permutation of its values) still goes
    unseen."""
    return fingerprint_of(fingerprint_groups(tensors))


class Groups(NamedTuple):
    """``value_fingerprint``'s tensors sorted by how their values are read (which does not change while
    the tensors stay the same objects: the widget sorts them once, then reads them at every change)."""
    floats: list[list[torch.Tensor]]     # one list per device and dtype: their sums
    counts: list[torch.Tensor]           # one-element CPU tensors (BatchNorm's batch counters)
    scalars: list[list[torch.Tensor]]    # one-element tensors on another device: one copy back per device, dtype
    tables: list[torch.Tensor]           # other non-float tensors (index tables): their bytes


def fingerprint_groups(tensors: list[torch.Tensor]) -> Groups:
    floats: dict[tuple, list[torch.Tensor]] = {}
    counts: list[torch.Tensor] = []
    elsewhere: dict[tuple, list[torch.Tensor]] = {}
    tables: list[torch.Tensor] = []
    for t in tensors:
        if t.is_floating_point():
            if not t.is_meta:
                floats.setdefault((t.device, t.dtype), []).append(t)
        elif t.numel() == 1 and t.device.type == "cpu":    # BatchNorm's batch counters: most of the rest
            counts.append(t)
        elif t.numel() == 1 and not t.is_meta:             # a GPU's: one copy back for all, not a sync each
            elsewhere.setdefault((t.device, t.dtype), []).append(t)
        elif t.numel() and t.layout == torch.strided and not t.is_meta:      # index tables: small
            tables.append(t)
    return Groups([floats[k] for k in sorted(floats, key=str)], counts,
                  [elsewhere[d] for d in sorted(elsewhere, key=str)], tables)


class Queued(NamedTuple):
    """``queue_sums``' results, still being computed on their devices."""
    floats: dict[int, torch.Tensor]      # by index into Groups.floats
    scalars: dict[int, torch.Tensor]     # by index into Groups.scalars
    done: list                           # a CUDA event per device, recorded after them on the caller's stream


def queue_sums(groups: Groups) -> Queued:
    """The sums of each float group held off the CPU (a GPU's), queued now on its device without waiting:
    ``fingerprint_of`` on a worker thread then only copies them back. A worker that launched one sum per
    tensor itself (320 on resnet50) fought the attribution's thread for the GIL: on an H100 a one-image
    saliency call took twice captum's time, its ops stalled up to the 5 ms switch interval each."""
    with torch.no_grad():
        queued = Queued({i: _device_sums(g) for i, g in enumerate(groups.floats) if _fused(g)},
                        {i: _joined(g) for i, g in enumerate(groups.scalars)}, [])
    # the worker copies on its own stream: it waits for these first (the caller may have run on another stream)
    devices = {t.device for t in (*queued.floats.values(), *queued.scalars.values()) if t.device.type == "cuda"}
    for device in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        queued.done.append(event)
    return queued


def fingerprint_of(groups: Groups, queued: Queued | None = None) -> int:
    """``value_fingerprint`` of sorted tensors: reads their values now (``queued``: ``queue_sums`` of them)."""
    h = hashlib.blake2b(digest_size=8)
    queued = queued or Queued({}, {}, [])
    for event in queued.done:
        event.synchronize()
    with torch.no_grad():                         # one guard, not a detach per tensor (300 on a small net)
        for t in groups.tables:
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(repr([t.item() for t in groups.counts]).encode())
        for i, group in enumerate(groups.scalars):     # BatchNorm's batch counters on a GPU
            joined = queued.scalars[i] if i in queued.scalars else _joined(group)
            h.update(joined.cpu().numpy().tobytes())
        for i, group in enumerate(groups.floats):
            sums = queued.floats[i] if i in queued.floats else _device_sums(group) if _fused(group) else _cpu_sums(group)
            h.update(sums.double().cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


def _joined(group: list[torch.Tensor]) -> torch.Tensor:
    """One-element tensors of one device and dtype in one tensor (one kernel, not a copy each)."""
    return torch.cat([t.reshape(1) for t in group])


def _fused(group: list[torch.Tensor]) -> bool:
    """Sum in a few fused kernels (off the CPU, where each kernel costs a launch) or one sum per tensor."""
    return group[0].device.type != "cpu"


def _wide(group: list[torch.Tensor]) -> torch.dtype | None:
    """Half precision summed in fp32: a bf16 sum of a large tensor would round most edits away."""
    return torch.float32 if group[0].element_size() < 4 else None


def _cpu_sums(group: list[torch.Tensor]) -> torch.Tensor:
    """One sum per tensor, read in place (no copy)."""
    wide = _wide(group)
    try:
        return torch.stack([t.sum(dtype=wide) for t in group])
    except (RuntimeError, NotImplementedError):    # a dtype or layout without a sum kernel
        return torch.stack([t.float().sum() if t.layout == torch.strided else t.new_zeros(()) for t in group])


_CHUNK = 1 << 16      # elements per sum on a device
_RUN = 1 << 24        # elements laid end to end per copy: bounds its memory (64 MiB in fp32)


def _device_sums(group: list[torch.Tensor]) -> torch.Tensor:
    """Sums of fixed-size chunks of the tensors laid end to end: a handful of kernels for a whole model where
    one sum per tensor launched hundreds. A chunk that spans two tensors still changes with either one, and
    the sums are as deterministic as one per tensor (no atomics)."""
    wide = _wide(group)
    out: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    size = 0
    for t in [*group, None]:
        if run and (t is None or size + t.numel() > _RUN):
            flat = _flatten_dense_tensors(run)     # laid end to end in C++ (a reshape each: ~5 us apiece)
            whole = flat.numel() // _CHUNK * _CHUNK
            out += [flat[:whole].view(-1, _CHUNK).sum(1, dtype=wide), flat[whole:].sum(dtype=wide)[None]]
            run, size = [], 0
        if t is not None:
            t = t if t.layout == torch.strided else t.new_zeros(0)
            run.append(t if t.dtype in _SUMMABLE else t.float())
            size += t.numel()
    return torch.cat(out)


_SUMMABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def weights_digest(model: nn.Module, pending: Future | None = None) -> str:
    """sha256 of the parameters and buffers (memoised while their key is unchanged: ``start_digest``).
    ``pending``: what ``start_digest`` returned earlier in this call."""
    return (pending or start_digest(model)).result()


def start_digest(model: nn.Module, key: tuple | None = None) -> Future:
    """Begin ``weights_digest`` in a worker thread, so that it overlaps the attribution's passes (hashlib
    and the sums release the GIL; on a GPU the CPU is idle meanwhile). The tensors and their versions are
    taken now: a pass that swaps a module's weights (BatchNorm folding) does not touch them, and a tensor
    changed in place after this call changes the key of the next. ``key``: ``tensor_key`` of the model's
    tensors, where the caller has just computed it (the widget's fingerprint): a digest already made under
    that key is returned at once, without the state dict (2 ms on EfficientNet-Lite0, twice per widget
    change)."""
    global _HASHER
    known = _known_digest(model, key) if key is not None else None
    if known is not None:
        done: Future = Future()
        done.set_result(known)
        return done
    if _HASHER is None:
        _HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbexplain-digest")
    tensors = module_tensors(model)
    versions = tensor_key(tensors, values=False)
    groups, state = _layout(model, tensors, versions[::2])
    queued = queue_sums(groups) if key is None else None
    return _HASHER.submit(_digest, model, key, groups, queued, versions if key is None else None, state)


def _layout(model: nn.Module, tensors: list[torch.Tensor], addresses: tuple[int, ...]
            ) -> tuple[Groups, dict[str, Any]]:
    """``fingerprint_groups`` of ``tensors`` and the model's state dict (``keep_vars``: the tensors themselves,
    not a detached view of each), reused while its modules are the same objects holding the same tensors: a
    state dict whose every value is one of those tensors then holds the same ones again (their values are
    read when hashed). One holding anything else (a quantized module's packed weights, extra state) or built
    through state-dict hooks is built anew each call. Saves 0.5 ms a call on resnet50, 1.4 ms on the H100
    host's CPU, where a one-image pass takes 5 ms of GPU time."""
    modules = modules_of(model)
    # a parameter moved or cast (``.to``, ``.half()``) keeps its object but not its data (``addresses``: each
    # tensor's data_ptr): grouped anew
    ids = (*map(id, modules), *map(id, tensors), *addresses)
    hit = _LAYOUTS.get(model)
    if hit is not None and hit[0] == ids:
        return hit[1], hit[2] if hit[2] is not None else model.state_dict(keep_vars=True)
    groups, state = fingerprint_groups(tensors), model.state_dict(keep_vars=True)
    own = {id(t) for t in tensors}
    plain = all(isinstance(v, torch.Tensor) and id(v) in own for v in state.values()) and \
        not any(m.__dict__.get("_state_dict_hooks") or m.__dict__.get("_state_dict_pre_hooks") for m in modules)
    _LAYOUTS[model] = (ids, groups, state if plain else None)
    return groups, state


def _digest(model: nn.Module, key: tuple | None, groups: Groups | None, queued: Queued | None,
            versions: tuple | None, state: dict[str, torch.Tensor]) -> str:
    """The worker's part of ``start_digest``: the key's sums, then the cached digest or a new one."""
    key = (*versions, fingerprint_of(groups, queued)) if key is None else key
    digest = _known_digest(model, key)
    if digest is None:
        digest = _sha256(state)
        _DIGESTS[model] = (key, digest)
    return digest


def forget_digest(model: nn.Module, key: tuple) -> None:
    """Drop the digest made under ``key``, once the worker has finished what it was given: the values were
    found changed under an unchanged key (an edit through ``.data``), so a digest made meanwhile may be of
    the new values."""
    if _HASHER is not None:
        _HASHER.submit(lambda: None).result()
    hit = _DIGESTS.get(model)
    if hit is not None and hit[0] == key:
        del _DIGESTS[model]


def _known_digest(model: nn.Module, key: tuple) -> str | None:
    """The digest made under ``key``, if it is the last one made for ``model``. Only the worker writes
    ``_DIGESTS`` (and ``forget_digest``, once the worker is idle); other threads only read it."""
    hit = _DIGESTS.get(model)
    return hit[1] if hit is not None and hit[0] == key else None


_HASHER: ThreadPoolExecutor | None = None


def _sha256(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name, value in state.items():
        h.update(name.encode())
        _hash_value(h, value)
    return h.hexdigest()


def _hash_value(h: Any, value: Any) -> None:
    """A state-dict entry's bytes: a tensor's, a quantized tensor's integers and scales, or (what a quantized
    module keeps beside them: a dtype, a tuple of packed tensors) each item's, or its repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_quantized:
            h.update(repr(t.qscheme()).encode())
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                h.update(repr((t.q_scale(), t.q_zero_point())).encode())
            else:
                _hash_value(h, (t.q_per_channel_scales(), t.q_per_channel_zero_points(), t.q_per_channel_axis()))
            t = t.int_repr()
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(value, (tuple, list)):
        for item in value:
            _hash_value(h, item)
    else:
        h.update(repr(value).encode())
