"""Occlusion's passes recompute only what each patch changes: the network's first modules, when they are
local (each output cell reads a bounded neighbourhood of its input), run on a crop around each patch, with
the halo that crop reads, instead of on the whole image.

The model is split, by one recorded forward, into a chain of modules called one after another from its
input (conv, BatchNorm, activation, pooling, residual blocks taken whole). How far each one's outputs reach
is probed with NaN rows and columns; the chain's local start is the *prefix*. A pass of occluded images
carries each image's changed box through the prefix on crops, pastes the boxes into the unoccluded
image's activations where the boxes have grown large, and runs the rest of the model from there. The whole
path is checked once per model and input shape against the plain forward (equal logits), and is off where
anything could see the difference: a hook anywhere in the model, or a module that reads a chain tensor
outside the chain."""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass
from typing import Callable, ContextManager, NamedTuple

import torch
from torch import nn

from .calls import call
from .hygiene import global_hooks, hooked, modules_of
from .kernels import substituted
from .speed import once_per_shape, same_logits

_PREFIXES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
# a unit runs on crops while its crop is at most this share of its output grid; past it, in full
CROP_SHARE = 0.7
MIN_SAVING = 0.15     # of a forward's time: below it, the crops' bookkeeping is not worth it
MAX_BASES = 1 << 30   # bytes of the unoccluded images' activations kept for a call: past it, whole images

Box = tuple[int, int, int, int]        # rows [y0, y1), columns [x0, x1)


@dataclass(frozen=True)
class Unit:
    """A module of the chain: output cell j (per axis) reads input cells [j·s − before, j·s + after]."""
    module: nn.Module
    stride: tuple[int, int]
    reach: tuple[tuple[int, int], tuple[int, int]]      # ((before, after) rows, (before, after) columns)


class Prefix(NamedTuple):
    units: tuple[Unit, ...]
    shapes: tuple[tuple[int, ...], ...]                 # each unit's output shape at batch 1
    shares: tuple[float, ...]                           # each unit's share of a forward's time (timed once)


# --- finding the prefix (once per model and input shape) --------------------------------------------------
def local_prefix(model: nn.Module, x: torch.Tensor, passing: Callable[[], ContextManager], setting: tuple = ()
                 ) -> Prefix | None:
    """The model's local first modules for inputs shaped like ``x`` (None where the path does not hold).
    ``passing()``: the environment the passes run in (folded BatchNorm, layout, exact kernels), yielding the
    input memory format; ``setting``: what decides that environment (the probe is kept per setting)."""
    if x.ndim != 4 or global_hooks() or any(hooked(m) for m in modules_of(model)):
        return None       # a hook would see the probe's passes, and crops where it expects images
    return once_per_shape(_PREFIXES, model, x, lambda: _probe(model, x[:1].detach(), passing), extra=setting)


def _probe(model: nn.Module, x: torch.Tensor, passing) -> Prefix | None:
    try:
        with torch.no_grad(), passing() as fmt:
            x = x.clone(memory_format=fmt)             # a model may write its input
            modules = chain(model, x)
            units, shapes, times, a = [], [], [], x
            for m in modules:
                out = m(a.clone())
                unit = _unit(m, a, out)
                if unit is None:
                    break
                times.append(_seconds(lambda: m(a.clone()), x.device))
                units.append(unit)
                shapes.append(tuple(out.shape))
                a = out
            if not units:
                return None
            whole = _seconds(lambda: call(model, x), x.device)
            prefix = Prefix(tuple(units), tuple(shapes), tuple(t / whole for t in times))
            xs = _trial_batch(x)
            boxes = _trial_boxes(x)
            ref = call(model, xs)
            got = Occluded(model, prefix, x, fmt, len(units)).logits(xs, boxes, [0] * len(xs))
    except Exception:   # noqa: BLE001 - any failure means "no incremental path"; the plain pass reports errors
        return None
    return prefix if same_logits(got, ref) else None


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of ``run()``, with a GPU's queued kernels finished on both sides."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def chain(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The modules the model calls one after another from its input, as fine as they go: a module whose
    children form such a chain from its input to its output is replaced by them (a Sequential by its
    blocks); one whose children do not (a residual block) stays whole. One recorded forward."""
    calls: list[_Call] = []
    stack: list[_Call] = []

    def pre(m, args, kwargs):
        if id(m) not in tree:       # a stand-in made for one pass (a folded BN's copy of its activation)
            return
        inp = args[0] if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) else None
        c = _Call(m, inp, inp._version if inp is not None else None)
        (stack[-1].children if stack else calls).append(c)
        stack.append(c)

    def post(m, _args, _kwargs, out):
        if id(m) not in tree:
            return
        c = stack.pop()
        c.out = out if isinstance(out, torch.Tensor) else None
        c.version = out._version if c.out is not None else None

    mods = list(model.modules())[1:]
    tree = set(map(id, mods))     # hooks dicts are shared by shallow copies, which fire them too
    handles = [h for m in mods for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                         m.register_forward_hook(post, with_kwargs=True))]
    try:
        call(model, x)
    finally:
        for h in handles:
            h.remove()
    return _follow(calls, x, x._version)[0]


class _Call:
    __slots__ = ("module", "inp", "inp_version", "out", "version", "children")

    def __init__(self, module: nn.Module, inp: torch.Tensor | None, inp_version: int | None) -> None:
        self.module, self.inp, self.inp_version, self.out, self.version, self.children = \
            module, inp, inp_version, None, None, []


def _follow(calls: list[_Call], t: torch.Tensor, version: int | None = None
            ) -> tuple[list[nn.Module], torch.Tensor | None, int | None]:
    """The chain through ``calls`` from tensor ``t`` (at in-place ``version``), and the tensor it ends at
    with its version then (None where it stopped inside a call: a wrapper whose own chain ends in its head).
    A tensor changed in place between two calls (``out += shortcut``) ends it."""
    units: list[nn.Module] = []
    for c in calls:
        if c.inp is not t or (version is not None and c.inp_version != version) or c.out is None:
            break
        inner, end, end_version = _follow(c.children, t, c.inp_version)
        if inner and end is c.out and end_version == c.version:
            units += inner                # its children are the chain: finer units
        elif c.out.ndim == 4:
            units.append(c.module)        # a block (its children branch): whole
        else:
            return units + inner, None, None    # it ends in something else (a wrapped network's logits)
        t, version = c.out, c.version
        if t.ndim != 4:
            break
    return units, t, version


def _unit(m: nn.Module, a: torch.Tensor, out: torch.Tensor) -> Unit | None:
    """The module as a local unit: integer strides, and a bounded reach on both axes (NaN probes)."""
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != 1:
        return None
    stride, reach = [], []
    for axis in (2, 3):
        n, n_out = a.shape[axis], out.shape[axis]
        s = round(n / n_out) if n_out else 0
        if s < 1 or -(-n // s) != n_out or n < 4 * s:
            return None
        c = (n // 2) // s * s
        probes = a.expand(s, *a.shape[1:]).clone()
        for r in range(s):
            probes.narrow(0, r, 1).narrow(axis, c + r, 1).fill_(float("nan"))
        hit = torch.isnan(m(probes))
        before = after = 0
        for r in range(s):
            cells = hit[r].any(dim=0).any(dim=1 if axis == 2 else 0).nonzero()[:, 0]
            if len(cells) == 0 or len(cells) == n_out or int(cells[-1] - cells[0]) + 1 != len(cells):
                return None             # untouched (a NaN-proof op), global, or not one band: not local
            p = c + r
            after, before = max(after, p - int(cells[0]) * s), max(before, int(cells[-1]) * s - p)
        stride.append(s)
        reach.append((before, after))
    return Unit(m, tuple(stride), tuple(reach))


def _trial_batch(x: torch.Tensor) -> torch.Tensor:
    """Two copies of x with noise in a corner patch and in a central one (the boxes of ``_trial_boxes``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = x.repeat(2, 1, 1, 1)
    for i, (y0, y1, x0, x1) in enumerate(_trial_boxes(x)):
        patch = torch.randn((x.shape[1], y1 - y0, x1 - x0), generator=g, dtype=x.dtype).to(x.device)
        xs[i, :, y0:y1, x0:x1] = patch
    return xs


def _trial_boxes(x: torch.Tensor) -> list[Box]:
    h, w = x.shape[2:]
    ph, pw = max(1, h // 8), max(1, w // 8)
    return [(0, ph, 0, pw), (h // 2, h // 2 + ph, w // 2, w // 2 + pw)]


# --- a pass ------------------------------------------------------------------------------------------------
def stop_for(prefix: Prefix, x_shape: tuple[int, ...], patch: tuple[int, int], itemsize: int = 4) -> int:
    """How many units run on crops for a patch of this size: while a central patch's changed box stays
    within ``CROP_SHARE`` of its unit's output grid. 0 where that saves under ``MIN_SAVING`` of a forward
    (a network whose first squeeze-excitation block comes early) or where the images' activations up to
    there would take more than ``MAX_BASES``."""
    h, w = x_shape[2:]
    box = (h // 2, min(h, h // 2 + patch[0]), w // 2, min(w, w // 2 + patch[1]))
    saved, stop = 0.0, len(prefix.units)
    for k, (unit, shape, share) in enumerate(zip(prefix.units, prefix.shapes, prefix.shares)):
        box = _grown(unit, box, shape[2:])
        cropped = (box[1] - box[0]) * (box[3] - box[2]) / (shape[2] * shape[3])
        if cropped > CROP_SHARE:
            stop = k
            break
        saved += share * (1 - cropped)
    kept = x_shape[0] * itemsize * sum(math.prod(shape[1:]) for shape in prefix.shapes[:stop])
    return stop if saved >= MIN_SAVING and kept <= MAX_BASES else 0


class Occluded:
    """Logits of copies of ``x`` changed inside a box each, through the first ``stop`` units of the prefix on
    crops. ``x``'s own activations at each unit are computed once, here. Runs inside the pass environment
    that ``local_prefix`` was given."""

    def __init__(self, model: nn.Module, prefix: Prefix, x: torch.Tensor, fmt: torch.memory_format,
                 stop: int) -> None:
        self.model, self.units, self.shapes, self.fmt = model, prefix.units[:stop], prefix.shapes[:stop], fmt
        self.bases = [x.contiguous(memory_format=fmt)]
        with torch.no_grad():
            for unit in self.units:
                self.bases.append(unit.module(self.bases[-1].clone()))   # an in-place unit (ReLU) writes its input

    def logits(self, xs: torch.Tensor, boxes: list[Box], images: list[int]) -> torch.Tensor:
        """Sample b of ``xs`` is image ``images[b]`` of x, changed only inside ``boxes[b]``."""
        if not self.units:
            return call(self.model, xs.contiguous(memory_format=self.fmt))
        crops = None
        for unit, base, nxt in zip(self.units, self.bases, self.bases[1:]):
            out_boxes = _uniform([_grown(unit, b, nxt.shape[2:]) for b in boxes], nxt.shape[2:])
            windows = _uniform([_needed(unit, b, base.shape[2:]) for b in out_boxes], base.shape[2:], unit.stride)
            if crops is None:       # the first unit reads its windows from the changed images themselves
                batch = torch.stack([xs[b, :, y0:y1, x0:x1] for b, (y0, y1, x0, x1) in enumerate(windows)])
            else:
                batch = torch.stack([base[i, :, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in zip(images, windows)])
                _paste(batch, windows, crops, boxes)
            out = unit.module(batch.contiguous(memory_format=self.fmt))
            (sy, sx), (h, w) = unit.stride, (out_boxes[0][1] - out_boxes[0][0], out_boxes[0][3] - out_boxes[0][2])
            crops = torch.stack([out[b, :, oy - wy // sy:oy - wy // sy + h, ox - wx // sx:ox - wx // sx + w]
                                 for b, ((oy, _, ox, _), (wy, _, wx, _)) in enumerate(zip(out_boxes, windows))])
            boxes = out_boxes
        full = self.bases[-1].index_select(0, torch.tensor(images, device=xs.device))
        _paste(full, [(0, full.shape[2], 0, full.shape[3])] * len(boxes), crops, boxes)
        with standing_in(self.units, self.shapes, full):
            return call(self.model, xs.contiguous(memory_format=self.fmt))


def _grown(unit: Unit, box: Box, out: tuple[int, int]) -> Box:
    """The output cells that read any input cell of ``box``."""
    spans = []
    for (lo, hi), s, (before, after), n in zip((box[:2], box[2:]), unit.stride, unit.reach, out):
        spans += [max(0, -(-(lo - after) // s)), min(n, (hi - 1 + before) // s + 1)]
    return tuple(spans)


def _needed(unit: Unit, box: Box, n_in: tuple[int, int]) -> Box:
    """The input cells that output ``box`` reads."""
    spans = []
    for (j0, j1), s, (before, after), n in zip((box[:2], box[2:]), unit.stride, unit.reach, n_in):
        spans += [max(0, j0 * s - before), min(n, (j1 - 1) * s + after + 1)]
    return tuple(spans)


def _uniform(boxes: list[Box], n: tuple[int, int], stride: tuple[int, int] = (1, 1)) -> list[Box]:
    """The boxes grown to one size (a batch), each still covering its own and starting at a multiple of the
    stride (so the crop's output grid is the full one's, and one at the far edge ends where the input does)."""
    out = [[], []]
    for axis, (size, s) in enumerate(zip(n, stride)):
        spans = [(b[2 * axis], b[2 * axis + 1]) for b in boxes]
        length = max(hi - lo for lo, hi in spans) + s - 1
        length = min(size, length + (size - length) % s)
        out[axis] = [(start, start + length) for start in (min(lo - lo % s, size - length) for lo, _ in spans)]
    return [(*r, *c) for r, c in zip(*out)]


def _paste(into: torch.Tensor, windows: list[Box], crops: torch.Tensor, boxes: list[Box]) -> None:
    """Write each sample's changed box (``crops[b]`` at ``boxes[b]``) into its window of ``into``."""
    for b, ((wy0, wy1, wx0, wx1), (y0, y1, x0, x1)) in enumerate(zip(windows, boxes)):
        ty0, ty1, tx0, tx1 = max(y0, wy0), min(y1, wy1), max(x0, wx0), min(x1, wx1)
        if ty1 > ty0 and tx1 > tx0:
            into[b, :, ty0 - wy0:ty1 - wy0, tx0 - wx0:tx1 - wx0] = crops[b, :, ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]


def standing_in(units: tuple[Unit, ...], shapes: tuple[tuple[int, ...], ...], full: torch.Tensor
                ) -> ContextManager[None]:
    """For one forward: the last unit returns ``full``; the ones before it return NaN (read by nothing, if the
    chain is one: the probe's check fails otherwise) without computing."""
    nan = torch.full((), float("nan"), dtype=full.dtype, device=full.device)
    pairs = [(u.module, lambda *_a, _shape=(len(full), *shape[1:]), **_k: nan.expand(_shape))
             for u, shape in zip(units[:-1], shapes)]
    return substituted(pairs + [(units[-1].module, lambda *_a, **_k: full)])
