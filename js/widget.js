// nbexplain anywidget front end: controls, heatmap blending, colour bar, status and compare strip.
//
// The kernel sends raw attribution maps (`_map`, float32, not normalised); sign selection, clipping,
// normalisation, colormapping and blending all happen here so that view-only traits (opacity,
// colormap, sign, clip, zoom) redraw without a kernel round trip.

import { buildControl, buildControls, markInteractive, nextId } from "./controls.js";
import { COLORMAPS, colorbarGradient, lut } from "./colormaps.js";
import { decodeArray, decodeImage } from "./decode.js";
import {
  SIGNS,
  blend,
  colorize,
  formatStages,
  formatValue,
  prepareMap,
  resolveColormap,
  resolveSign,
  valueAt,
} from "./render.js";

const VIEW_PARAMS = [
  { name: "opacity", type: "float", min: 0, max: 1, step: 0.01, default: 0.5, help: "heatmap opacity (0 = image only)" },
  {
    name: "colormap",
    type: "choice",
    default: "auto",
    choices: [["auto", "auto"], ...COLORMAPS.map((c) => [c, c === "jet" ? "jet (legacy)" : c.replace("_", "–")])],
    help: "auto: cividis for one-sided maps, blue–orange for signed maps",
  },
  {
    name: "sign",
    type: "choice",
    default: "auto",
    choices: ["auto", ...SIGNS],
    help: "which part of the attribution to show; auto: signed for signed methods, else positive",
  },
  { name: "clip", type: "float", min: 90, max: 100, step: 0.1, default: 99, label: "clip %", help: "values above this percentile of |value| saturate (100 = no clipping)" },
  { name: "zoom", type: "int", min: 1, max: 8, step: 1, default: 1, help: "display zoom (ctrl + mouse wheel over the image)" },
];
const VIEW_NAMES = VIEW_PARAMS.map((p) => p.name);
const MAX_COMPARE = 4;

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v == null) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "for") el.setAttribute(k, v);
    else el[k] = v;
  }
  for (const c of children) if (c != null) el.append(c);
  return el;
}

function getCtx(canvas) {
  try {
    return canvas.getContext("2d");
  } catch {
    return null; // e.g. jsdom without a canvas implementation
  }
}

// Put RGBA pixels on a canvas, resizing it when needed.
function putPixels(canvas, rgba, width, height) {
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = getCtx(canvas);
  if (!ctx || width === 0 || height === 0) return;
  const img = ctx.createImageData(width, height);
  img.data.set(rgba);
  ctx.putImageData(img, 0, 0);
}

function render({ model, el }) {
  const ids = nextId("nbx");
  const dom = new AbortController(); // removes every DOM listener at cleanup
  const onDom = (target, ev, fn, opts = {}) => target.addEventListener(ev, fn, { ...opts, signal: dom.signal });
  const modelListeners = [];
  const listen = (ev, fn) => {
    model.on(ev, fn);
    modelListeners.push([ev, fn]);
  };
  const unlisten = (ev, fn) => {
    model.off(ev, fn);
    const i = modelListeners.findIndex(([e, f]) => e === ev && f === fn);
    if (i >= 0) modelListeners.splice(i, 1);
  };
  const setTrait = (name, value) => {
    model.set(name, value);
    model.save_changes();
  };
  const get = (name, fallback) => {
    const v = model.get(name);
    return v === undefined || v === null ? fallback : v;
  };
  let disposed = false;
  let localError = "";

  // ---------------------------------------------------------------- layout
  const root = h("div", { class: "nbx-root", "data-lm-suppress-shortcuts": "true", "data-ready": "0", "data-draws": "0" });
  const controlsCol = h("div", { class: "nbx-controls" });
  const main = h("div", { class: "nbx-main" });
  root.append(controlsCol, main);
  el.appendChild(root);

  // Image picker
  const thumbs = h("div", { class: "nbx-thumbs", role: "group", "aria-label": "image" });
  const imageSection = h("div", { class: "nbx-section nbx-images" }, h("div", { class: "nbx-heading", text: "image" }), thumbs);

  // Method
  const methodId = `${ids}-method`;
  const methodSelect = markInteractive(h("select", { id: methodId, class: "nbx-input nbx-input-choice" }), "method", "method");
  const methodRow = h("div", { class: "nbx-field" }, h("label", { class: "nbx-label", for: methodId, text: "method" }), methodSelect);

  // Layer
  const layerId = `${ids}-layer`;
  const layerSlider = markInteractive(h("input", { id: layerId, type: "range", min: "0", max: "0", step: "1", class: "nbx-input nbx-input-int" }), "layer", "layer");
  const layerName = h("output", { class: "nbx-layer-name", for: layerId, "aria-live": "polite" });
  const layerAuto = markInteractive(h("button", { type: "button", class: "nbx-button nbx-layer-auto", text: "auto", title: "use the method's default layer" }), null, "use default layer");
  const layerRow = h(
    "div",
    { class: "nbx-field nbx-layer", "data-param-row": "layer" },
    h("label", { class: "nbx-label", for: layerId, text: "layer" }),
    layerSlider,
    layerAuto,
    layerName,
  );

  // Target
  const targetId = `${ids}-target`;
  const targetSelect = markInteractive(h("select", { id: targetId, class: "nbx-input nbx-input-choice" }), "target", "target class");
  const targetRow = h("div", { class: "nbx-field" }, h("label", { class: "nbx-label", for: targetId, text: "target" }), targetSelect);

  // Method parameters (rebuilt when the method changes)
  const paramsBox = h("div", { class: "nbx-section nbx-method-params" });

  // Compare
  const compareList = h("div", { class: "nbx-compare-list", role: "group", "aria-label": "compare methods" });
  const compareBox = h("details", { class: "nbx-section nbx-compare-picker" }, h("summary", { text: "compare methods" }), compareList);

  // View controls
  const viewBox = h("fieldset", { class: "nbx-section nbx-view" }, h("legend", { text: "view" }));
  const viewControls = new Map();
  for (const p of VIEW_PARAMS) {
    const c = buildControl(p, get(p.name, p.default), {
      live: true,
      idPrefix: `${ids}-view`,
      onChange: (name, v) => setTrait(name, v),
    });
    viewControls.set(p.name, c);
    viewBox.appendChild(c.el);
  }

  controlsCol.append(imageSection, methodRow, layerRow, targetRow, paramsBox, compareBox, viewBox);

  // Main column
  const caption = h("div", { class: "nbx-caption" });
  const canvas = h("canvas", { class: "nbx-canvas", role: "img", "aria-label": "attribution heatmap" });
  canvas.width = 0;
  canvas.height = 0;
  const viewport = h("div", { class: "nbx-viewport", tabIndex: 0, "aria-label": "heatmap view; ctrl + wheel to zoom" }, canvas);
  const cbMin = h("span", { class: "nbx-cb-min" });
  const cbMax = h("span", { class: "nbx-cb-max" });
  const cbBar = h("div", { class: "nbx-cb-bar", role: "img" });
  const cbCaption = h("span", { class: "nbx-cb-caption" });
  const colorbar = h("div", { class: "nbx-colorbar" }, cbMin, cbBar, cbMax, cbCaption);
  const hover = h("div", { class: "nbx-hover", "aria-live": "off", text: "\u00a0" });
  const spinner = h("span", { class: "nbx-spinner", "aria-hidden": "true" });
  const progress = h("progress", { class: "nbx-progress", max: 1 });
  const statusText = h("span", { class: "nbx-status-text" });
  const errorText = h("div", { class: "nbx-error", role: "alert" });
  const stagesText = h("div", { class: "nbx-stages" });
  const statusLine = h("div", { class: "nbx-status", "aria-live": "polite" }, h("div", { class: "nbx-status-row" }, spinner, progress, statusText), errorText, stagesText);
  const compareStrip = h("div", { class: "nbx-compare" });
  main.append(caption, viewport, colorbar, hover, statusLine, compareStrip);

  // ---------------------------------------------------------------- schema helpers
  const methods = () => {
    const s = get("_schema", {});
    return Array.isArray(s.methods) ? s.methods : [];
  };
  const methodInfo = (name) => methods().find((m) => m.name === name);
  const methodLabel = (name) => methodInfo(name)?.label ?? name ?? "";

  // ---------------------------------------------------------------- decoding caches
  // model.get returns the same object until the trait changes, so object identity is the cache key.
  const decoded = new WeakMap();
  const decodeCached = (msg, fn) => {
    if (!msg || typeof msg !== "object") return null;
    let v = decoded.get(msg);
    if (!v) {
      v = fn(msg);
      decoded.set(msg, v);
    }
    return v;
  };
  const decodeMap = (msg) => decodeCached(msg, (m) => ({ values: decodeArray(m), shape: m.shape }));
  // One prepared (sign/clip-normalised) map per map message; opacity/colormap/zoom changes reuse it.
  const prepCache = new WeakMap();
  const prepared = (mapMsg, values, sign, clip) => {
    const hit = prepCache.get(mapMsg);
    if (hit && hit.sign === sign && hit.clip === clip) return hit.result;
    const result = prepareMap(values, { sign, clip });
    prepCache.set(mapMsg, { sign, clip, result });
    return result;
  };

  // ---------------------------------------------------------------- image picker
  const buildThumbs = () => {
    thumbs.replaceChildren();
    const images = get("_images", []);
    imageSection.hidden = !Array.isArray(images) || images.length === 0;
    (images || []).forEach((im, i) => {
      const label = im?.label ?? `image ${i}`;
      const c = h("canvas", { class: "nbx-thumb-canvas", "aria-hidden": "true" });
      try {
        const d = decodeCached(im.thumb, decodeImage);
        putPixels(c, d.rgba, d.width, d.height);
      } catch (err) {
        console.error("[nbexplain] bad thumbnail", err);
      }
      const btn = markInteractive(
        h("button", { type: "button", class: "nbx-thumb", title: label, "data-index": String(i) }, c, h("span", { class: "nbx-thumb-label", text: label })),
        "image",
        `image ${i}: ${label}`,
      );
      onDom(btn, "click", () => setTrait("image", i));
      thumbs.appendChild(btn);
    });
    markThumbs();
  };
  const markThumbs = () => {
    const cur = get("image", 0);
    for (const btn of thumbs.children) btn.setAttribute("aria-pressed", String(Number(btn.dataset.index) === cur));
  };

  // ---------------------------------------------------------------- method select
  const buildMethodSelect = () => {
    methodSelect.replaceChildren();
    const cur = get("method", "");
    const list = methods();
    for (const m of list) {
      const text = m.vit_only && !/vit/i.test(m.label ?? "") ? `${m.label ?? m.name} (ViT)` : (m.label ?? m.name);
      methodSelect.appendChild(h("option", { value: m.name, text, title: m.vit_only ? "vision transformers only" : null }));
    }
    if (cur && !list.some((m) => m.name === cur)) methodSelect.appendChild(h("option", { value: cur, text: cur }));
    methodSelect.value = cur;
  };
  onDom(methodSelect, "change", () => setTrait("method", methodSelect.value));

  // ---------------------------------------------------------------- layer control
  let layerTimer = null;
  const layers = () => {
    const l = get("_layers", []);
    return Array.isArray(l) ? l : [];
  };
  const updateLayer = () => {
    const info = methodInfo(get("method", ""));
    layerRow.hidden = !info?.needs_layer;
    const list = layers();
    const chosen = get("layer", "");
    const used = get("layer_used", "");
    layerSlider.max = String(Math.max(0, list.length - 1));
    layerSlider.disabled = list.length === 0;
    let idx = list.findIndex((l) => l.name === (chosen || used));
    if (idx < 0) idx = list.length - 1;
    if (idx >= 0) layerSlider.value = String(idx);
    const shown = chosen || used || list[idx]?.name || "";
    const grid = list.find((l) => l.name === shown)?.grid;
    const gridText = Array.isArray(grid) ? ` (${grid[0]}×${grid[1]})` : "";
    layerName.textContent = list.length === 0 ? "no candidate layers" : `${chosen ? "" : "auto: "}${shown}${gridText}`;
    layerAuto.disabled = !chosen;
    layerSlider.setAttribute("aria-valuetext", shown || "default");
    if (used && chosen && used !== chosen) layerName.textContent += ` → used ${used}`;
  };
  const commitLayer = () => {
    if (layerTimer) clearTimeout(layerTimer);
    layerTimer = null;
    const l = layers()[Number(layerSlider.value)];
    if (l && l.name !== get("layer", "")) setTrait("layer", l.name);
  };
  onDom(layerSlider, "input", () => {
    const l = layers()[Number(layerSlider.value)];
    if (l) layerName.textContent = l.name;
    if (layerTimer) clearTimeout(layerTimer);
    layerTimer = setTimeout(commitLayer, 150);
  });
  onDom(layerSlider, "change", commitLayer);
  onDom(layerAuto, "click", () => setTrait("layer", ""));

  // ---------------------------------------------------------------- target picker
  const buildTargets = () => {
    targetSelect.replaceChildren();
    const preds = get("_predictions", []);
    const cur = get("target", -1);
    const top = Array.isArray(preds) && preds.length ? preds[0] : null;
    const pct = (p) => `${(Number(p) * 100).toFixed(Number(p) >= 0.1 ? 0 : 1)}%`;
    targetSelect.appendChild(h("option", { value: "-1", text: top ? `predicted: ${top.label} (${pct(top.prob)})` : "predicted class" }));
    for (const p of preds || []) {
      targetSelect.appendChild(h("option", { value: String(p.index), text: `${p.label} (${pct(p.prob)})` }));
    }
    if (cur !== -1 && !(preds || []).some((p) => p.index === cur)) {
      targetSelect.appendChild(h("option", { value: String(cur), text: `class ${cur}` }));
    }
    targetSelect.value = String(cur);
  };
  onDom(targetSelect, "change", () => setTrait("target", Number(targetSelect.value)));

  // ---------------------------------------------------------------- method parameters
  let paramSet = null;
  let deltaEl = null;
  const paramListeners = [];
  const buildParams = () => {
    paramSet?.destroy();
    for (const [ev, fn] of paramListeners.splice(0)) unlisten(ev, fn);
    const info = methodInfo(get("method", ""));
    const params = Array.isArray(info?.params) ? info.params : [];
    const values = {};
    for (const p of params) values[p.name] = model.get(p.name);
    paramSet = buildControls(params, values, {
      idPrefix: `${ids}-p`,
      onChange: (name, v) => setTrait(name, v),
    });
    paramsBox.replaceChildren(paramSet.el);
    paramsBox.hidden = params.length === 0;
    for (const p of params) {
      const fn = () => paramSet?.controls.get(p.name)?.set(model.get(p.name));
      listen(`change:${p.name}`, fn);
      paramListeners.push([`change:${p.name}`, fn]);
    }
    deltaEl = h("span", { class: "nbx-delta", title: "integrated-gradients completeness: sum of attributions − (f(x) − f(baseline))" });
    const stepsRow = paramSet.controls.get("steps")?.el;
    if (stepsRow) stepsRow.appendChild(deltaEl);
    updateDelta();
  };
  const updateDelta = () => {
    if (!deltaEl) return;
    const d = model.get("delta");
    const show = d !== null && d !== undefined && Number.isFinite(Number(d));
    deltaEl.hidden = !show;
    deltaEl.textContent = show ? `Δ ${formatValue(Number(d))}` : "";
  };

  // ---------------------------------------------------------------- compare picker
  const buildComparePicker = () => {
    compareList.replaceChildren();
    const chosen = new Set(get("compare", []));
    const list = methods();
    compareBox.hidden = list.length < 2;
    for (const m of list) {
      const id = `${ids}-cmp-${m.name}`;
      const box = markInteractive(h("input", { type: "checkbox", id, checked: chosen.has(m.name), "data-method": m.name }), "compare", `compare ${m.label ?? m.name}`);
      onDom(box, "change", () => {
        const names = [...compareList.querySelectorAll("input:checked")].map((b) => b.dataset.method);
        setTrait("compare", names);
      });
      compareList.appendChild(h("div", { class: "nbx-check" }, box, h("label", { for: id, text: m.label ?? m.name })));
    }
    markCompare();
  };
  const markCompare = () => {
    const chosen = new Set(get("compare", []));
    const boxes = [...compareList.querySelectorAll("input")];
    for (const b of boxes) b.checked = chosen.has(b.dataset.method);
    const full = chosen.size >= MAX_COMPARE;
    for (const b of boxes) b.disabled = full && !b.checked;
    if (chosen.size > 0) compareBox.open = true;
  };

  // ---------------------------------------------------------------- status
  const updateStatus = () => {
    const status = get("status", "idle");
    const p = Number(get("progress", 0));
    const busy = status === "busy";
    root.dataset.status = status;
    root.classList.toggle("nbx-busy", busy);
    spinner.hidden = !busy;
    progress.hidden = !busy;
    if (busy && p > 0) progress.value = Math.min(1, p);
    else progress.removeAttribute("value"); // indeterminate
    statusText.textContent = busy ? (p > 0 ? `computing… ${Math.round(p * 100)}%` : "computing…") : "";
    const err = status === "error" ? get("error", "") || "error" : "";
    const msg = [err, localError].filter(Boolean).join("\n");
    errorText.textContent = msg;
    errorText.hidden = !msg;
    stagesText.textContent = formatStages(get("_stages", []));
    viewport.setAttribute("aria-busy", String(busy));
  };

  // ---------------------------------------------------------------- drawing
  const compareFigures = [];
  const buildCompareStrip = () => {
    compareStrip.replaceChildren();
    compareFigures.length = 0;
    const entries = get("_compare_maps", []);
    compareStrip.hidden = !Array.isArray(entries) || entries.length === 0;
    for (const e of entries || []) {
      const c = h("canvas", { class: "nbx-compare-canvas", role: "img", "aria-label": `${methodLabel(e.method)} heatmap` });
      const fig = h("figure", { class: "nbx-compare-item", "data-method": e.method ?? "" }, c, h("figcaption", { text: methodLabel(e.method) }));
      compareStrip.appendChild(fig);
      compareFigures.push({ entry: e, canvas: c, fig });
    }
  };

  let draws = 0;
  let pending = false;
  const reasons = new Set();
  let current = { map: null, values: null, shape: null };

  const safeLut = (name) => {
    try {
      return { name, table: lut(name) };
    } catch (err) {
      localError = err.message;
      const fallback = "cividis";
      return { name: fallback, table: lut(fallback) };
    }
  };

  // Colour one map over the image; returns display info or null when it cannot be drawn.
  const paint = (target, image, mapMsg, view, method = mapMsg?.method) => {
    let mapVals = null;
    try {
      mapVals = mapMsg ? decodeMap(mapMsg) : null;
    } catch (err) {
      localError = `cannot decode map: ${err.message}`;
    }
    const signed = mapMsg?.signed ?? methodInfo(method)?.signed ?? false;
    const sign = resolveSign(view.sign, signed);
    const cm = safeLut(resolveColormap(view.colormap, sign));
    const matches = mapVals && (!image || (mapVals.shape[0] === image.height && mapVals.shape[1] === image.width));
    if (mapVals && !matches) {
      localError = `map shape ${mapVals.shape.join("×")} does not match image ${image.height}×${image.width}; showing the image only`;
    }
    if (image && (!mapVals || !matches)) {
      putPixels(target, image.rgba, image.width, image.height);
      return { sign, colormap: cm.name, prep: null, mapVals: null };
    }
    if (!mapVals) return null;
    const prep = prepared(mapMsg, mapVals.values, sign, view.clip);
    const [mh, mw] = mapVals.shape;
    const rgba = image ? blend(image.rgba, prep.values, cm.table, view.opacity, { signed: prep.signed }) : colorize(prep.values, cm.table);
    putPixels(target, rgba, mw, mh);
    return { sign, colormap: cm.name, prep, mapVals };
  };

  const draw = () => {
    pending = false;
    if (disposed) return;
    localError = "";
    const view = {
      opacity: Number(get("opacity", 0.5)),
      colormap: get("colormap", "auto"),
      sign: get("sign", "auto"),
      clip: Number(get("clip", 100)),
      zoom: Number(get("zoom", 1)),
    };
    try {
      resolveSign(view.sign, false);
    } catch (err) {
      localError = err.message;
      view.sign = "auto";
    }
    let image = null;
    try {
      image = decodeCached(get("_image", null), decodeImage);
    } catch (err) {
      localError = `cannot decode image: ${err.message}`;
    }
    const mapMsg = get("_map", null);
    let info = null;
    try {
      info = paint(canvas, image, mapMsg, view);
      if (!info && !image) {
        canvas.width = 0;
        canvas.height = 0;
      }
    } catch (err) {
      localError = err.message;
      console.error("[nbexplain] draw failed", err);
    }
    const drawnMap = info?.prep ? mapMsg : null;
    current = { map: drawnMap, values: info?.mapVals?.values ?? null, shape: info?.mapVals?.shape ?? null };

    // zoom: CSS scaling, pixels stay crisp via image-rendering: pixelated
    const zoom = Math.min(8, Math.max(1, view.zoom || 1));
    canvas.style.width = `${canvas.width * zoom}px`;
    canvas.style.height = `${canvas.height * zoom}px`;

    // caption and colour bar
    const used = get("layer_used", "");
    if (drawnMap) {
      const parts = [`${methodLabel(drawnMap.method)} → ${drawnMap.label ?? ""} (class ${drawnMap.target})`];
      if (used) parts.push(`layer ${used}`);
      caption.textContent = parts.join(" · ");
      canvas.setAttribute("aria-label", `${methodLabel(drawnMap.method)} heatmap for ${drawnMap.label ?? `class ${drawnMap.target}`}`);
    } else {
      caption.textContent = image ? "no attribution map yet" : "no image";
    }
    colorbar.hidden = !info?.prep;
    if (info?.prep) {
      cbBar.style.background = colorbarGradient(info.colormap);
      cbMin.textContent = formatValue(info.prep.vmin);
      cbMax.textContent = formatValue(info.prep.vmax);
      cbCaption.textContent = { positive: "positive", negative: "negative", absolute: "|value|", signed: "signed" }[info.sign] + (view.clip < 100 ? ` · clipped at p${view.clip}` : "");
      cbBar.setAttribute("aria-label", `${info.colormap} colour scale from ${cbMin.textContent} to ${cbMax.textContent}`);
    }

    // compare strip: same view settings, one small canvas per method
    for (const f of compareFigures) {
      try {
        paint(f.canvas, image, f.entry.map ?? null, view, f.entry.method);
      } catch (err) {
        localError = `compare ${f.entry.method}: ${err.message}`;
      }
    }
    updateStatus();

    // test hooks
    draws += 1;
    const detail = {
      draws,
      reason: [...reasons].join(","),
      method: drawnMap?.method ?? "",
      target: drawnMap ? drawnMap.target : "",
      label: drawnMap?.label ?? "",
      opacity: view.opacity,
      colormap: info?.colormap ?? resolveColormap(view.colormap, resolveSign(view.sign, false)),
      sign: info?.sign ?? "",
      clip: view.clip,
      zoom,
      vmin: info?.prep?.vmin ?? null,
      vmax: info?.prep?.vmax ?? null,
    };
    reasons.clear();
    const ds = root.dataset;
    ds.ready = "1";
    ds.draws = String(draws);
    ds.drawnMethod = detail.method;
    ds.drawnTarget = String(detail.target);
    ds.drawnOpacity = String(detail.opacity);
    ds.drawnColormap = detail.colormap;
    ds.drawnSign = detail.sign;
    ds.drawnClip = String(detail.clip);
    ds.drawnZoom = String(detail.zoom);
    root.dispatchEvent(new CustomEvent("nbx-drawn", { bubbles: true, detail }));
  };

  // Coalesce the burst of change events one kernel message produces into a single redraw.
  const scheduleDraw = (reason) => {
    reasons.add(reason);
    if (pending || disposed) return;
    pending = true;
    queueMicrotask(draw);
  };

  // ---------------------------------------------------------------- hover readout
  onDom(canvas, "mousemove", (e) => {
    const rect = canvas.getBoundingClientRect();
    if (!rect.width || !rect.height || !canvas.width) return;
    const x = Math.floor(((e.clientX - rect.left) / rect.width) * canvas.width);
    const y = Math.floor(((e.clientY - rect.top) / rect.height) * canvas.height);
    if (x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return;
    const v = current.values ? valueAt(current.values, current.shape, x, y) : null;
    hover.textContent = v === null ? `${x}, ${y}` : `${x}, ${y}: ${formatValue(v)}`;
  });
  onDom(canvas, "mouseleave", () => {
    hover.textContent = "\u00a0";
  });

  // ---------------------------------------------------------------- ctrl + wheel zoom
  let wheelAcc = 0;
  onDom(
    viewport,
    "wheel",
    (e) => {
      if (!e.ctrlKey) return;
      e.preventDefault(); // otherwise the browser zooms the whole page
      wheelAcc += e.deltaY;
      if (Math.abs(wheelAcc) < 40) return;
      const old = Number(get("zoom", 1));
      const next = Math.min(8, Math.max(1, old + (wheelAcc < 0 ? 1 : -1)));
      wheelAcc = 0;
      if (next === old) return;
      // keep the pixel under the pointer in place
      const rect = canvas.getBoundingClientRect();
      const fx = rect.width ? (e.clientX - rect.left) / rect.width : 0.5;
      const fy = rect.height ? (e.clientY - rect.top) / rect.height : 0.5;
      setTrait("zoom", next);
      const grow = next / old - 1;
      viewport.scrollLeft += fx * rect.width * grow;
      viewport.scrollTop += fy * rect.height * grow;
    },
    { passive: false },
  );

  // ---------------------------------------------------------------- model listeners
  const onMethod = () => {
    methodSelect.value = get("method", "");
    buildParams();
    updateLayer();
  };
  const onSchema = () => {
    buildMethodSelect();
    buildParams();
    buildComparePicker();
    updateLayer();
    buildCompareStrip();
    scheduleDraw("_schema");
  };
  listen("change:_schema", onSchema);
  listen("change:method", onMethod);
  listen("change:_layers", updateLayer);
  listen("change:layer", updateLayer);
  listen("change:layer_used", () => {
    updateLayer();
    scheduleDraw("layer_used");
  });
  listen("change:_images", buildThumbs);
  listen("change:image", markThumbs);
  listen("change:_predictions", buildTargets);
  listen("change:target", buildTargets);
  listen("change:compare", markCompare);
  listen("change:_compare_maps", () => {
    buildCompareStrip();
    scheduleDraw("_compare_maps");
  });
  listen("change:delta", updateDelta);
  for (const ev of ["status", "progress", "error", "_stages"]) listen(`change:${ev}`, updateStatus);
  listen("change:_image", () => scheduleDraw("_image"));
  listen("change:_map", () => scheduleDraw("_map"));
  for (const name of VIEW_NAMES) {
    listen(`change:${name}`, () => {
      viewControls.get(name)?.set(model.get(name));
      scheduleDraw(name);
    });
  }

  // initial state
  buildThumbs();
  buildMethodSelect();
  buildParams();
  updateLayer();
  buildTargets();
  buildComparePicker();
  buildCompareStrip();
  updateStatus();
  draw();

  return () => {
    disposed = true;
    if (layerTimer) clearTimeout(layerTimer);
    for (const [ev, fn] of modelListeners.splice(0)) model.off(ev, fn);
    paramSet?.destroy();
    for (const c of viewControls.values()) c.destroy();
    dom.abort();
    root.remove();
  };
}

export default { render };
