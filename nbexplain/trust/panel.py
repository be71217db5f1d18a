"""A panel of trust checks for one image: the randomisation sanity check (with its PASS/FAIL reading and
threshold), deletion and insertion curves with their AUCs, the agreement matrix, and warnings.

``TrustPanel(model, image, methods=...)``; press "Run checks" (runs in the background, seconds) or call
``panel.run()`` (synchronous: scripts and tests).
"""
from __future__ import annotations

import html
import os
import threading
import time
import warnings
from typing import Any, Sequence

import ipywidgets
import numpy as np

from ..calls import eager
from ..replica import Replica
from .agreement import DISAGREE_BELOW, Agreement, explain_one, method_names, one_image, with_preprocess
from .faithfulness import Curves, deletion_insertion
from .randomization import THRESHOLD, RandomizationReport, randomization_test
from .similarity import rank_agreement

DEFAULT_METHODS = ("gradcam", "integrated_gradients", "saliency")
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
RANDOM_COLOUR = "#9e9e9e"
WARN = "#b71c1c"


def _figure(title: str, x_scale, y_scale, x_label: str, y_label: str, marks: list, **kw):
    import bqplot as bq
    return bq.Figure(marks=marks, title=title, title_style={"font-size": "13px"},
                     axes=[bq.Axis(scale=x_scale, label=x_label, **kw.pop("x_axis", {})),
                           bq.Axis(scale=y_scale, orientation="vertical", label=y_label, tick_format=".1f")],
                     legend_location="top-right", layout=ipywidgets.Layout(width="440px", height="300px"),
                     fig_margin={"top": 40, "bottom": 50, "left": 50, "right": 20}, **kw)


class TrustPanel(ipywidgets.VBox):
    """Should this heatmap be believed? Sanity checks for ``methods`` on one image and target.

    After ``run()``: ``report`` (RandomizationReport), ``curves`` (method -> Curves, plus 'random',
    a random ranking as the control), ``agreement`` (Agreement), ``attributions`` (method -> Attribution),
    ``warnings`` (list of str). ``params`` maps method -> keyword arguments (``{"integrated_gradients":
    {"steps": 16}}``); ``preprocess`` applies to every method (a model that carries none). The randomisation
    test recomputes every map once per layer group: seconds for small models, longer for large ones with many
    groups (pass ``groups=[...]`` to test fewer).
    """

    def __init__(self, model, image: Any, methods: Sequence[str] = DEFAULT_METHODS, *, target: Any = None,
                 params: dict[str, dict] | None = None, mode: str = "cascading", groups: Sequence[str] | None = None,
                 steps: int = 20, fill: str = "blur", seed: int = 0, autorun: bool = False, preprocess=None) -> None:
        import bqplot as bq
        methods, image = method_names(methods), one_image(image, "the trust panel")
        if not methods:
            raise ValueError("methods: name at least one method")
        if mode not in ("cascading", "independent"):
            raise ValueError("mode: use 'cascading' (top-down, cumulative) or 'independent' (one layer at a time)")
        self.model, self.image, self.methods, self.target = eager(model), image, methods, target
        self.private = Replica(self.model)    # what the checks run on: the button runs them in the background
        self.params = with_preprocess({m: dict(v) for m, v in (params or {}).items()}, methods, preprocess)
        self.mode, self.groups, self.steps, self.fill, self.seed = mode, groups, steps, fill, seed
        self.report: RandomizationReport | None = None
        self.curves: dict[str, Curves] = {}
        self.agreement: Agreement | None = None
        self.attributions: dict = {}
        self.warnings: list[str] = []
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

        name = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else None
        self.title = ipywidgets.HTML(self._title(name))
        self.button = ipywidgets.Button(description="Run checks", icon="play", button_style="primary",
                                        tooltip="randomisation test, deletion/insertion, agreement (takes seconds)")
        self.button.on_click(self._clicked)
        self.progress = ipywidgets.IntProgress(value=0, min=0, max=4, layout=ipywidgets.Layout(width="160px"))
        self.status = ipywidgets.Label("not run yet")
        self.reading = ipywidgets.HTML(
            f"<i>Randomisation test: a method passes when the rank correlation of |map| with the original drops "
            f"below {THRESHOLD} once the layers are randomised ({mode}). Press Run checks.</i>")
        self.warning = ipywidgets.HTML("")

        # randomisation similarity per layer
        rx, ry = bq.OrdinalScale(), bq.LinearScale(min=-1.0, max=1.0)
        self.random_lines = bq.Lines(x=[], y=[], scales={"x": rx, "y": ry}, marker="circle", display_legend=True,
                                     colors=COLOURS, labels=list(methods))
        self.threshold_line = bq.Lines(x=[], y=[], scales={"x": rx, "y": ry}, colors=[WARN], line_style="dashed",
                                       labels=[f"threshold {THRESHOLD}"], display_legend=True)
        self.randomization_figure = _figure(f"{mode} randomisation: Spearman of |map| with the original "
                                            f"(pass below {THRESHOLD})", rx, ry, "randomised up to",
                                            "Spearman of |map|", [self.random_lines, self.threshold_line],
                                            x_axis={"tick_rotate": -30})
        # deletion and insertion curves
        self.deletion_lines, self.insertion_lines = [], []
        figs = []
        for kind in ("deletion", "insertion"):
            x, y = bq.LinearScale(min=0.0, max=1.0), bq.LinearScale(min=0.0, max=1.0)
            marks = [bq.Lines(x=[], y=[], scales={"x": x, "y": y}, colors=[c], labels=[m], display_legend=True)
                     for m, c in zip(methods + ["random"], COLOURS[:len(methods)] + [RANDOM_COLOUR])]
            marks[-1].line_style = "dashed"
            (self.deletion_lines if kind == "deletion" else self.insertion_lines).extend(marks)
            better = "lower AUC is better" if kind == "deletion" else "higher AUC is better"
            figs.append(_figure(f"{kind} ({better})", x, y,
                                f"fraction of pixels {'deleted' if kind == 'deletion' else 'inserted'}, "
                                "most relevant first", "target probability", marks))
        self.deletion_figure, self.insertion_figure = figs
        # agreement matrix (one method agrees with itself: then there is no matrix to show)
        ax, ay = bq.OrdinalScale(), bq.OrdinalScale(reverse=True)
        ac = bq.ColorScale(min=-1, max=1, scheme="RdBu")
        self.agreement_map = bq.GridHeatMap(color=np.eye(len(methods)), row=methods, column=methods,
                                            scales={"row": ay, "column": ax, "color": ac},
                                            display_format=".2f", font_style={"font-size": "12px"}) \
            if len(methods) > 1 else None
        self.agreement_figure = bq.Figure(
            marks=[self.agreement_map] if self.agreement_map is not None else [],
            title="agreement: Spearman of |map| between methods", title_style={"font-size": "13px"},
            axes=[bq.Axis(scale=ax), bq.Axis(scale=ay, orientation="vertical")],
            layout=ipywidgets.Layout(width="440px", height="300px",
                                     display=None if self.agreement_map is not None else "none"),
            fig_margin={"top": 40, "bottom": 50, "left": 140, "right": 20})

        super().__init__([
            self.title,
            ipywidgets.HBox([self.button, self.progress, self.status]),
            self.reading,
            self.warning,
            ipywidgets.HBox([self.randomization_figure, self.agreement_figure]),
            ipywidgets.HBox([self.deletion_figure, self.insertion_figure]),
        ])
        if autorun:
            self.run()

    def _title(self, name: str | None, target: str | None = None) -> str:
        what = f" on <code>{html.escape(name)}</code>" if name else ""
        tgt = f", explaining <b>{html.escape(target)}</b>" if target else ""
        return f"<b>Trust checks</b>{what}{tgt}: {html.escape(', '.join(self.methods))}"

    # --- running ------------------------------------------------------------------------------------
    def _clicked(self, _button=None) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self.button.disabled = True
        self._thread = threading.Thread(target=self._background, name="nbexplain-trust", daemon=True)
        self._thread.start()

    def _background(self) -> None:
        try:
            self.run()
        except Exception:          # shown in the status line; wait() re-raises it
            pass
        finally:
            self.button.disabled = False

    def wait(self, timeout: float | None = 600) -> "TrustPanel":
        """Block until a run started by the button is done; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"trust checks still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    def _step(self, value: int, text: str) -> None:
        self.progress.value = value
        self.status.value = text

    def run(self) -> "TrustPanel":
        """Compute every check now (synchronously) and fill the plots; returns the panel."""
        with self._lock:
            self.error = None
            self.progress.bar_style = "info"
            start = time.monotonic()
            try:
                self._run()
            except Exception as e:
                self.error = e
                self.progress.bar_style = "danger"
                self.status.value = f"error: {type(e).__name__}: {e}"
                raise
            self.progress.bar_style = "success"
            self._step(4, f"done in {time.monotonic() - start:.1f} s")
        return self

    def _run(self) -> None:
        methods, model = self.methods, self.private.get()
        self._step(0, "explaining…")
        exps: dict = {}
        for m in methods:
            target = self.target if not exps else next(iter(exps.values())).target
            exps[m] = explain_one(model, self.image, m, target, self.params)
        self.attributions = exps
        first = exps[methods[0]]
        self.title.value = self._title(self.title_name(), first.label or str(first.target))

        self._step(1, "agreement…")
        matrix = rank_agreement([exps[m] for m in methods])
        self.agreement = Agreement(list(methods), matrix, first.target)
        if self.agreement_map is not None:
            self.agreement_map.color = matrix

        self._step(2, "deletion / insertion…")
        rng = np.random.default_rng(self.seed)
        curves = {m: deletion_insertion(model, e, steps=self.steps, fill=self.fill) for m, e in exps.items()}
        shape = tuple(first.input.shape[2:]) if first.input is not None else first.map.shape
        curves["random"] = deletion_insertion(model, first, saliency=rng.random(shape), steps=self.steps,
                                              fill=self.fill)
        self.curves = curves
        for kind, marks in (("deletion", self.deletion_lines), ("insertion", self.insertion_lines)):
            for mark, name in zip(marks, methods + ["random"]):
                c = curves[name]
                auc = c.deletion_auc if kind == "deletion" else c.insertion_auc
                with mark.hold_sync():
                    mark.x, mark.y = c.fractions, getattr(c, kind)
                    mark.labels = [f"{name} (AUC {auc:.3f})"]

        self._step(3, "randomisation test (recomputes every map per layer)…")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = randomization_test(model, self.image, methods, mode=self.mode, target=first.target,
                                        groups=self.groups, seed=self.seed, params=self.params)
        self.report = report
        # each line starts at the unchanged model ('original', similarity 1) and follows the randomised layers
        xs = ["original", *report.steps]
        with self.random_lines.hold_sync():
            self.random_lines.x = xs
            self.random_lines.y = np.array([[1.0, *report.scores[m]["spearman_abs"]] for m in methods])
            self.random_lines.labels = [f"{m}: {report.verdict(m)}" for m in methods]
        with self.threshold_line.hold_sync():
            self.threshold_line.x = [xs[0], xs[-1]]
            self.threshold_line.y = [report.threshold, report.threshold]
        self.reading.value = self._reading()
        self.warnings = self._warnings()
        self.warning.value = "".join(f"<div style='color:{WARN};font-weight:600'>⚠ {html.escape(w)}</div>"
                                     for w in self.warnings) or \
            "<div style='color:#2e7d32'>✓ no warning: the methods agree, pass the randomisation test and beat " \
            "a random ranking on deletion and insertion.</div>"

    def title_name(self) -> str | None:
        return os.path.basename(os.fspath(self.image)) if isinstance(self.image, (str, os.PathLike)) else None

    # --- readings -----------------------------------------------------------------------------------
    def _reading(self) -> str:
        r = self.report
        rows = []
        for m in self.methods:
            scores = r.scores[m]["spearman_abs"]
            final = scores[-1] if r.mode == "cascading" else min(scores)
            ok = r.passed.get(m, False)
            colour = "#2e7d32" if ok else WARN
            rows.append(f"<li><b>{html.escape(m)}</b>: <b style='color:{colour}'>{r.verdict(m)}</b> "
                        f"({'final' if r.mode == 'cascading' else 'lowest'} Spearman of |map| = {final:.2f}, "
                        f"threshold {r.threshold})"
                        + ("" if ok else f" — {html.escape(r.why(m))}")
                        + "</li>")
        c = self.curves
        faith = "".join(f"<li>{html.escape(m)}: deletion AUC {c[m].deletion_auc:.3f}, insertion AUC "
                        f"{c[m].insertion_auc:.3f}</li>" for m in self.methods + ["random"])
        return (f"<b>Randomisation test ({html.escape(r.mode)})</b>: a method passes when the Spearman "
                f"correlation of |map| with the original drops below <b>{r.threshold}</b> {html.escape(r.when)}."
                f"<ul style='margin:2px 0'>{''.join(rows)}</ul>"
                f"<b>Faithfulness</b> ({html.escape(self.fill)} fill; deletion: lower is better, insertion: "
                f"higher is better; 'random' ranks pixels at random):<ul style='margin:2px 0'>{faith}</ul>"
                f"<b>Agreement</b>: mean rank correlation between methods "
                f"{self.agreement.mean_offdiagonal:.2f} (they disagree below {DISAGREE_BELOW}).")

    def _warnings(self) -> list[str]:
        out = []
        a = self.agreement
        if a is not None and len(self.methods) > 1 and a.disagree:
            out.append(f"methods disagree: mean rank correlation {a.mean_offdiagonal:.2f} < {DISAGREE_BELOW} "
                       f"for {', '.join(self.methods)}; no single map should be trusted here")
        for m in self.methods:
            if self.report is not None and not self.report.passed.get(m, True):
                out.append(f"{m} fails the randomisation test: its map barely changes when the weights are "
                           "randomised")
        rnd = self.curves.get("random")
        if rnd is not None:
            for m in self.methods:
                c = self.curves[m]
                if c.deletion_auc >= rnd.deletion_auc and c.insertion_auc <= rnd.insertion_auc:
                    out.append(f"{m} ranks pixels no better than random on deletion and insertion")
        return out
