"""A gallery of a batch's explanations: overlay thumbnails with metrics and flag badges, sortable;
a card's button opens that image in the explorer; a row of mean heatmaps per class.

``gallery(model, images, method, masks=...)`` runs ``explain_batch`` and returns the ``Gallery``.
"""
from __future__ import annotations

import html
import io
from typing import Any

import ipywidgets
import numpy as np
import traitlets as t
from PIL import Image

from .batch import METRICS, BatchResult, explain_batch
from .render import overlay

FLAG_COLOUR = "#c62828"
SORT_LABELS = {
    "index": "input order",
    "flagged": "flagged first",
    "prob": "probability",
    "outside_share": "outside share",
    "deletion_auc": "deletion AUC",
    "insertion_auc": "insertion AUC",
}
SHORT = {"prob": "p", "outside_share": "outside", "deletion_auc": "del", "insertion_auc": "ins"}


def _png(rgb: np.ndarray, side: int) -> bytes:
    """Encode for a thumbnail of about ``side`` pixels: small images grow by whole factors (crisp)."""
    img = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    if max(h, w) < side:
        k = -(-side // max(h, w))                  # ceil: at least ``side``; the browser shrinks it smoothly
        img = img.resize((w * k, h * k), Image.NEAREST)
    elif max(h, w) > side:
        img.thumbnail((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(item) -> np.ndarray:
    """The pixels under an item's map; tensor inputs are min-max scaled for display."""
    exp = item.attribution
    if exp.image is not None:
        return exp.image[..., :3]
    if exp.input is not None and exp.input.shape[1] >= 3:
        x = exp.input[0, :3].numpy()
        x = (x - x.min()) / max(1e-12, float(x.max() - x.min()))
        rgb = (np.transpose(x, (1, 2, 0)) * 255 + 0.5).astype(np.uint8)
        if rgb.shape[:2] == exp.map.shape:
            return rgb
    return np.zeros((*exp.map.shape, 3), np.uint8)


def _sort_options(result: BatchResult) -> list[tuple[str, tuple[str, bool]]]:
    options = [(SORT_LABELS["index"], ("index", False)), (SORT_LABELS["flagged"], ("flagged", True))]
    for m in result.metric_names:
        worse_high = METRICS[m][1]
        options.append((f"{SORT_LABELS[m]}, high → low", (m, True)))
        options.append((f"{SORT_LABELS[m]}, low → high", (m, False)))
        if not worse_high:                  # keep the suspicious end of each metric first in the list
            options[-2], options[-1] = options[-1], options[-2]
    return options


class Gallery(ipywidgets.VBox):
    """Thumbnails of ``result``'s overlays, sortable by metric; a card's 'open' button (or
    ``gallery.select(i)``) shows that image in an explorer below the grid.

    ``gallery.selected`` is the index of the opened image (None before any), ``gallery.explorer``
    its explorer, ``gallery.order`` the indices in display order, ``gallery.cards`` card per index.
    """

    selected = t.Int(None, allow_none=True)

    def __init__(self, result: BatchResult, *, columns: int = 6, thumb: int = 112, opacity: float = 0.5,
                 colormap: str = "auto", sign: str = "auto", clip: float = 99.0, sort_by: str = "index",
                 explorer_controls: dict | None = None) -> None:
        if not isinstance(result, BatchResult):
            raise TypeError("Gallery: pass the BatchResult of nbexplain.batch.explain_batch(...)")
        self.result = result
        self.thumb = int(thumb)
        self.view_settings = dict(opacity=opacity, colormap=colormap, sign=sign, clip=clip)
        self.explorer_controls = dict(explorer_controls or {})
        self.explorer = None
        self.buttons: dict[int, ipywidgets.Button] = {}
        self.cards: dict[int, ipywidgets.VBox] = {self._key(it): self._card(it) for it in result}
        options = _sort_options(result)
        initial = next((v for _, v in options if v[0] == sort_by), options[0][1])
        self.sort = ipywidgets.Dropdown(options=options, value=initial, description="sort by",
                                        layout=ipywidgets.Layout(width="320px"))
        self.grid = ipywidgets.GridBox(
            [], layout=ipywidgets.Layout(grid_template_columns=f"repeat({int(columns)}, {self.thumb + 16}px)",
                                         grid_gap="8px"))
        self.header = ipywidgets.HTML(self._header())
        self.means = self._class_means()
        self.output = ipywidgets.Output(layout=ipywidgets.Layout(margin="8px 0 0 0"))
        self.sort.observe(self._resort, names="value")
        self._resort()
        super().__init__([self.header, self.sort, self.grid, self.means, self.output])

    @staticmethod
    def _key(item) -> int:
        return item.index

    # --- cards --------------------------------------------------------------------------------------
    def _thumbnail(self, item) -> bytes:
        exp = item.attribution
        # what the widget and the exports draw: NaN (uncoloured) outside the model's crop, where supported
        values = exp.shown() if hasattr(exp, "shown") else exp.map
        rgb = overlay(_pixels(item), values, signed_method=exp.signed, **self.view_settings)
        return _png(rgb, self.thumb)

    def _caption(self, item) -> str:
        e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
        result = self.result
        label = item.label if item.label is not None else str(item.target)
        lines = [f"<b>#{item.index}</b> {e(label)} · {item.metrics.get('prob', float('nan')):.0%}"]
        if item.true_label is not None:
            truth = result.class_name(item.true_label)
            style = "" if item.true_label == item.target else f" style='color:{FLAG_COLOUR}'"
            lines.append(f"<span{style}>true: {e(truth)}</span>")
        if item.name and item.name != f"image {item.index}":
            lines.append(f"<span style='color:#666'>{e(item.name)}</span>")
        metrics = " · ".join(f"{SHORT[k]} {item.metrics[k]:.2f}" for k in result.metric_names if k != "prob")
        if metrics:
            lines.append(metrics)
        if item.flagged:
            lines.append(f"<span class='nbx-flag' title='{e('; '.join(item.reasons))}' "
                         f"style='background:{FLAG_COLOUR};color:#fff;border-radius:3px;padding:0 5px;"
                         f"font-weight:600'>⚑ flagged</span>")
        elif item.reasons:                  # a signal fired that the flag rule does not count
            lines.append(f"<span title='{e('; '.join(item.reasons))}' style='color:#a15c00'>"
                         f"({e(', '.join(k for k, v in item.flags.items() if v))})</span>")
        return "<div style='font-size:11px;line-height:1.3'>" + "<br>".join(lines) + "</div>"

    def _card(self, item) -> ipywidgets.VBox:
        image = ipywidgets.Image(value=self._thumbnail(item), format="png",
                                 layout=ipywidgets.Layout(width=f"{self.thumb}px", height=f"{self.thumb}px",
                                                          object_fit="contain"))
        caption = ipywidgets.HTML(self._caption(item))
        button = ipywidgets.Button(description="open", icon="search", tooltip=f"open image #{item.index} "
                                   "in the explorer", layout=ipywidgets.Layout(width=f"{self.thumb}px"))
        button.on_click(lambda _b, i=item.index: self.select(i))
        self.buttons[item.index] = button
        border = f"2px solid {FLAG_COLOUR}" if item.flagged else "1px solid #ddd"
        card = ipywidgets.VBox([image, caption, button],
                               layout=ipywidgets.Layout(border=border, padding="4px", width=f"{self.thumb + 14}px"))
        card.flagged = item.flagged
        return card

    def _header(self) -> str:
        r = self.result
        e = html.escape
        rule = {"outside": "most of the strongest evidence lies off the object mask",
                "hotspot": "the map peaks at a spot shared by many images (a fixed hotspot)",
                "any": "either signal fires", "all": "both signals fire"}
        used = r.flag_rule if r.flag_rule != "auto" else ("outside" if r.has_masks else "hotspot")
        return (f"<b>{e(r.method)}</b> on {len(r)} images: <b>{int(r.flagged.sum())} flagged</b> "
                f"<span style='background:{FLAG_COLOUR};color:#fff;border-radius:3px;padding:0 5px'>⚑</span> "
                f"when {e(rule[used])}.<br><span style='color:#666;font-size:12px'>{e(r.summary())}. "
                "Hover a badge for its reasons; 'open' shows the image in the explorer below.</span>")

    def _class_means(self) -> ipywidgets.VBox:
        means = self.result.mean_map_per_class()
        counts = self.result.class_counts()
        signed = bool(self.result[0].attribution.signed) if len(self.result) else True
        cells = []
        side = max(64, self.thumb * 2 // 3)
        for k, m in means.items():
            rgb = overlay(np.zeros((*m.shape, 3), np.uint8), m, opacity=1.0, colormap=self.view_settings["colormap"],
                          sign=self.view_settings["sign"], clip=self.view_settings["clip"], signed_method=signed)
            img = ipywidgets.Image(value=_png(rgb, side), format="png",
                                   layout=ipywidgets.Layout(width=f"{side}px", height=f"{side}px"))
            cap = ipywidgets.HTML(f"<div style='font-size:11px'>{html.escape(self.result.class_name(k))} "
                                  f"(n={counts.get(k, 0)})</div>")
            cells.append(ipywidgets.VBox([img, cap], layout=ipywidgets.Layout(margin="0 8px 0 0")))
        self.mean_images = cells
        title = ipywidgets.HTML("<b>Mean heatmap per explained class</b> <span style='color:#666;font-size:12px'>"
                                "(a spot that every map shares stands out here)</span>")
        return ipywidgets.VBox([title, ipywidgets.HBox(cells)], layout=ipywidgets.Layout(margin="8px 0 0 0"))

    # --- sorting and opening ------------------------------------------------------------------------
    def _resort(self, _change: Any = None) -> None:
        by, descending = self.sort.value
        self.order = self.result.order(by, descending)
        self.grid.children = tuple(self.cards[i] for i in self.order)

    def sort_by(self, by: str, descending: bool | None = None) -> list[int]:
        """Sort the cards (as the dropdown does) and return the new order."""
        if descending is None:
            descending = True if by == "flagged" else METRICS.get(by, ("", False))[1]
        value = (by, bool(descending))
        keys = [v for _, v in self.sort.options]
        if value not in keys:
            raise ValueError(f"sort: unknown key {by!r}; use {', '.join(sorted({k for k, _ in keys}))}")
        self.sort.value = value
        return self.order

    def select(self, index: int):
        """Open image ``index`` in an explorer below the grid (same method, target and parameters)."""
        from .methods import get as get_method
        from .widget import ExplorerView, explain
        item = self.result[index]
        exp = item.attribution
        for i, b in self.buttons.items():
            b.button_style = "info" if i == index else ""
        source = exp.image if exp.image is not None else exp.input[0]
        controls: dict[str, Any] = {"method": exp.method, "target": int(exp.target)}
        for k, v in (exp.meta.get("params") or {}).items():
            if ExplorerView.class_traits().get(k) is not None and isinstance(v, (bool, int, float, str)):
                controls[k] = v
        layer = exp.meta.get("layer")
        if layer and get_method(exp.method).needs_layer and isinstance(layer, str):
            controls["layer"] = layer
        side = max(exp.map.shape)
        controls["zoom"] = int(min(8, max(1, 256 // max(1, side))))
        controls.update({k: v for k, v in self.view_settings.items()})
        controls.update(self.explorer_controls)
        if self.explorer is not None:
            self.explorer.close()
            self.explorer = None
        self.output.outputs = ()
        try:
            self.explorer = explain(self.result.model, [source], image_labels=[f"#{index} {item.name}"],
                                    **self.result.attribute_kwargs, **controls)
        except Exception as err:  # shown under the grid, not lost in a callback
            self.output.append_stdout(f"nbexplain: could not open image #{index}: {type(err).__name__}: {err}\n")
            raise
        finally:
            self.selected = index
        named = item.name and item.name != f"image {index}"
        title = ipywidgets.HTML(f"<b>image #{index}</b> {html.escape(item.name) if named else ''}"
                                + (f" — <span style='color:{FLAG_COLOUR}'>{html.escape('; '.join(item.reasons))}"
                                   "</span>" if item.reasons else ""))
        self.output.outputs = (_display(title), _display(self.explorer))
        return self.explorer

    def close(self) -> None:
        if self.explorer is not None:
            self.explorer.close()
        super().close()


def _display(widget: ipywidgets.Widget) -> dict:
    """An Output display item for ``widget`` (works without a running kernel, unlike ``with output:``)."""
    data = widget._repr_mimebundle_()
    return {"output_type": "display_data", "data": data, "metadata": {}}


def gallery(model, images: Any, method: str = "integrated_gradients", *, masks=None, target: Any = None,
            faithfulness: bool = False, columns: int = 6, thumb: int = 112, sort_by: str = "index",
            progress: bool = True, **params: Any) -> Gallery:
    """``explain_batch`` then a ``Gallery`` of the result. Keywords as for ``explain_batch``
    (``batch_size=``, ``flag_rule=``, ``true_labels=``, method parameters such as ``steps=16``)."""
    result = explain_batch(model, images, method, masks=masks, target=target, faithfulness=faithfulness,
                           progress=progress, **params)
    return Gallery(result, columns=columns, thumb=thumb, sort_by=sort_by)


from ._callable import callable_module  # noqa: E402

callable_module(__name__)   # nbx.gallery(...) once this module is imported
