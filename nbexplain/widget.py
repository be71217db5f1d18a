"""The explorer widget: traits for every control, computed off the main thread through the Session."""
from __future__ import annotations

import pathlib
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import anywidget
import ipywidgets
import numpy as np
import traitlets as t
from PIL import Image
from torch import nn

from .methods import REGISTRY, get as get_method
from ._errors import closest, positive_int
from .api import class_index
from .attribution import Attribution
from .calls import eager
from .layers import layer_name
from .models import describe, load_model
from .pipeline import Graph
from .render import lut, resolve as resolve_sign
from .session import DEFAULT_CACHE_BYTES, Session, make_items

_STATIC = pathlib.Path(__file__).parent / "static"
if not (_STATIC / "widget.js").is_file():
    # a checkout used without a build: the bundle is a git-ignored artifact of `npm run build`
    raise ImportError(f"nbexplain's widget frontend is not built ({_STATIC / 'widget.js'} is missing): run "
                      "`make test` or `npm install && npm run build` in the checkout, or install with "
                      "`pip install .`, which builds it (Node.js >= 20 needed)")
MAX_COMPARE = 4
# In the widget, IG defaults to a rule whose grids nest when steps double, so raising the steps
# slider only computes the new points (Gauss-Legendre, the API default, never reuses any).
WIDGET_DEFAULTS = {"rule": "riemann_right"}
VIEW_TRAITS = ("opacity", "colormap", "sign", "clip", "zoom")


class Superseded(Exception):
    """A newer request arrived; the running one stops at its next progress report."""


def _param_traits() -> dict[str, t.TraitType]:
    """One synced trait per method parameter name, typed from the registry's schema."""
    out: dict[str, t.TraitType] = {}
    for spec in REGISTRY.values():
        for p in spec.params:
            if p.name in out:
                continue
            default = WIDGET_DEFAULTS.get(p.name, p.default)
            if p.special:
                trait = t.Union([t.Int(), t.Unicode()], default_value=default)
            else:
                trait = {"int": t.Int, "float": t.Float, "bool": t.Bool}.get(p.type, t.Unicode)(default)
            out[p.name] = trait.tag(sync=True)
    return out


PARAMS = _param_traits()
COMPUTE_TRAITS = ("image", "method", "layer", "target", "compare", "model_version", *PARAMS)


class _Message(dict):
    """An array message for the frontend, equal only to itself: traitlets compares a trait's old and
    new value on every set, and comparing two maps' buffers byte by byte costs ~1 ms per 500 kB."""

    __eq__ = object.__eq__
    __ne__ = object.__ne__


def _array(a: np.ndarray, **extra: Any) -> dict:
    a = np.ascontiguousarray(a)
    return _Message(data=memoryview(a).cast("B"), dtype=str(a.dtype), shape=list(a.shape), **extra)


class _LayerName(t.Unicode):
    """A layer's name; a module of the explained model (``w.layer = model.layer4``) becomes its name, as in
    ``nbx.explain(..., layer=module)`` (the frontend syncs strings only)."""

    def validate(self, obj: Any, value: Any) -> str:
        if isinstance(value, nn.Module):
            value = layer_name(obj._session.model, value)
        return super().validate(obj, value)


class _ClassIndex(t.Int):
    """The target class: -1 (the predicted one), an index, or a class name (``w.target = "tabby"``), kept as
    its index, as ``nbx.attribute(..., target="tabby")`` takes it (the frontend syncs indices only)."""

    def validate(self, obj: Any, value: Any) -> int:
        if isinstance(value, str):
            labels = obj._session.info.labels
            try:
                value = class_index(value, len(labels) if labels else 0, labels)
            except ValueError as e:
                raise t.TraitError(str(e)) from None
        return super().validate(obj, value)


class ExplorerView(anywidget.AnyWidget):
    """The anywidget: image + heatmap canvas and the controls (frontend in js/)."""

    _esm = _STATIC / "widget.js"
    _css = _STATIC / "widget.css"

    # what to explain
    image = t.Int(0).tag(sync=True)
    method = t.Unicode("gradcam").tag(sync=True)
    layer = _LayerName("").tag(sync=True)
    target = _ClassIndex(-1).tag(sync=True)
    compare = t.List(t.Unicode()).tag(sync=True)
    model_version = t.Int(0).tag(sync=True)
    locals().update(PARAMS)          # one trait per method parameter, generated from the registry
    # the view (browser only: no kernel work)
    opacity = t.Float(0.5, min=0.0, max=1.0).tag(sync=True)
    colormap = t.Unicode("auto").tag(sync=True)
    sign = t.Unicode("auto").tag(sync=True)
    clip = t.Float(99.0, min=0.0, max=100.0).tag(sync=True)
    zoom = t.Int(1, min=1, max=8).tag(sync=True)
    # status, read-only for users
    status = t.Unicode("idle").tag(sync=True)
    progress = t.Float(0.0).tag(sync=True)
    error = t.Unicode("").tag(sync=True)
    delta = t.Any(None, allow_none=True).tag(sync=True)
    layer_used = t.Unicode("").tag(sync=True)
    # data for the frontend
    _schema = t.Dict().tag(sync=True)
    _layers = t.List().tag(sync=True)
    _images = t.List().tag(sync=True)
    _image = t.Any(None, allow_none=True).tag(sync=True)
    _map = t.Any(None, allow_none=True).tag(sync=True)
    _compare_maps = t.List().tag(sync=True)
    _predictions = t.List().tag(sync=True)
    _stages = t.List().tag(sync=True)

    # the view is drawn in the browser, so a bad value set from Python would only surface in an export
    @t.validate("colormap")
    def _known_colormap(self, proposal: Any) -> str:
        if proposal["value"] != "auto":
            lut(proposal["value"])                    # raises, naming the colormaps there are
        return proposal["value"]

    @t.validate("sign")
    def _known_sign(self, proposal: Any) -> str:
        resolve_sign(proposal["value"], "auto", True)   # raises, naming the signs there are
        return proposal["value"]

    @t.validate("opacity", "clip")
    def _not_nan(self, proposal: Any) -> float:
        if proposal["value"] != proposal["value"]:
            raise t.TraitError(f"{proposal['trait'].name}: NaN is not a number to draw with; "
                               f"use a value within [{proposal['trait'].min}, {proposal['trait'].max}]")
        return proposal["value"]

    def __init__(self, session: Session, **traits: Any) -> None:
        unknown_traits = [k for k in traits if not self.has_trait(k) or k.startswith("_")]
        if unknown_traits:
            raise TypeError(f"explain: unexpected keyword {unknown_traits[0]!r}; controls are "
                            f"{', '.join(sorted(set(COMPUTE_TRAITS) | set(VIEW_TRAITS)))}")
        super().__init__()
        self._session = session
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nbexplain")
        self._lock = threading.Lock()
        self._generation = 0
        self._pending = 0
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._shown_image: int | None = None
        self.result: Attribution | None = None
        self.stages: list[dict] = []
        self.last_error: BaseException | None = None
        self.on_error = None                      # set by Explorer to print errors in the cell
        self._schema = {"methods": [_method_schema(m) for m in REGISTRY.values()]}
        self._images = [{"label": it.label, "thumb": _array(_thumb(it))} for it in session.items]
        with self.hold_trait_notifications():
            for k, v in traits.items():
                setattr(self, k, v)
        self.observe(self._changed, names=list(COMPUTE_TRAITS))
        self.observe(self._viewed, names=list(VIEW_TRAITS))
        self._request()

    def set_state(self, sync_data: dict) -> None:
        """A value from the frontend that a control cannot hold (a class name typed as the target, say)
        is shown in the widget, not only in the kernel's log; the frontend gets the kept values back."""
        try:
            super().set_state(sync_data)
        except t.TraitError as e:           # traitlets rolled every value of the message back
            self._fail(e, map_stale=False)  # the map shown still matches the controls kept
            self.send_state([k for k in sync_data if k in self.keys])

    def _fail(self, e: BaseException, map_stale: bool = True) -> None:
        """Show ``e`` in the widget and in the cell (``on_error``)."""
        self.last_error = e
        with self.hold_sync():
            self.error = f"{type(e).__name__}: {e}"
            if map_stale:
                self.layer_used = ""        # the last map's layer is not what the failed request used
            self.status = "error"
        if self.on_error:
            self.on_error(e)

    # --- requests ----------------------------------------------------------------------------------
    def _changed(self, change: dict) -> None:
        self._request()

    def _viewed(self, change: dict) -> None:
        """View controls are drawn by the browser: the kernel runs no stage at all."""
        self.stages = [{"name": n, "ran": False, "ms": 0.0} for n in self._session.graph.order()]

    def _state(self) -> dict:
        state = {name: getattr(self, name) for name in COMPUTE_TRAITS}
        state["compare"] = list(self.compare)
        return state

    def _request(self) -> None:
        if self._closed:
            raise RuntimeError("explorer: it is closed, so it computes nothing more; open a new one with "
                               "nbx.explain(...)")
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._pending += 1
            self._idle.clear()
        self._executor.submit(self._work, generation, self._state())

    def _current(self, generation: int) -> bool:
        return generation == self._generation

    def _work(self, generation: int, state: dict) -> None:
        try:
            if not self._current(generation):
                return                              # superseded before it started
            self._session.progress = lambda f: self._report(generation, f)
            self.status, self.progress = "busy", 0.0
            self._validate(state)
            updates, result, stages = self._compute(state)
            if self._current(generation):
                # what the frontend holds and what Python reports change together, and only for the
                # latest request: a superseded one that noted its image as shown would keep the next
                # request from sending that image's pixels
                self._shown_image, self.result, self.stages = state["image"], result, stages
                with self.hold_sync():
                    for k, v in updates.items():
                        setattr(self, k, v)
                    self.status, self.error, self.progress = "idle", "", 1.0
                self.last_error = None
        except Superseded:
            pass
        except Exception as e:                      # shown in the widget and in the cell
            if self._current(generation):
                self._fail(e)
        finally:
            with self._lock:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def _report(self, generation: int, fraction: float) -> None:
        if not self._current(generation):
            raise Superseded()
        self.progress = float(fraction)

    def _validate(self, state: dict) -> None:
        if not 0 <= state["image"] < len(self._session.items):
            raise ValueError(f"image={state['image']}: choose 0..{len(self._session.items) - 1}")
        get_method(state["method"])
        if len(state["compare"]) > MAX_COMPARE:
            raise ValueError(f"compare: at most {MAX_COMPARE} methods side by side")
        for m in state["compare"]:
            get_method(m)

    def _compute(self, state: dict) -> tuple[dict, Attribution, list[dict]]:
        """The trait updates for ``state``, its result and the stage records; applied by ``_work`` only if
        the request is still the latest."""
        session = self._session
        shown, records = session.evaluate(state)
        updates: dict[str, Any] = {}
        if self._shown_image != state["image"] or not self._layers:
            updates["_predictions"] = session.predictions(state)
            updates["_layers"] = session.layers(state)
            updates["_image"] = _array(session.pixels(shown))
        result = shown.result
        # the pixels (up to 1 MB) are made and travel only when the image changes; the map on every update
        updates["_map"] = _array(shown.map, signed=result.signed, method=result.method, target=result.target,
                                 label=result.label or str(result.target))
        updates["delta"] = float(result.delta) if result.delta is not None else None
        updates["layer_used"] = result.meta.get("layer") or ""
        updates["_compare_maps"] = self._compare_maps_for(state)
        stages = [dict(r.as_dict(), evaluations=result.meta.get("evaluations", 0))
                  if r.stage == "attribution" and r.ran else r.as_dict() for r in records]
        updates["_stages"] = stages
        return updates, result, stages

    def _compare_maps_for(self, state: dict) -> list[dict]:
        out = []
        for m in state["compare"]:
            other = dict(state, method=m, layer=state["layer"] if get_method(m).needs_layer else "")
            shown, _ = self._session.evaluate(other)
            out.append({"method": m, "map": _array(shown.map, signed=shown.result.signed)})
        return out

    # --- user API ----------------------------------------------------------------------------------
    @property
    def computing(self) -> bool:
        """Whether a request is queued or running: true from the moment a control changes, while
        ``status`` turns "busy" only once the worker picks the request up."""
        return not self._idle.is_set()

    def wait(self, timeout: float | None = 600) -> Attribution | None:
        """Block until the latest request is done; raise its error if it failed."""
        if not self._idle.wait(timeout):
            raise TimeoutError(f"explorer still busy after {timeout} s")
        if self.last_error is not None:
            raise self.last_error
        return self.result

    @property
    def pipeline(self) -> Graph:
        return self._session.graph

    @property
    def cache(self):
        return self._session.cache

    def close(self) -> None:
        if "_executor" in self.__dict__:           # construction may have failed before these existed
            with self._lock:
                self._generation += 1              # any running request stops at its next report
                self._closed = True
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._idle.set()                       # a cancelled request never runs to say it is done
            self.status = "closed"
            self._session.close()
        super().close()


def _method_schema(spec) -> dict:
    d = spec.schema()
    d["label"] = spec.name.replace("_", " ")
    for p in d["params"]:
        p["default"] = WIDGET_DEFAULTS.get(p["name"], p["default"])
        if p["special"]:
            p["type"] = "int"                      # the slider edits the number; 'auto' is set from Python
    return d


def _thumb(item, side: int = 64) -> np.ndarray:
    src = item.source
    if not isinstance(src, Image.Image):             # a preprocessed tensor: show its values min-max scaled
        arr = src.numpy()
        arr = (arr - arr.min()) / max(1e-12, float(arr.max() - arr.min()))
        src = Image.fromarray((np.transpose(arr[:3], (1, 2, 0)) * 255).astype(np.uint8))
    thumb = src.convert("RGBA")
    thumb.thumbnail((side, side))
    return np.asarray(thumb)


class Explorer(ipywidgets.VBox):
    """What ``nbx.explain`` returns: the explorer view, a top-k probability chart (click a bar to
    explain that class) and an error log in the cell. Every control is an attribute (``w.method``)."""

    def __init__(self, view: ExplorerView) -> None:
        self.view = view
        self.chart = _probability_chart(view)
        self.errors = ipywidgets.Output()
        from .export_bar import export_bar
        self.exports = export_bar(self)
        view.on_error = self._show_error
        view.observe(self._clear_errors, names="status")
        super().__init__([view, self.chart, self.exports, self.errors])
        self._ready = True

    def _clear_errors(self, change: dict) -> None:
        if change["new"] == "idle":
            self.errors.outputs = ()

    def _show_error(self, e: BaseException) -> None:
        # append_stdout works from the worker thread and outside a kernel, unlike `with output:`
        self.errors.append_stdout("nbexplain: " + "".join(traceback.format_exception_only(type(e), e)))

    def __getattr__(self, name: str) -> Any:
        if name != "view" and "view" in self.__dict__:
            return getattr(self.__dict__["view"], name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        view = self.__dict__.get("view")
        if view is not None and name != "view" and view.has_trait(name) and not self.has_trait(name):
            setattr(view, name, value)
            return
        if self.__dict__.get("_ready") and not name.startswith("_") and not self.has_trait(name) \
                and name not in self.__dict__ and not hasattr(type(self), name):
            # a misspelt control (w.stpes = 8) would otherwise be a new attribute that changes nothing
            controls = [n for n in view.trait_names() if not n.startswith("_") and not self.has_trait(n)]
            raise AttributeError(f"explorer: no control {name!r}.{closest(name, controls)} "
                                 f"Controls: {', '.join(sorted(controls))}")
        super().__setattr__(name, value)

    def trust(self, methods: Sequence[str] | None = None, **kwargs: Any):
        """A TrustPanel (randomisation, deletion/insertion, agreement) for what the explorer shows now:
        its image and target, its method with its current parameters, and two other methods."""
        from .trust.panel import TrustPanel
        view = self.view
        result = view.wait()
        spec = get_method(view.method)
        current = {p.name: getattr(view, p.name) for p in spec.params}
        if spec.needs_layer and view.layer:
            current["layer"] = view.layer
        others = [m for m in ("gradcam", "integrated_gradients", "occlusion") if m != view.method][:2]
        session = view._session
        return TrustPanel(session.model, session.items[view.image].source, list(methods or [view.method, *others]),
                          target=result.target, params={view.method: current},
                          **{"preprocess": session.info.preprocess, **kwargs})

    def close(self) -> None:
        self.view.close()
        self.chart.close()
        self.exports.close()
        self.errors.close()
        super().close()


def _probability_chart(view: ExplorerView):
    """A bqplot bar chart of the top-k probabilities; clicking a bar sets the target class.

    Horizontal bars, so class names stay readable on the left (rotated labels under vertical bars
    overlapped each other and the axis). Each row also has an invisible full-width bar under the
    visible one: a class at 1 % is a bar a few pixels long, which nobody can hit with the mouse.
    """
    import bqplot as bq
    x, y = bq.OrdinalScale(reverse=True), bq.LinearScale(min=0.0, max=1.0)   # the most likely class on top
    hit = bq.Bars(x=[], y=[], scales={"x": x, "y": y}, orientation="horizontal", colors=["#000000"],
                  opacities=[0.0])
    bars = bq.Bars(x=[], y=[], scales={"x": x, "y": y}, orientation="horizontal", colors=["#5778a4"],
                   tooltip=bq.Tooltip(fields=["x", "y"], formats=["", ".3f"], labels=["class", "probability"]))
    fig = bq.Figure(marks=[hit, bars],
                    axes=[bq.Axis(scale=x, orientation="vertical", grid_lines="none"),
                          bq.Axis(scale=y, tick_format=".0%", num_ticks=5)],
                    title="top-k probabilities (click a bar to explain that class)",
                    title_style={"font-size": "13px"},
                    layout=ipywidgets.Layout(width="560px", height="220px"),
                    fig_margin={"top": 36, "bottom": 30, "left": 190, "right": 20})

    def name(p: dict) -> str:
        # the probability goes into the row label: a value label at the end of a 97 % bar is clipped
        label = p["label"].split(",")[0]
        label = label if len(label) <= 20 else label[:19] + "…"
        prob = p["prob"]
        return f"{label} ({p['index']}) · {prob:.0%}" if prob >= 0.1 else f"{label} ({p['index']}) · {prob:.1%}"

    def update(_change=None):
        preds = view._predictions
        names = [name(p) for p in preds]
        with hit.hold_sync(), bars.hold_sync():
            hit.x, hit.y, hit.opacities = names, [1.0] * len(preds), [0.0] * len(preds)
            bars.x, bars.y = names, [p["prob"] for p in preds]

    def clicked(_bars, event):
        i = event["data"]["index"]
        view.target = int(view._predictions[i]["index"])

    view.observe(update, names="_predictions")
    bars.on_element_click(clicked)
    hit.on_element_click(clicked)
    update()
    return fig


def explain(model: Any = None, images: Any = None, *, labels: Sequence[str] | None = None,
            image_labels: Sequence[str] | None = None, preprocess=None,
            cache_bytes: int = DEFAULT_CACHE_BYTES, **controls: Any) -> Explorer:
    """Open the explorer on ``images`` (one or many) for ``model`` (a timm name, a module, or None
    for the embedded default). Keyword arguments set controls: ``method='integrated_gradients'``…"""
    from .samples import sample_image
    cache_bytes = positive_int("cache_bytes", cache_bytes, "bytes of results the explorer keeps, e.g. 2 << 30")
    if model is None or isinstance(model, str):
        model = load_model(model, pretrained=isinstance(model, str) and not model.startswith("synthetic"))
    model = eager(model)
    info = describe(model, preprocess, labels)
    if images is None:
        images = [sample_image(n) for n in ("cat", "coffee", "astronaut", "rocket")]
        image_labels = image_labels or ["cat", "coffee", "astronaut", "rocket"]
    items = make_items(images, image_labels)
    if info.preprocess is None and not all(hasattr(it.source, "ndim") for it in items):
        raise ValueError("preprocess: this model carries no preprocessing config; pass "
                         "preprocess=nbx.Preprocess(size=..., mean=..., std=...)")
    return Explorer(ExplorerView(Session(model, info, items, cache_bytes), **controls))
