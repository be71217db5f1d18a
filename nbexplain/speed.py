"""How a model's passes run fastest with the same logits: input memory format and BatchNorm folding."""
from __future__ import annotations

import math
import weakref
from typing import Callable, NamedTuple

import torch
from torch import nn

from .calls import call
from .folding import Pair, distinct_statistics, find_pairs, folded, folded_weights
from .hygiene import borrowed, forward_hooks, module_set, modules_of

_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_MAX_SHAPES = 8


class Plan(NamedTuple):
    memory_format: torch.memory_format    # for passes of ``min_batch`` or more samples
    pairs: tuple[Pair, ...]               # (conv, BN) pairs whose folding was checked to keep the logits
    single: torch.memory_format = torch.contiguous_format   # for one-sample passes
    min_batch: int = 2                    # smaller passes run the plain model (``_min_batch``)
    peak: int = 0                         # elements of the largest conv output, per sample (0: not measured)


NCHW = Plan(torch.contiguous_format, ())


def plan(model: nn.Module, x: torch.Tensor, probe: bool = True) -> Plan:
    """The fast paths for this model and input shape, probed once (two batch-1 forwards, at most four).
    With ``probe=False`` only a plan already probed is returned, else NCHW (one-sample passes: see
    ``single_format``; a first saliency call on resnet50 that probed took 2.3x captum's).

    - **BatchNorm folding** (any device): an eval-mode BN after a conv is an affine map, so the conv
      can apply it. That removes a memory pass per BN in the forward and one in the backward: 8% of a
      resnet50 forward + input backward on the CPU, 17% of EfficientNet-Lite0's (batch 16, measured).
    - **Channels-last** (CPU CNNs): oneDNN's NHWC kernels run a batched forward + input backward
      1.1-1.3x faster than NCHW. Only the *input* is converted; PyTorch carries the format through the
      network. At batch 1 it gains only where there are grouped (depthwise) convs: 5-10% on
      EfficientNet, MobileNetV3, RegNetY, ResNeXt, while plain ResNets lose 0-11% (resnet18/34/50),
      so one-sample passes of a net without grouped convs stay NCHW. CUDA keeps NCHW until measured.
    - **Small inputs**: both paths cost in proportion to the conv weights, so a net without grouped convs
      takes them only in passes of ``min_batch`` samples or more (``_ACTIVATIONS_PER_WEIGHT``): on CIFAR-size
      images a resnet18's weights outweigh its activations, and IG took 1.5x as long with them.

    A model whose code assumes NCHW strides, or whose conv output feeds more than its BN, would give
    other logits: each path is kept only if the logits match the plain model's.
    """
    if x.ndim != 4 or not x.is_floating_point():
        return NCHW
    # ViTs have one patch-embedding conv: nothing to gain
    found = once_per_shape(_CHOSEN, model, x, lambda: _probe(model, x[:1]) if _convs(model) >= 2 else NCHW,
                           run=probe)
    return NCHW if found is None else found


def single_format(model: nn.Module, x: torch.Tensor) -> torch.memory_format:
    """The memory format of a one-sample pass. Its probe costs two forwards, which a first call should not
    pay; but NHWC gains 6-11% at batch 1 on CPU nets with grouped convs (MobileNetV3, EfficientNet), so on
    such a net the second one-sample call at a shape probes, and every later call gains."""
    if once_per_shape(_CHOSEN, model, x, None, run=False) is None:
        if x.device.type != "cpu" or not _grouped(model) or not repeated(model, x, "plan"):
            return torch.contiguous_format
    return plan(model, x).single


def repeated(model: nn.Module, x: torch.Tensor, probe: str) -> bool:
    """Whether a call at x's shape declined ``probe`` on this model before; records that this one did (a
    probe that a first call should not pay runs on the second)."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, probe)
    declined = _DECLINED.setdefault(model, set())
    if key in declined:
        return True
    if len(declined) >= 2 * _MAX_SHAPES:
        declined.clear()
    declined.add(key)
    return False


_DECLINED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _grouped(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in modules_of(model))


def once_per_shape(cache: weakref.WeakKeyDictionary, model: nn.Module, x: torch.Tensor, probe, extra: tuple = (),
                   run: bool | Callable[[], bool] = True):
    """``probe()``, run once per model, input shape and set of submodules: a submodule replaced since
    (a BN swapped for Identity) means a new probe, as does a change in ``extra`` (settings the probe
    depends on). A model keeps at most 8 shapes (shapes seen are few). With ``run=False`` (or a function
    that says so when there is no result yet): the result if there is one, else None."""
    shapes = cache.setdefault(model, {})
    key = (tuple(x.shape[1:]), x.dtype, x.device, module_set(model), extra)
    if key not in shapes:
        if not (run() if callable(run) else run):
            return None
        if len(shapes) >= _MAX_SHAPES:
            shapes.clear()
        shapes[key] = probe()
    return shapes[key]


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def _probe(model: nn.Module, x: torch.Tensor) -> Plan:
    def run(fmt: torch.memory_format, pairs=()) -> torch.Tensor | None:
        try:
            with folded(list(pairs), folded_weights(list(pairs))):
                out = call(model, x.contiguous(memory_format=fmt))
        except Exception:   # noqa: BLE001 - any failure means "not safe"; the real pass reports its own errors
            return None
        return out if isinstance(out, torch.Tensor) else None

    convs = [m for m in modules_of(model) if isinstance(m, nn.Conv2d)]
    volume, peak = [0], [0]

    def count(_module, _inputs, out):
        if isinstance(out, torch.Tensor):
            volume[0] += out.numel()
            peak[0] = max(peak[0], out.numel())

    with borrowed(model), torch.no_grad(), distinct_statistics(model):
        ref: list[torch.Tensor | None] = []
        with forward_hooks((m, count) for m in convs):
            pairs = tuple(find_pairs(model, lambda: ref.append(run(torch.contiguous_format))))
        ref = ref[0]
        if ref is None or not bool(torch.isfinite(ref).all()):
            return NCHW
        least = _min_batch(model, sum(m.weight.numel() for m in convs), volume[0])
        # both paths together first (on most CNNs both hold: two forwards in all), then each alone
        fast = torch.channels_last if x.device.type == "cpu" else torch.contiguous_format
        for fmt, folds in dict.fromkeys([(fast, pairs), (torch.contiguous_format, pairs), (fast, ())]):
            if (fmt, folds) != NCHW and same_logits(run(fmt, folds), ref):
                return Plan(fmt, folds, fmt if least <= 1 else torch.contiguous_format, max(2, least), peak[0])
    return NCHW._replace(peak=peak[0])


# Both paths cost in proportion to the conv weights (folding multiplies them once per call; a channels-last
# pass copies each to that layout in its forward and backward) and gain in proportion to the activations.
# Integrated Gradients 16 steps (one pass of 16) against the plain model, CPU, medians of 11 interleaved:
# a plain ResNet loses where the pass's conv outputs are under ~0.7x its conv weights (resnet18 at 32 px,
# 0.07x: 173 vs 118 ms; at 64 px, 0.29x: 6% slower; at 96 px, 0.65x: 3%; resnet50 at 64 px, 0.62x: 7%) and
# gains above (resnet50 at 80 px, 0.8x: 1.21x; resnet18 at 112 px: 1.19x; at 224 px: 1.1-1.3x). A net with
# grouped convs gains at any size, its depthwise convs being far faster channels-last (MobileNetV3 at 24 px
# 1.2x, EfficientNet-Lite0 at 32 px 1.2x, ResNeXt-26 at 32 px 1.05x).
_ACTIVATIONS_PER_WEIGHT = 0.7


def _min_batch(model: nn.Module, weights: int, activations_per_sample: int) -> int:
    """The fewest samples in a pass for which the fast paths pay (``_ACTIVATIONS_PER_WEIGHT``)."""
    if _grouped(model):
        return 1
    return math.ceil(_ACTIVATIONS_PER_WEIGHT * weights / max(activations_per_sample, 1))


def same_logits(got: torch.Tensor | None, ref: torch.Tensor) -> bool:
    """Whether a fast path kept the plain model's logits (NaN or a changed shape never does)."""
    if got is None or got.shape != ref.shape:
        return False
    full = {torch.float32, torch.float64}
    rtol = 1e-4 if got.dtype in full and ref.dtype in full else 1e-2
    got, ref = got.float(), ref.float().to(got.device)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return torch.allclose(got, ref, rtol=rtol, atol=rtol * max(scale, 1.0))


def input_format(model: nn.Module, x: torch.Tensor) -> torch.memory_format:
    """The memory format of ``plan``."""
    return plan(model, x).memory_format
