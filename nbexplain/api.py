"""The public entry points: attribute() and layers()."""
from __future__ import annotations

import datetime
import hashlib
import platform
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointError

from .methods import REGISTRY, get as get_method
from ._errors import closest, positive_int
from .attribution import Attribution, display_map, normalise, on_image
from .calls import eager, inputs_for, probabilities
from .allocator import reusable_bytes
from .context import DISCONNECTED, REENTRANT, Context, recomputes_segments
from .hygiene import borrowed, full_precision, model_device
from .images import Prepared, Preprocess, prepare
from .layers import candidates, grid_extent, layer_name
from .digest import start_digest, weights_digest
from .models import ModelInfo, describe
from .speed import plan

TOPK = 5


def attribute(model: nn.Module, images: Any, method: str = "saliency", *, target: Any = None,
              layer: str | nn.Module | None = None, labels: Sequence[str] | None = None,
              preprocess: Preprocess | None = None, batch_size: int | None = None,
              progress: Callable[[float], None] | None = None, **params: Any
              ) -> Attribution | list[Attribution]:
    """Explain ``model``'s decision on ``images`` with ``method``.

    ``images``: a path, PIL image, HWC numpy array, (C,H,W)/(N,C,H,W) preprocessed tensor, or a list.
    ``target``: None (the predicted class), a class index, a class name, or one per image.
    ``layer`` (CAM methods): a name from ``nbx.layers(model)`` or the module itself (``model.layer4``).
    Method parameters (``steps=``, ``samples=``, ``noise=``…) are listed by ``nbx.methods()``.
    Returns one Attribution for one image, a list for a list or an (N,C,H,W) tensor.
    """
    spec = get_method(method)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress: expected a function of the fraction done (0..1), got {type(progress).__name__}")
    model = eager(model)
    layer = layer_name(model, layer)
    info = describe(model, preprocess, labels)
    prepared = prepare(images, info.preprocess)
    chosen = spec.validate(params)
    if layer is not None and not spec.needs_layer:
        raise ValueError(f"layer: {method!r} does not use a layer; layer methods are "
                         f"{', '.join(m.name for m in REGISTRY.values() if m.needs_layer)}")
    with borrowed(model):                          # one walk of the module tree serves the whole call
        weights = start_digest(model)              # hashed while the passes run (provenance)
        run = compute(model, prepared.x, spec, chosen, target=target, layer=layer, info=info,
                      batch_size=batch_size, progress=progress)
    results = package(run, prepared, info, model, weights)
    single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
    return results[0] if single else results


@dataclass
class Run:
    """What compute() produced for a batch, before it is split per image (a dataclass, so the
    widget's cache can count the tensors it holds against its budget)."""

    spec: Any
    params: dict
    raw: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    meta: dict
    per_image: dict
    device: torch.device


def compute(model: nn.Module, x: torch.Tensor, spec, params: dict, *, target: Any, layer: str | None,
            info: ModelInfo, batch_size: int | None = None, memo: MutableMapping | None = None,
            progress: Callable[[float], None] | None = None, logits: torch.Tensor | None = None,
            keep_intermediates: bool = False) -> Run:
    """Run one method on a preprocessed batch, with the model borrowed (restored on exit)."""
    device = model_device(model)
    if device.type == "meta":
        raise ValueError("model: its weights are on the meta device (created without data); materialise them "
                         "first, e.g. model.to_empty(device='cpu') then model.load_state_dict(...)")
    if spec.vit_only and not any(n.endswith("attn_drop") for n, _ in model.named_modules()):
        raise ValueError(f"method {spec.name!r} needs a Vision Transformer: it reads timm-style attention "
                         f"modules (an 'attn_drop' after the softmax), and {type(model).__name__} has none. Use "
                         "'gradcam', 'integrated_gradients' or 'occlusion', which work on any model")
    if batch_size is not None:
        batch_size = positive_int("batch_size", batch_size,
                                  "samples per forward, or None to choose one from the free memory")
    # gradients are needed even when the caller is inside torch.inference_mode()
    with torch.inference_mode(False), borrowed(model), full_precision():
        x = inputs_for(model, x)
        if x.is_inference():
            x = x.clone()                          # an inference tensor cannot enter autograd

        def choose(seen: torch.Tensor) -> torch.Tensor:
            if seen.ndim != 2 or seen.shape[0] != x.shape[0] or seen.shape[1] == 0:
                raise ValueError(f"model: expected class scores of shape (N, classes), got {tuple(seen.shape)}; "
                                 "wrap the model so it returns logits")
            if info.labels is not None and len(info.labels) != seen.shape[1]:
                raise ValueError(f"labels: got {len(info.labels)} names for a model with {seen.shape[1]} classes; "
                                 "pass one name per class, in the order of the model's outputs")
            return resolve_targets(target, seen, info.labels)

        chunk = batch_size or auto_batch_size(x, device, model)

        def run() -> tuple[Context, torch.Tensor]:
            ctx = Context(model, x, choose, info.preprocess, chunk, memo=memo if memo is not None else {},
                          progress=progress, layer_name=layer, keep_intermediates=keep_intermediates)
            # chosen by the caller, or smaller than the main thread's (the widget's): replay uses it too (a pass
            # of one sample runs without the batched fast paths, whose maps differ by ~1e-3)
            if batch_size is not None or chunk != auto_batch_size(x, device):
                ctx.meta["batch_size"] = chunk
            if len(x) > 1:               # replay runs as many copies, so that its passes hold what these held
                ctx.meta["batch_images"] = len(x)
            if logits is not None:
                ctx.seen(logits.to(device))
            return ctx, spec.checked(spec.fn(ctx, **params), x)

        ctx, raw = _attempt(run, model)
        finite, nonzero = torch.stack([torch.isfinite(raw.sum()), raw.any()]).tolist()   # one read back
        if not (finite or bool(torch.isfinite(raw).all())):     # a finite sum says so; else look closer
            ctx.warn(f"{spec.name}: the attribution holds NaN or infinite values, shown as 0; the gradients "
                     "overflowed or the method divided by zero", stacklevel=3)
            raw = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
        if not nonzero and not ctx.meta.get("warnings"):   # a method that says why has said so
            _warn_empty(ctx, spec.name)
        # a map on a ViT's patch grid that covers more (or less) than the input: where to lay it
        extent = grid_extent(model, tuple(raw.shape[1:]), tuple(x.shape[2:])) \
            if spec.kind != "pixel" and raw.ndim == 3 else None
        if extent:
            ctx.meta["grid_extent"] = list(extent)
        targets = ctx.targets                      # a method that never looked at x still gets them
        logits = ctx.logits
    return Run(spec, params, raw.detach(), targets.cpu(), logits.cpu(), ctx.meta, ctx.per_image, device)


def _attempt(run: Callable[[], tuple[Context, torch.Tensor]], model: nn.Module) -> tuple[Context, torch.Tensor]:
    """``run()``; again, swapping nothing, if the model turns out to checkpoint a segment itself
    (``torch.utils.checkpoint``: its backward recomputed the segment with the pass's swapped weights put
    back). torch's errors for a model that input gradients cannot pass are said with their fix."""
    try:
        return run()
    except CheckpointError:
        if not recomputes_segments(model):     # known before: something else went wrong
            raise
        return run()
    except RuntimeError as e:
        if "use_reentrant=True" in str(e):
            raise ValueError(REENTRANT) from e
        if "not have been used in the graph" in str(e):
            raise ValueError(DISCONNECTED) from e
        raise


def _warn_empty(ctx: Context, method: str) -> None:
    ctx.warn(f"{method}: the map is zero everywhere, so it shows nothing; its settings may discard everything "
             "(attention_rollout's discard_ratio, one SmoothGrad/VarGrad sample), or the score may not depend on "
             "what it reads (a layer after the last one the head uses)", stacklevel=4)


def auto_batch_size(x: torch.Tensor, device: torch.device, model: nn.Module | None = None) -> int:
    """Samples per forward/backward for expanded work (IG steps, noise samples, windows). Off the main thread
    (the widget's) on the CPU, few enough that the model's largest activation stays in reusable memory
    (``allocator.reusable_bytes``), once its fast-path probe has measured that activation."""
    pixels = x.shape[1] * x.shape[2] * x.shape[3]
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(8, min(256, free // (pixels * 4 * 400))))   # ~400 floats per pixel of activations
    chunk = int(max(4, min(64, (16 * 3 * 224 * 224) // pixels)))
    limit = reusable_bytes(device)
    peak = plan(model, x, probe=False).peak * x.element_size() if limit and model is not None else 0
    fits = limit // peak if peak else 0
    # a power of two: step and sample counts are, so no chunk is left with a remainder's short pass
    return min(chunk, 1 << (fits.bit_length() - 1)) if fits >= 2 else chunk


def resolve_targets(target: Any, logits: torch.Tensor, labels: Sequence[str] | None) -> torch.Tensor:
    n, classes = logits.shape
    if target is None:
        return logits.argmax(1)
    if isinstance(target, (torch.Tensor, np.ndarray)):
        target = target.tolist()                 # a 0-d one becomes a plain number
    if isinstance(target, (list, tuple, np.ndarray)):
        if len(target) != n:
            raise ValueError(f"target: got {len(target)} targets for {n} images; pass one per image or one for all")
        return torch.tensor([class_index(t, classes, labels) for t in target])
    return torch.full((n,), class_index(target, classes, labels), dtype=torch.long)


def class_index(t: Any, classes: int, labels: Sequence[str] | None, name: str = "target") -> int:
    """A class given by index or name, checked against the model's ``classes`` (``name``: what the error
    calls it)."""
    if isinstance(t, str):
        if not labels:
            raise ValueError(f"{name}={t!r}: this model has no class names; pass labels=[...] or a class index")
        wanted = t.strip().lower()
        found = [i for i, label in enumerate(labels) if wanted == label.strip().lower()] or \
            [i for i, label in enumerate(labels) if wanted in (s.strip().lower() for s in label.split(","))]
        if len(found) == 1:
            return found[0]
        if found:     # ImageNet has 19 such names: 'crane' is a bird (134) and a machine (517)
            raise ValueError(f"{name}={t!r} names {len(found)} classes: "
                             f"{', '.join(f'{i} ({labels[i]!r})' for i in found)}; pass the class index")
        synonyms = [s.strip() for label in labels for s in label.split(",")]
        raise ValueError(f"{name}={t!r}: no class of that name.{closest(t, synonyms)}")
    if isinstance(t, (torch.Tensor, np.ndarray)) and t.ndim == 0:
        t = t.item()                     # a label as a data loader gives it
    if isinstance(t, (bool, float)) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"{name}: expected a class index or name, got {t!r}")
    if not 0 <= int(t) < classes:
        raise ValueError(f"{name}={int(t)} is out of range: the model has {classes} classes (0..{classes - 1})")
    return int(t)


def package(run: Run, prepared: Prepared, info: ModelInfo, model: nn.Module, weights: Future | None = None
            ) -> list[Attribution]:
    """Split a batch run into per-image Attributions with display maps and provenance (``weights``: what
    ``start_digest`` returned before the run)."""
    probs = probabilities(run.logits)
    k = min(TOPK, probs.shape[1])
    top_p, top_i = (t.tolist() for t in probs.topk(k, 1))
    reduce_, signed = run.meta.pop("display", (run.spec.reduce, run.spec.signed))
    common = provenance(run, info, model, weights)
    # one copy back of the whole batch (each copy from a GPU waits for its queue)
    raws, inputs = run.raw.float().cpu(), prepared.x.detach().cpu()
    out = []
    for i in range(len(run.targets)):
        raw = raws[i:i + 1]
        m = display_map(raw, run.spec.kind, reduce_, tuple(prepared.x.shape[2:]),
                        run.meta.get("grid_extent")).numpy()
        original = prepared.originals[i]
        m = on_image(m, original, prepared.boxes[i] if prepared.boxes else None)
        m, scale = normalise(m)
        t = int(run.targets[i])
        label = info.labels[t] if info.labels else None
        tensors = {key: own_rows(v, i, len(run.targets)) for key, v in run.params.items()
                   if isinstance(v, torch.Tensor)}
        meta = dict(common, target=t, label=label, signed=signed, display_reduce=reduce_,
                    crop_box=list(prepared.boxes[i]) if prepared.boxes and prepared.boxes[i] else None,
                    **run.meta, **{key: v[i] for key, v in run.per_image.items()})
        meta["params"] = {**meta["params"], **{key: tensor_note(v) for key, v in tensors.items()}}
        image = original if original is not None else _pixels(inputs[i], info.preprocess)
        out.append(Attribution(m, raw, t, label,
                               [(j, info.labels[j] if info.labels else None, p)
                                for p, j in zip(top_p[i], top_i[i])], meta, image, scale,
                               inputs[i:i + 1], tensors))
    return out


def _pixels(x: torch.Tensor, preprocess: Preprocess | None) -> np.ndarray | None:
    if preprocess is None or x.shape[0] not in (1, 3) or x.shape[0] != preprocess.channels:
        return None
    px = preprocess.denormalize(x[None].cpu())[0].clamp(0, 1).expand(3, -1, -1)    # gray shown as gray
    return (px.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def own_rows(t: torch.Tensor, i: int, n: int) -> torch.Tensor:
    """Image ``i``'s part of a tensor parameter: its row when the tensor holds one per image."""
    t = t.detach().float().cpu()
    return t[i:i + 1].clone() if n > 1 and t.ndim == 4 and t.shape[0] == n else t.clone()


def tensor_note(t: torch.Tensor) -> dict:
    """A tensor parameter in the provenance: its shape and the sha256 of its float32 values."""
    data = t.detach().float().cpu().contiguous().numpy().tobytes()
    return {"tensor": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()}


def provenance(run: Run, info: ModelInfo, model: nn.Module, weights: Future | None = None) -> dict:
    import timm
    from . import __version__
    params = {k: v for k, v in run.params.items() if not isinstance(v, torch.Tensor)}   # tensors: per image
    return {"method": run.spec.name, "params": params, "model": info.name, "model_class": type(model).__name__,
            "model_source": info.source, "weights_sha256": weights_digest(model, weights),
            "preprocess": info.preprocess.as_dict() if info.preprocess else None,
            "versions": {"nbexplain": __version__, "torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
            "device": str(run.device), "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "model_mode": "eval (restored after the call)"}


def layers(model: nn.Module, image: Any = None, *, all: bool = False,
           preprocess: Preprocess | None = None) -> list[dict]:
    """Candidate layers for layer methods, in depth order, with kind and grid."""
    model = eager(model)
    info = describe(model, preprocess)
    if image is not None:
        shape = tuple(prepare(image, info.preprocess).x.shape)
    elif info.preprocess is not None:
        shape = (1, info.preprocess.channels, *info.preprocess.size)
    else:
        raise ValueError("layers: this model has no preprocessing config; pass an example image "
                         "(nbx.layers(model, x)) or preprocess=nbx.Preprocess(...)")
    with borrowed(model):
        return [layer.as_dict() for layer in candidates(model, shape, all_layers=all)]
