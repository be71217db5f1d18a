"""What a method sees while it runs: the model, the batch, targets, and the passes it may ask for."""
from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterator, MutableMapping, NamedTuple

import torch
from torch import nn

from .calls import call
from .hygiene import forward_hooks, hooked, modules_of, unfused_attention
from .images import Preprocess
from .incremental import Occluded, local_prefix, stop_for
from .layers import (Layer, as_spatial, channels_first, checked, first_tensor, output_module, resolve, submodule,
                     token_layout)
from .folding import folded, folded_weights
from .speed import Plan, plan, single_format
from .kernels import substituted, substitutes
from .workarounds import batchnorm_fixes
from .stem import input_gradient_sum, input_stem, summed_at_stem
from .tail import Tail, dead_tokens, pruned


REENTRANT = ("model: it runs a segment through torch.utils.checkpoint with use_reentrant=True, which input "
             "gradients (torch.autograd.grad) cannot pass; call checkpoint(..., use_reentrant=False), or turn "
             "checkpointing off while explaining (timm: model.set_grad_checkpointing(False))")
DISCONNECTED = ("model: its scores do not reach the input through differentiable operations (a quantized or "
                "integer layer, or a detach, cuts the path), so gradient methods cannot run; use 'occlusion' or "
                "'scorecam', which need forward passes only, or explain the float model")
_RECOMPUTING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def differentiable(score: torch.Tensor) -> torch.Tensor:
    """``score``, or an error that says why the model's output carries no gradient."""
    if not score.requires_grad:
        raise ValueError("model: its scores carry no gradient (its forward runs under torch.no_grad(), detaches "
                         "its output, returns integers or checkpoints with use_reentrant=True), so gradient "
                         "methods cannot run; return differentiable logits, or use 'occlusion', which needs "
                         "forward passes only")
    return score


def recomputes_segments(model: nn.Module) -> bool:
    """Remember that ``model``'s backward recomputes segments (``torch.utils.checkpoint`` in its forward, which
    a torch ``CheckpointError`` revealed): its passes swap nothing from now on. False if already known."""
    if model in _RECOMPUTING:
        return False
    _RECOMPUTING.add(model)
    return True


@dataclass
class Context:
    """One attribution call. Every pass runs under ``hygiene.borrowed`` (set up by the caller, around
    the construction too: choosing the input's memory format may probe the model)."""

    model: nn.Module
    x: torch.Tensor                       # (N,C,H,W) on the model's device, never modified
    choose: Callable[[torch.Tensor], torch.Tensor]   # logits at x -> (N,) target classes
    preprocess: Preprocess | None
    batch_size: int                       # samples per forward/backward in expanded work
    memo: MutableMapping = field(default_factory=dict)   # reusable partial results (pipeline cache)
    progress: Callable[[float], None] | None = None
    meta: dict = field(default_factory=dict)             # what the method reports (layer, warnings)
    per_image: dict = field(default_factory=dict)        # reports with one value per image (IG's delta)
    layer_name: str | None = None
    keep_intermediates: bool = False     # keep per-point gradients in memo (the widget refines them later)
    logits: torch.Tensor | None = None   # at x, from the first pass that saw exactly x
    _quiet: int = field(default=0, init=False, repr=False)   # > 0 inside a caller that reports itself
    _targets: torch.Tensor | None = field(default=None, init=False, repr=False)
    _folded: list | None = field(default=None, init=False, repr=False)   # this call's folded BN weights
    _occluders: dict = field(default_factory=dict, init=False, repr=False)   # patch -> Occluded, or None

    @cached_property
    def plan(self) -> Plan:
        """The batched passes' fast paths (``speed.plan``), probed on the first batched pass."""
        return plan(self.model, self.x)

    # --- targets -----------------------------------------------------------------------------------
    @property
    def targets(self) -> torch.Tensor:
        """(N,) target classes. Chosen from the logits of the first pass at x: a method whose own first
        pass is at x (saliency, CAMs, attention) needs no separate forward to know its target."""
        if self._targets is None:
            with torch.no_grad():
                self.seen(self.forward(self.x))
        return self._targets

    def seen(self, logits: torch.Tensor) -> torch.Tensor:
        """Record the logits of a pass at exactly x; returns the targets (chosen now if still open)."""
        if self.logits is None:
            self.logits = logits.detach()
        if self._targets is None:
            self._targets = self.choose(self.logits).to(self.x.device)
            scores = self.logits.gather(1, self._targets[:, None])
            # one read back for both checks (each read waits for a GPU's queue)
            broken, softmax = torch.stack([torch.isnan(self.logits).any() | ~torch.isfinite(scores).all(),
                                           _probabilities(self.logits)]).tolist()
            if broken:
                raise ValueError("model: its scores at this input are NaN or infinite, so every map would be too; "
                                 "check the weights (a diverged training run?) and the input's preprocessing")
            if softmax:
                self.warn("model: its outputs are non-negative and sum to 1 for every image: probabilities (a "
                          "softmax at its end?), not logits. A probability's gradient mixes in every other class "
                          "and the reported probabilities apply a second softmax: explain the model without its "
                          "final softmax", stacklevel=4)
        return self._targets

    # --- basic passes ------------------------------------------------------------------------------
    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """Every model pass goes through here, so callers can see how many samples were evaluated."""
        self.meta["evaluations"] = self.meta.get("evaluations", 0) + len(xs)
        with self.passing(len(xs)) as fmt:
            return _checked(call(self.model, xs.contiguous(memory_format=fmt)), len(xs))

    @contextmanager
    def passing(self, samples: int) -> Iterator[torch.memory_format]:
        """What a pass of ``samples`` runs under; yields its input memory format.

        Passes of two or more samples run with BatchNorm folded and in the batched layout
        (``speed.plan``) once they are big enough for that to pay (``Plan.min_batch``): folding costs
        about a batch-1 pass's saving (20-50 ms for resnet50 on the CPU), so it is done once per call. A
        one-sample pass runs the model's own convs and BatchNorms, so that an export made with
        ``batch_size=1`` replays exactly (a first call cannot fold: the fold's check is two forwards, and a
        folded ReLU6 net's maps move ~1e-3). A ViT's last block skips the tokens its head never reads
        (``_tail``). Every pass runs exact equivalents of slow kernels (``kernels``: TF-"same" depthwise
        convs unpadded, NCHW max-pooling in channels-last)."""
        swap = samples >= 2 and self.swaps_allowed
        pairs = list(self.plan.pairs) if swap and self._paying(samples) else []
        if pairs and self._folded is None:
            self._folded = folded_weights(pairs)
        fmt = self.layout(samples)
        tail = self._tail(samples)
        faster = (self._substitutes + (self._batchnorm_fixes if samples < 2 else [])) if self.swaps_allowed else []
        with folded(pairs, self._folded or []), pruned(self.model, tail), substituted(faster):
            yield fmt

    def prepare(self, samples: int) -> None:
        """Probe now what a pass of ``samples`` takes (``passing``). Probing runs forwards, so a pass that hooks
        the model calls this before its hooks go on: they would record the probe's passes too."""
        self.layout(samples)
        self._tail(samples)

    def layout(self, samples: int) -> torch.memory_format:
        """The input memory format of a pass of ``samples`` (a one-sample pass probes only when it pays:
        ``single_format``)."""
        if samples < 2:
            return self._single
        return self.plan.memory_format if self._paying(samples) else torch.contiguous_format

    def chunks(self, start: int, stop: int) -> list[range]:
        """Copies ``start..stop`` of the batch (``len(x)`` samples each) in the fewest passes of at most
        ``batch_size`` samples, their sizes within one of each other: a short last pass costs more per sample
        (one of a single sample takes no batched fast path), so 25 SmoothGrad samples in passes of up to 8 run
        as 6+6+6+7, not 8+8+8+1."""
        most = max(1, self.batch_size // len(self.x))
        passes = -(-(stop - start) // most)
        ends = [start + (stop - start) * j // passes for j in range(passes + 1)] if passes > 0 else [start]
        return [range(a, b) for a, b in zip(ends, ends[1:])]

    def _paying(self, samples: int) -> bool:
        """Whether a batched pass is big enough for the fast paths to pay (``Plan.min_batch``)."""
        return samples >= self.plan.min_batch

    def _tail(self, samples: int) -> Tail | None:
        """The ViT tail a pass of ``samples`` prunes: a batched pass once the logits at x are known probes
        for it (more passes follow); a call's first pass, or a one-sample one, takes it where a probe was
        made (``tail.dead_tokens``)."""
        if not self.swaps_allowed:
            return None
        return self.tail if samples >= 2 and self.logits is not None else self._known_tail

    @cached_property
    def _substitutes(self) -> list:
        return substitutes(modules_of(self.model))

    @cached_property
    def _batchnorm_fixes(self) -> list:
        return batchnorm_fixes(modules_of(self.model), self.x.device)

    @cached_property
    def _single(self) -> torch.memory_format:
        return single_format(self.model, self.x)      # once per call: it counts the calls it declines to probe

    @cached_property
    def _known_tail(self) -> Tail | None:
        return dead_tokens(self.model, self.x)      # once per call: it counts the calls it declines to probe

    def scores(self, xs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Target logits of a batch, without gradients, chunked."""
        out = []
        with torch.no_grad():
            for i in range(0, len(xs), self.batch_size):
                logits = self.forward(xs[i:i + self.batch_size])
                out.append(logits.gather(1, targets[i:i + self.batch_size, None])[:, 0])
        return torch.cat(out)

    def occluded_scores(self, xs: torch.Tensor, boxes: list, images: list[int], targets: torch.Tensor,
                        patch: tuple[int, int]) -> torch.Tensor:
        """``scores`` of copies of x changed only inside a box each (sample b: image ``images[b]``, changed in
        ``boxes[b]``): the model's local first modules run on crops around the boxes (``incremental``)."""
        occluded = self._occluded(patch)
        if occluded is None:
            return self.scores(xs, targets)
        try:
            with torch.no_grad(), self.passing(self.batch_size):
                logits = occluded.logits(xs, boxes, images)
        except RuntimeError:          # a window the probe did not foresee: whole images from here on
            logits = None
        if logits is None or logits.shape[0] != len(xs) or torch.isnan(logits).any():
            self._occluders[patch] = None         # (NaN: something read a stood-in activation after all)
            return self.scores(xs, targets)
        self.meta["evaluations"] = self.meta.get("evaluations", 0) + len(xs)
        return _checked(logits, len(xs)).gather(1, targets[:, None])[:, 0]

    def _occluded(self, patch: tuple[int, int]) -> Occluded | None:
        memo = self._occluders
        if patch not in memo:
            memo[patch] = None
            # on a GPU the crops' many small kernels cost more than the whole images they save (H100, batch 8:
            # EfficientNet-Lite0 0.9 s against captum's 58 ms)
            if self.swaps_allowed and self.batch_size >= 2 and self.x.device.type == "cpu":
                with torch.no_grad():
                    prefix = local_prefix(self.model, self.x, lambda: self.passing(self.batch_size),
                                          (self._paying(self.batch_size), self.layout(self.batch_size)))
                    stop = stop_for(prefix, tuple(self.x.shape), patch, self.x.element_size()) if prefix else 0
                    if stop:
                        with self.passing(self.batch_size) as fmt:
                            memo[patch] = Occluded(self.model, prefix, self.x, fmt, stop)
        return memo[patch]

    def scores_with_x(self, xs: torch.Tensor) -> torch.Tensor:
        """Target logits of ``xs`` (one sample per image, IG's baseline) from a pass that also runs x when its
        logits are not known yet, which chooses the targets: one pass instead of two. A one-sample pass on
        a small image takes PyTorch's slow (im2col) conv path: for resnet50 at 48 px two took 138 ms and
        one of both 95 ms (at 224 px: 386 vs 376 ms, CPU, one thread)."""
        n = len(self.x)
        if self.logits is not None or 2 * n > self.batch_size:
            return self.scores(xs, self.targets)
        with torch.no_grad():
            logits = self.forward(torch.cat([self.x, xs.to(self.x.dtype)]))
        targets = self.seen(logits[:n])
        return logits[n:].gather(1, targets[:, None])[:, 0]

    def input_grads(self, xs: torch.Tensor, targets: torch.Tensor | None,
                    hooks: Callable[[], object] = nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
        """d target-logit / d input for a batch, chunked; also returns the target logits.

        ``targets=None`` means ``xs`` is x itself with its own targets: when x fits in one chunk,
        its logits from this very pass choose the targets (no extra forward).
        """
        at_x = targets is None
        if at_x and len(xs) > self.batch_size:
            targets = self.targets
        grads, scores = [], []
        self.prepare(min(len(xs), self.batch_size))       # before ``hooks`` go on
        for i in range(0, len(xs), self.batch_size):
            xi = xs[i:i + self.batch_size].detach().requires_grad_(True)
            with torch.enable_grad(), hooks():
                logits = self.forward(xi)
                t = self.seen(logits) if targets is None else targets[i:i + self.batch_size]
                score = logits.gather(1, t[:, None])[:, 0]
                (g,) = torch.autograd.grad(differentiable(score).sum(), xi)
            grads.append(g)
            scores.append(score.detach())
            self.report(min(1.0, (i + len(xi)) / len(xs)))
        return torch.cat(grads), torch.cat(scores)

    def input_grad_sum(self, xs: torch.Tensor, targets: torch.Tensor, weights: list[float]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Σₖ wₖ·∂f/∂x over the k copies of each image in ``xs`` ((k·N, C, H, W), copy-major, one weight
        per copy), and the target scores: all that IG's path and SmoothGrad's mean need.

        Through the model's linear input conv (``stem.input_stem``) the sum is formed before that conv's
        backward, which then runs once per chunk instead of once per sample."""
        n = len(self.x)
        # nothing to share when a chunk holds one copy of the batch: no probe then either
        stem = self.stem if len(xs) > n and self.batch_size >= 2 * n and self.swaps_allowed else None
        if stem is None or hooked(stem):
            g, s = self.input_grads(xs, targets)
            return sum(w * g[j * n:(j + 1) * n] for j, w in enumerate(weights)), s
        total, scores = torch.zeros_like(self.x), []
        per_chunk = max(1, self.batch_size // n)
        self.prepare(per_chunk * n)      # probed now: a probe must see the plain stem, not the swapped one
        for j in range(0, len(weights), per_chunk):
            rows = slice(j * n, (j + per_chunk) * n)
            with torch.enable_grad(), summed_at_stem(stem, n, weights[j:j + per_chunk]) as state:
                logits = self.forward(xs[rows].detach())
                score = logits.gather(1, targets[rows, None])[:, 0]
                total += input_gradient_sum(state, differentiable(score).sum())
            scores.append(score.detach())
            self.report(min(1.0, (j + per_chunk) / len(weights)))
        return total, torch.cat(scores)

    @cached_property
    def swaps_allowed(self) -> bool:
        """Whether a pass may swap weights or forwards (folding, the stem sum, the ViT tail) for its duration:
        gradient checkpointing (timm's flag, or ``torch.utils.checkpoint`` found by ``recomputes_segments``)
        recomputes segments in the backward with the modules as they are then."""
        # a plain attribute (timm's) is read from the instance dict: getattr on a module without it raises inside
        # nn.Module.__getattr__, 0.7 ms over EfficientNet-Lite0's 274 modules
        return self.model not in _RECOMPUTING and not any(m.__dict__.get("grad_checkpointing") is True
                       or (hasattr(type(m), "grad_checkpointing") and getattr(m, "grad_checkpointing") is True)
                       for m in modules_of(self.model))

    @cached_property
    def tail(self):
        """The last ViT block and the tokens the head reads (``tail.dead_tokens``), looked up once per call."""
        return dead_tokens(self.model, self.x, self.logits)

    @cached_property
    def stem(self) -> nn.Conv2d | None:
        """The model's linear input conv (``stem.input_stem``), looked up once per call."""
        return input_stem(self.model, self.x, self.logits)

    def warn(self, msg: str, stacklevel: int = 2) -> None:
        """A warning now, and in the result's ``meta['warnings']`` (once: a method may run per chunk)."""
        warnings.warn(msg, stacklevel=stacklevel + 1)
        if msg not in self.meta.get("warnings", ()):
            self.meta["warnings"] = (*self.meta.get("warnings", ()), msg)   # a tuple: a list would be split per image

    def report(self, fraction: float) -> None:
        if self.progress is not None and not self._quiet:
            self.progress(fraction)

    @contextmanager
    def quietly(self) -> Iterator[None]:
        """Passes made inside report nothing: the caller reports its own (outer) fraction, so the
        progress seen by the user only goes up (an inner chunk would otherwise report 1.0)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # --- layers ------------------------------------------------------------------------------------
    def layer(self) -> Layer:
        found = resolve(self.model, tuple(self.x.shape), self.layer_name, lazy=True)
        self.meta["layer"] = found.name
        return found

    def capture(self, layer: Layer, gradients: bool = True, input_grad: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Activations A (N,C,h,w) at a layer and dA = d target-logit / dA, from one forward/backward.

        Memoised per layer, so switching between CAM methods at a layer reruns nothing.
        """
        # a capture with gradients also serves a request without them
        keys = [("capture", layer.name, g, input_grad) for g in dict.fromkeys((gradients, True))]
        hit = next((k for k in keys if k in self.memo), None)
        if hit is None:
            hit = keys[0]
            self.memo[hit] = self._capture([layer], gradients, input_grad)
        acts, grads, gx = self.memo[hit]
        return acts[layer.name], (grads or {}).get(layer.name), gx

    def capture_all(self, layers: list[Layer]) -> None:
        """One forward/backward capturing every given layer, so later layer switches run no model pass."""
        result = self._capture(layers, True, False)
        for layer in layers:
            self.memo[("capture", layer.name, True, False)] = result

    def _capture(self, layers: list[Layer], gradients: bool, input_grad: bool):
        modules = {layer.name: submodule(self.model, layer.name) for layer in layers}
        outputs: dict[str, torch.Tensor] = {}
        hooked = {name: output_module(m) for name, m in modules.items()}

        def hook_for(name):
            def hook(_m, _inp, out):
                t = first_tensor(out)
                t = graph_start(t) if gradients else t
                outputs[name] = t
                # later in-place ops (ReLU(inplace=True)) must not rewrite what we captured
                clone = t.clone()
                if isinstance(out, torch.Tensor):
                    return clone
                # the graph starts at the whole output: PiT's stage returns (patch tokens, class tokens) and
                # its head reads only the latter, whose gradient must still reach the score
                rest = [graph_start(o) if gradients and isinstance(o, torch.Tensor) else o for o in out[1:]]
                return same_container(out, [clone, *rest])
            return hook

        x = self.x.detach().requires_grad_(input_grad)
        hw = tuple(x.shape[2:])
        self.prepare(len(x))
        with torch.enable_grad() if gradients or input_grad else torch.no_grad(), \
                forward_hooks((hooked[layer.name], hook_for(layer.name)) for layer in layers):
            logits = self.forward(x)
            targets = self.seen(logits)
            missing = [layer.name for layer in layers if layer.name not in outputs]
            if missing:
                raise RuntimeError(f"layer {missing[0]!r} did not run during the forward pass (the model may call "
                                   "its children directly); pick one of its sub-layers from nbx.layers(model)")
            for layer in layers:
                got_shape = channels_first(modules[layer.name], outputs[layer.name], self.model, hw).shape
                checked(self.model, layer, modules[layer.name], tuple(got_shape), tuple(self.x.shape))
            grads = None
            wrt = [outputs[layer.name] for layer in layers] + ([x] if input_grad else [])
            if gradients or input_grad:
                score = logits.gather(1, targets[:, None]).sum()
                got = torch.autograd.grad(differentiable(score), wrt, allow_unused=True)
                got = [torch.zeros_like(t) if g is None else g for g, t in zip(got, wrt)]
        hw = tuple(self.x.shape[2:])
        acts, grads = {}, {} if gradients else None
        for i, layer in enumerate(layers):
            module = modules[layer.name]
            # float32 maps from a half-precision model: the CAMs' SVD and score tables need it
            t = channels_first(module, outputs[layer.name].detach(), self.model, hw).float()
            layout = token_layout(self.model, t.shape[1], hw) if t.ndim == 3 else None
            acts[layer.name] = as_spatial(t, layout)
            if gradients:
                grads[layer.name] = as_spatial(channels_first(module, got[i], self.model, hw).float(), layout)
        gx = got[-1] if input_grad else None
        self.report(1.0)
        return acts, grads, gx

    # --- attention (ViTs) --------------------------------------------------------------------------
    def attention(self, gradients: bool = False) -> "Attention":
        """Every attention matrix the forward computed (timm's ``attn_drop`` input, in execution order)
        and, optionally, d target-logit / d attention."""
        key = ("attention", gradients)
        if key not in self.memo:
            self.memo[key] = self._attention(gradients)
        return self.memo[key]

    def _attention(self, gradients: bool) -> "Attention":
        mods = [(n, m) for n, m in self.model.named_modules() if n.endswith("attn_drop")]
        maps: list[torch.Tensor] = []
        names: list[str] = []

        def hook(name):
            def record(_m, _inp, out):
                out = graph_start(out) if gradients else out
                maps.append(out)
                names.append(name.removesuffix(".attn_drop"))
                return out.clone()          # later ops use the clone, so d score / d out is defined
            return record

        x = self.x.detach()
        self.prepare(len(x))
        with unfused_attention(self.model), forward_hooks((m, hook(n)) for n, m in mods), \
                torch.enable_grad() if gradients else torch.no_grad():
            logits = self.forward(x)
            targets = self.seen(logits)
            if not maps:
                raise ValueError("attention methods: no attention matrix was captured; the model has no timm-style "
                                 "'attn_drop' after its softmax. Attention methods need a timm Vision "
                                 "Transformer (ViT, DeiT, EVA...); use 'gradcam' instead, at its default layer "
                                 "or one that nbx.layers(model) lists")
            grads = None
            if gradients:
                score = logits.gather(1, targets[:, None]).sum()
                grads = [g.detach() for g in torch.autograd.grad(differentiable(score), maps)]
        self.report(1.0)
        return Attention([m.detach() for m in maps], grads, names)


def _checked(logits: torch.Tensor, samples: int) -> torch.Tensor:
    """Every pass's output: real class scores, one row per sample (a model may break this only for some batch
    sizes, which the first pass at one image would not show)."""
    if logits.ndim != 2 or logits.shape[0] != samples or not logits.is_floating_point():
        raise ValueError(f"model: expected real class scores of shape (N, classes) for a batch of N={samples}, got "
                         f"{tuple(logits.shape)} {str(logits.dtype).replace('torch.', '')}; wrap the model so it "
                         "returns logits, one row per input")
    return logits


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Outputs that look like a softmax's: several classes, non-negative, each row summing to 1 (a bool
    tensor, read back by the caller)."""
    rows = logits.float()
    return (rows >= 0).all() & ((rows.sum(1) - 1).abs() < 1e-4).all() & (rows.shape[1] > 1)


def same_container(out: tuple | list, items: list):
    """``items`` in the container ``out`` came in: SelecSLS's blocks pass a list on and wrap anything else."""
    if isinstance(out, list):
        return items
    return type(out)(*items) if hasattr(out, "_fields") else tuple(items)     # a namedtuple, a tuple


def graph_start(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a leaf that needs a gradient, unless the graph already reaches it.

    The input never requires grad for a layer's or an attention map's gradient, and the parameters are
    frozen: the autograd graph starts at the first captured tensor, so the passes before it record
    nothing (6-13% of a CNN's Grad-CAM on the CPU).
    """
    if t.requires_grad or not t.is_floating_point():
        return t
    return t.detach().requires_grad_(True)


class Attention(NamedTuple):
    maps: list[torch.Tensor]                 # per block, (N, heads, queries, keys) for a plain ViT
    grads: list[torch.Tensor] | None
    names: list[str]                         # the attention module of each block


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Guided backprop: ReLU/ReLU6 pass only positive gradients back. Yields how many were hooked.

    The gradient arriving at each ReLU output is clamped at zero by a hook on that output tensor (the ReLU's
    own backward then applies its mask): no copy of the activation, unlike an identity autograd function,
    which must clone it so that later in-place ops on it stay legal (3% of a resnet50 pass). A hook on a
    tensor later changed in place still sees the gradient of the value it was registered on."""
    relus = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]

    def hook(_m, _inp, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(_positive)

    with forward_hooks((m, hook) for m in relus):
        yield len(relus)


def _positive(g: torch.Tensor) -> torch.Tensor:
    return g.clamp(min=0)
