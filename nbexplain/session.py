"""The explorer's pipeline: image -> preprocess -> forward -> workspace -> attribution -> display."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .methods import get as get_method
from .api import Run, compute, package
from .attribution import Attribution
from .calls import call, inputs_for, probabilities
from .context import Context
from .hygiene import borrowed, global_hook_keys
from .images import Prepared, area_resize, prepare, shrunk_size
from .layers import candidates
from .digest import Groups, fingerprint_groups, fingerprint_of, forget_digest, queue_sums, start_digest
from .models import ModelInfo
from .pipeline import ByteLRU, Graph, Record, Stage, Workspace, digest
from .replica import Replica

DISPLAY_MAX_SIDE = 512
DEFAULT_CACHE_BYTES = 512 * 2**20


@dataclass
class Item:
    """One image the explorer can show."""

    label: str
    source: Any            # what prepare() accepts: PIL image or (C,H,W) tensor
    hash: str


@dataclass
class Shown:
    """What the display stage hands to the frontend: the map at display resolution (the pixels under
    it come from Session.pixels, only when the image changes)."""

    map: np.ndarray        # (h, w) float32, method-native units (not normalised)
    result: Attribution


def family(method: str) -> str:
    """Methods of a family share one workspace: CAMs share a capture of every layer."""
    return {"cam": "cam", "attention": "attention"}.get(get_method(method).kind, "pixel")


def method_params(state: dict) -> tuple:
    spec = get_method(state["method"])
    return tuple((p.name, _hashable(state.get(p.name, p.default))) for p in spec.params)


def layer_of(state: dict) -> str:
    """The layer, only for methods that use one (so a layer change never reruns IG)."""
    return (state.get("layer") or "") if get_method(state["method"]).needs_layer else ""


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


class Session:
    """Memoised computation for one model and a list of images; bounded cache, freed by close()."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, items: list[Item],
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.model, self.info, self.items = model, info, items
        self.private = Replica(model)         # what the passes run on: the widget computes in the background
        # the tensors' key at the last fingerprint: (address, in-place version) each, then their values'
        # fingerprint (the digest reuses it); None until the first evaluation and after a stale one
        self._weights_key: tuple | None = None
        self._fingerprint = ""                    # its digest, which keys the first stage that reads the model
        self._structure: tuple = ()               # the copy's generation and the global hooks at that time
        self._groups: Groups | None = None        # the tensors sorted for reading their values
        self._evaluating = threading.RLock()     # one evaluation at a time: a stale one clears the cache
        self.cache = ByteLRU(cache_bytes)
        self.graph = Graph(self._stages(), self.cache)
        self.progress: Callable[[float], None] | None = None
        self.lock = threading.Lock()          # one computation at a time on the model

    # --- the graph ---------------------------------------------------------------------------------
    def _stages(self) -> list[Stage]:
        # The model (identity, version, weights) keys only the first stage that depends on it: every
        # later stage's key contains its inputs' keys, so all of them follow, and the fingerprint is
        # taken once per evaluation rather than once per stage.
        model_key = lambda s: (id(self.model), s.get("model_version", 0), self._fingerprint)  # noqa: E731
        return [
            Stage("image", (), lambda s: (self.items[s["image"]].hash,),
                  lambda s, up: self.items[s["image"]], "the selected image (keyed by content hash)"),
            Stage("preprocess", ("image",), model_key, self._preprocess,
                  "resize/crop/normalise with the model's own config"),
            Stage("forward", ("preprocess",), lambda s: (), self._forward,
                  "one forward pass: logits and top-k (switching target reuses it)"),
            Stage("workspace", ("preprocess", "forward"),
                  lambda s: (family(s["method"]), s["target"]), self._workspace,
                  "method-family capture: every candidate layer for CAMs, attention maps for ViTs, "
                  "reusable gradients (IG points, SmoothGrad sums) for pixel methods"),
            Stage("attribution", ("preprocess", "forward", "workspace"),
                  lambda s: (s["method"], layer_of(s), method_params(s)), self._attribute,
                  "the method itself, reusing the workspace", grows=("workspace",)),
            Stage("display", ("attribution", "preprocess", "image"), lambda s: (), self._display,
                  "map onto the image's pixels at display resolution"),
        ]

    def _preprocess(self, state: dict, up: dict) -> Prepared:
        return prepare(up["image"].source, self.info.preprocess)

    def _forward(self, state: dict, up: dict) -> torch.Tensor:
        x = up["preprocess"].x
        with self.lock, borrowed(model := self.private.copy), torch.no_grad():
            return call(model, inputs_for(model, x)).detach().float().cpu()

    def _target(self, state: dict, logits: torch.Tensor) -> int:
        t = state.get("target", -1)
        if t is not None and not -1 <= t < logits.shape[1]:
            raise ValueError(f"target={t} is out of range: the model has {logits.shape[1]} classes "
                             f"(0..{logits.shape[1] - 1}; -1: the predicted class)")
        return int(logits.argmax(1)[0]) if t is None or t < 0 else int(t)

    def _workspace(self, state: dict, up: dict) -> dict:
        memo = Workspace()
        fam = family(state["method"])
        if fam == "pixel":
            return memo                       # filled lazily by the methods (IG points, noise sums)
        with self.lock, borrowed(model := self.private.copy):
            x = inputs_for(model, up["preprocess"].x)
            target = torch.tensor([self._target(state, up["forward"])], device=x.device)
            ctx = Context(model, x, lambda _logits: target, self.info.preprocess, 1, memo=memo,
                          progress=self.progress)
            if fam == "cam":
                ctx.capture_all(candidates(model, tuple(x.shape)))
            else:
                memo[("attention", False)] = ctx.attention(gradients=True)._replace(grads=None)
        return memo

    def _attribute(self, state: dict, up: dict) -> Run:
        spec = get_method(state["method"])
        params = spec.validate({p.name: state[p.name] for p in spec.params if p.name in state})
        start_digest(self.model, self._weights_key)       # hashed while the passes run (provenance)
        with self.lock:
            run = compute(self.private.copy, up["preprocess"].x, spec, params,
                          target=self._target(state, up["forward"]), layer=layer_of(state) or None,
                          info=self.info, memo=up["workspace"], progress=self.progress,
                          logits=up["forward"], keep_intermediates=True)
        return run

    def _display(self, state: dict, up: dict) -> Shown:
        run, prepared = up["attribution"], up["preprocess"]
        (result,) = package(run, prepared, self.info, self.model, start_digest(self.model, self._weights_key))
        shown = result.shown()                           # NaN outside the model's crop: drawn uncoloured
        size = shrunk_size(*shown.shape, DISPLAY_MAX_SIDE)
        if size == shown.shape:                          # already at display resolution: no resampling
            return Shown(shown.astype(np.float32, copy=False), result)
        m = area_resize(np.nan_to_num(shown), size)
        inside = area_resize(np.isfinite(shown), size)
        return Shown(np.where(inside > 0.5, m, np.nan).astype(np.float32), result)

    def pixels(self, shown: Shown) -> np.ndarray:
        """(h, w, 4) uint8: the image under a shown map, at the map's display resolution."""
        result = shown.result
        image = result.image if result.image is not None else np.zeros((*result.map.shape, 3), np.uint8)
        h, w = shown.map.shape
        return np.asarray(Image.fromarray(image).convert("RGBA").resize((w, h), Image.BILINEAR))

    # --- API ---------------------------------------------------------------------------------------
    def evaluate(self, state: dict, stage: str = "display") -> tuple[Any, list[Record]]:
        """``stage`` for ``state``. The weights are checked first: their layout and in-place versions on
        this thread, their values (``value_fingerprint``: the sums of every tensor, which an edit through
        ``.data`` changes without a version) on a worker thread while the graph evaluates under the last
        fingerprint, when nothing else changed since. Values found changed drop whatever was cached and
        the evaluation runs again under the new fingerprint. (A CAM layer switch on EfficientNet-Lite0:
        5.8 -> ~4.9 ms.)"""
        with self._evaluating:
            versions, tensors = self.private.refresh()   # also brings the private copy up to date
            # hooks added or removed change the maps as much as the weights do
            structure = (self.private.generation, *global_hook_keys())
            last = self._weights_key
            if last is not None and versions == last[:-1] and structure == self._structure:
                # the same tensors, sorted before; a GPU's sums queued here (see queue_sums)
                check = _checker().submit(fingerprint_of, self._groups, queue_sums(self._groups))
                try:
                    out = self.graph.evaluate(stage, state)
                except BaseException:
                    if check.result() != last[-1]:
                        self._stale()
                    raise
                values = check.result()
                if values == last[-1]:
                    return out
                self._stale()
            else:
                self._groups = fingerprint_groups(tensors)
                values = fingerprint_of(self._groups)
            self._weights_key, self._structure = (*versions, values), structure
            self._fingerprint = digest(np.array((*structure, *self._weights_key), np.int64))
            return self.graph.evaluate(stage, state)

    def _stale(self) -> None:
        """What was computed under the last fingerprint may be of other weights: drop it."""
        self.cache.clear()
        forget_digest(self.model, self._weights_key)
        self._weights_key = None

    def predictions(self, state: dict, k: int = 5) -> list[dict]:
        logits, _ = self.evaluate(state, "forward")
        probs = probabilities(logits)[0]
        p, i = probs.topk(min(k, len(probs)))
        labels = self.info.labels
        return [{"index": int(j), "label": labels[j] if labels else str(int(j)), "prob": float(q)}
                for q, j in zip(p, i)]

    def layers(self, state: dict) -> list[dict]:
        prepared, _ = self.evaluate(state, "preprocess")
        with self.lock, borrowed(model := self.private.copy):
            return [layer.as_dict() for layer in candidates(model, tuple(prepared.x.shape))]

    def close(self) -> None:
        self.cache.clear()


_CHECKS: ThreadPoolExecutor | None = None


def _checker() -> ThreadPoolExecutor:
    """The thread that checks the weights' values while a widget evaluation runs (one for the process)."""
    global _CHECKS
    if _CHECKS is None:
        _CHECKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbexplain-weights-check")
    return _CHECKS


def make_items(images: Any, labels: Sequence[str] | None = None) -> list[Item]:
    """The explorer's image list: PIL images (paths and arrays are opened) or preprocessed tensors."""
    from .images import to_pil
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("images: the list is empty")
    if labels is not None:
        if isinstance(labels, str) or len(labels) != len(images):
            got = "a string" if isinstance(labels, str) else f"{len(labels)} names"
            raise ValueError(f"image_labels: got {got} for {len(images)} images; pass a list of one name per image")
    items = []
    for i, img in enumerate(images):
        name = labels[i] if labels else (str(img) if isinstance(img, str) else f"image {i}")
        if isinstance(img, torch.Tensor):
            t = img.detach().float().cpu().clone()
            items.append(Item(name, t, digest(t)))
        else:
            pil = to_pil(img)
            items.append(Item(name, pil, digest(np.asarray(pil))))
    return items
