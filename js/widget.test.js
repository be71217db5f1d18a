// @vitest-environment jsdom
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import widget from "./widget.js";

// anywidget warns about a named `render` export (deprecated): the module only exports the default object
const { render } = widget;

// ---------------------------------------------------------------- mocks

/** Backbone-like model: set() fires change events, save_changes() records what was dirty. */
function mockModel(initial = {}) {
  const state = { ...initial };
  const handlers = new Map();
  let dirty = new Set();
  const saves = [];
  const emit = (ev) => {
    for (const fn of [...(handlers.get(ev) ?? [])]) fn();
  };
  return {
    get: (k) => state[k],
    set(k, v) {
      const changed = state[k] !== v;
      state[k] = v;
      dirty.add(k);
      if (changed) emit(`change:${k}`);
    },
    save_changes() {
      saves.push([...dirty]);
      dirty = new Set();
    },
    on(ev, fn) {
      if (!handlers.has(ev)) handlers.set(ev, new Set());
      handlers.get(ev).add(fn);
    },
    off(ev, fn) {
      handlers.get(ev)?.delete(fn);
    },
    // test helpers
    kernel(updates) {
      // like a comm message: all attributes first, then the change events
      Object.assign(state, updates);
      for (const k of Object.keys(updates)) emit(`change:${k}`);
    },
    listenerCount: () => [...handlers.values()].reduce((n, s) => n + s.size, 0),
    saves,
    state,
  };
}

// jsdom has no canvas: a 2D context that keeps the last putImageData per canvas.
function installCanvasMock() {
  vi.spyOn(HTMLCanvasElement.prototype, "getContext").mockImplementation(function () {
    const canvas = this;
    return {
      createImageData: (w, h) => ({ width: w, height: h, data: new Uint8ClampedArray(w * h * 4) }),
      putImageData: (img) => {
        canvas._pixels = Array.from(img.data);
        canvas._puts = (canvas._puts ?? 0) + 1;
      },
    };
  });
}

const u8 = (a) => new DataView(new Uint8Array(a).buffer);
const f32 = (a) => new DataView(new Float32Array(a).buffer);

// 2×2 image and map
const IMAGE = { data: u8([10, 20, 30, 255, 40, 50, 60, 255, 70, 80, 90, 255, 100, 110, 120, 255]), dtype: "uint8", shape: [2, 2, 4] };
const mapMsg = (values, extra = {}) => ({ data: f32(values), dtype: "float32", shape: [2, 2], signed: false, method: "saliency", target: 3, label: "tabby", ...extra });

const SCHEMA = {
  methods: [
    {
      name: "saliency",
      label: "Saliency",
      kind: "pixel",
      needs_layer: false,
      vit_only: false,
      signed: false,
      params: [{ name: "abs_grad", type: "bool", default: true, help: "absolute gradient" }],
    },
    {
      name: "integrated_gradients",
      label: "Integrated Gradients",
      kind: "pixel",
      needs_layer: false,
      vit_only: false,
      signed: true,
      params: [
        { name: "steps", type: "int", default: 32, min: 4, max: 256, step: 4 },
        { name: "baseline", type: "choice", default: "black", choices: ["black", "blur"] },
      ],
    },
    { name: "gradcam", label: "Grad-CAM", kind: "cam", needs_layer: true, vit_only: false, signed: false, params: [] },
  ],
};

const BASE = {
  _schema: SCHEMA,
  _layers: [
    { name: "blocks.2", kind: "conv", grid: [28, 28] },
    { name: "blocks.5", kind: "conv", grid: [14, 14] },
    { name: "blocks.6", kind: "conv", grid: [7, 7] },
  ],
  _images: [
    { label: "cat", thumb: { data: u8([1, 2, 3, 255]), dtype: "uint8", shape: [1, 1, 4] } },
    { label: "dog", thumb: { data: u8([4, 5, 6, 255]), dtype: "uint8", shape: [1, 1, 4] } },
  ],
  _image: null,
  _map: null,
  _compare_maps: [],
  _predictions: [
    { index: 3, label: "tabby", prob: 0.8 },
    { index: 7, label: "tiger cat", prob: 0.15 },
  ],
  method: "saliency",
  layer: "",
  target: -1,
  image: 0,
  abs_grad: true,
  steps: 32,
  baseline: "black",
  compare: [],
  opacity: 1,
  colormap: "gray",
  sign: "auto",
  clip: 100,
  zoom: 1,
  status: "idle",
  progress: 0,
  error: "",
  _stages: [],
  delta: null,
  layer_used: "",
};

let el;
let cleanup;
const tick = () => new Promise((r) => setTimeout(r, 0));

beforeEach(() => {
  installCanvasMock();
  el = document.createElement("div");
  document.body.appendChild(el);
});
afterEach(() => {
  cleanup?.();
  cleanup = undefined;
  document.body.replaceChildren();
  vi.restoreAllMocks();
});

function mount(overrides = {}) {
  const model = mockModel({ ...BASE, ...overrides });
  cleanup = render({ model, el });
  const root = el.querySelector(".nbx-root");
  return { model, root, canvas: root.querySelector("canvas.nbx-canvas") };
}

// ---------------------------------------------------------------- tests

describe("widget render", () => {
  it("exports the anywidget shape and returns a cleanup function", () => {
    expect(typeof widget.render).toBe("function");
    const { root } = mount();
    expect(typeof cleanup).toBe("function");
    expect(root.dataset.ready).toBe("1");
    expect(root.getAttribute("data-lm-suppress-shortcuts")).toBe("true");
  });

  it("draws once _image and _map arrive (one coalesced redraw) and sets the test hooks", async () => {
    const { model, root, canvas } = mount();
    const events = [];
    el.addEventListener("nbx-drawn", (e) => events.push(e.detail));
    const before = Number(root.dataset.draws);
    model.kernel({ _image: IMAGE, _map: mapMsg([0, 1, 2, 4]), status: "idle", _stages: [{ name: "forward", ran: true, ms: 12 }] });
    await tick();
    expect(Number(root.dataset.draws)).toBe(before + 1);
    expect(events).toHaveLength(1);
    expect(root.dataset.drawnMethod).toBe("saliency");
    expect(root.dataset.drawnTarget).toBe("3");
    expect(root.dataset.drawnOpacity).toBe("1");
    expect(root.dataset.drawnColormap).toBe("gray");
    expect(root.dataset.drawnSign).toBe("positive"); // auto + unsigned map
    expect(events[0]).toMatchObject({ method: "saliency", target: 3, opacity: 1, colormap: "gray", sign: "positive", vmin: 0, vmax: 4 });
    expect([canvas.width, canvas.height]).toEqual([2, 2]);
    // opacity 1 + gray: pixel = value / max
    const px = canvas._pixels;
    expect([px[0], px[4], px[8], px[12]]).toEqual([0, 64, 128, 255]);
    // colour bar labels and caption
    expect(root.querySelector(".nbx-cb-min").textContent).toBe("0");
    expect(root.querySelector(".nbx-cb-max").textContent).toBe("4");
    expect(root.querySelector(".nbx-caption").textContent).toContain("Saliency → tabby (class 3)");
    expect(root.querySelector(".nbx-stages").textContent).toBe("forward ran 12 ms");
  });

  it("redraws locally when the opacity slider moves, saving only opacity", async () => {
    const { model, root, canvas } = mount({ _image: IMAGE, _map: mapMsg([0, 1, 2, 4]) });
    const draws = Number(root.dataset.draws);
    const slider = root.querySelector('input[data-param="opacity"]');
    expect(slider.type).toBe("range");
    slider.value = "0";
    slider.dispatchEvent(new Event("input", { bubbles: true }));
    await tick();
    expect(model.saves).toEqual([["opacity"]]);
    expect(model.state.opacity).toBe(0);
    expect(Number(root.dataset.draws)).toBe(draws + 1);
    expect(root.dataset.drawnOpacity).toBe("0");
    // opacity 0 → the image itself
    expect(canvas._pixels).toEqual(Array.from(new Uint8Array(IMAGE.data.buffer)));
  });

  it("redraws on colormap / sign / clip changes from the kernel without saving anything", async () => {
    const { model, root } = mount({ _image: IMAGE, _map: mapMsg([-1, 0, 1, 2], { signed: true }) });
    expect(root.dataset.drawnSign).toBe("signed");
    const draws = Number(root.dataset.draws);
    model.kernel({ colormap: "auto" });
    await tick();
    expect(root.dataset.drawnColormap).toBe("blue_orange");
    model.kernel({ sign: "absolute" });
    await tick();
    expect(root.dataset.drawnSign).toBe("absolute");
    expect(root.dataset.drawnColormap).toBe("cividis");
    model.kernel({ clip: 95 });
    await tick();
    expect(Number(root.dataset.draws)).toBe(draws + 3);
    expect(model.saves).toEqual([]);
    // the view controls follow the kernel
    expect(root.querySelector('select[data-param="sign"]').selectedOptions[0].textContent).toBe("absolute");
  });

  it("every interactive element is labelled and suppresses notebook shortcuts", () => {
    const { root } = mount({ method: "gradcam" });
    const inputs = root.querySelectorAll("input, select, button");
    expect(inputs.length).toBeGreaterThan(8);
    for (const input of inputs) {
      expect(input.getAttribute("data-lm-suppress-shortcuts"), input.outerHTML).toBe("true");
      const labelled = input.getAttribute("aria-label") || (input.id && root.querySelector(`label[for="${input.id}"]`));
      expect(labelled, input.outerHTML).toBeTruthy();
    }
    for (const name of ["method", "layer", "target", "opacity", "colormap", "sign", "clip", "zoom"]) {
      expect(root.querySelector(`[data-param="${name}"]`), name).not.toBeNull();
    }
  });

  it("shows only the current method's parameters and writes them back", async () => {
    const { model, root } = mount();
    const params = root.querySelector(".nbx-method-params");
    expect(params.querySelector('[data-param="abs_grad"]')).not.toBeNull();
    expect(params.querySelector('[data-param="steps"]')).toBeNull();
    const method = root.querySelector('select[data-param="method"]');
    method.value = "integrated_gradients";
    method.dispatchEvent(new Event("change"));
    expect(model.saves).toEqual([["method"]]);
    expect(params.querySelector('[data-param="abs_grad"]')).toBeNull();
    const steps = params.querySelector('[data-param="steps"]');
    expect(steps.value).toBe("32");
    steps.value = "64";
    steps.dispatchEvent(new Event("change"));
    expect(model.state.steps).toBe(64);
    expect(model.saves.at(-1)).toEqual(["steps"]);
    // kernel updates flow back into the control, delta is shown next to the steps slider
    model.kernel({ steps: 128, delta: 0.0123 });
    expect(steps.value).toBe("128");
    const delta = root.querySelector('[data-param-row="steps"] .nbx-delta');
    expect(delta.hidden).toBe(false);
    expect(delta.textContent).toBe("Δ 0.0123");
  });

  it("layer control: only for methods that need a layer, slider over _layers, shows layer_used", () => {
    const { model, root } = mount();
    const row = root.querySelector(".nbx-layer");
    expect(row.hidden).toBe(true);
    model.set("method", "gradcam");
    expect(row.hidden).toBe(false);
    model.kernel({ layer_used: "blocks.6" });
    const slider = row.querySelector('input[data-param="layer"]');
    expect(slider.max).toBe("2");
    expect(slider.value).toBe("2");
    expect(row.querySelector(".nbx-layer-name").textContent).toBe("auto: blocks.6 (7×7)");
    slider.value = "1";
    slider.dispatchEvent(new Event("change"));
    expect(model.state.layer).toBe("blocks.5");
    expect(row.querySelector(".nbx-layer-name").textContent).toContain("blocks.5");
    row.querySelector(".nbx-layer-auto").click();
    expect(model.state.layer).toBe("");
  });

  it("target picker lists predictions and sets target", () => {
    const { model, root } = mount();
    const sel = root.querySelector('select[data-param="target"]');
    expect([...sel.options].map((o) => o.textContent)).toEqual(["predicted: tabby (80%)", "tabby (80%)", "tiger cat (15%)"]);
    sel.value = "7";
    sel.dispatchEvent(new Event("change"));
    expect(model.state.target).toBe(7);
    model.kernel({ target: 42 });
    expect(sel.value).toBe("42");
  });

  it("image picker shows thumbnails and sets image", () => {
    const { model, root } = mount();
    const thumbs = root.querySelectorAll('button[data-param="image"]');
    expect(thumbs).toHaveLength(2);
    expect(thumbs[0].getAttribute("aria-pressed")).toBe("true");
    thumbs[1].click();
    expect(model.state.image).toBe(1);
    expect(model.saves).toEqual([["image"]]);
    expect(root.querySelectorAll('button[data-param="image"]')[1].getAttribute("aria-pressed")).toBe("true");
  });

  it("status line: busy progress, red error text", () => {
    const { model, root } = mount();
    model.kernel({ status: "busy", progress: 0.5 });
    expect(root.dataset.status).toBe("busy");
    expect(root.querySelector(".nbx-progress").hidden).toBe(false);
    expect(root.querySelector(".nbx-status-text").textContent).toContain("50%");
    model.kernel({ status: "error", error: "layer 'x' not found" });
    const err = root.querySelector(".nbx-error");
    expect(err.hidden).toBe(false);
    expect(err.textContent).toBe("layer 'x' not found");
    expect(root.querySelector(".nbx-progress").hidden).toBe(true);
  });

  it("compare strip renders one small canvas per method with the same view settings", async () => {
    const { model, root } = mount({ _image: IMAGE, _map: mapMsg([0, 1, 2, 4]) });
    model.kernel({
      compare: ["saliency", "integrated_gradients"],
      _compare_maps: [
        { method: "saliency", map: { data: f32([0, 0, 0, 1]), dtype: "float32", shape: [2, 2], signed: false } },
        { method: "integrated_gradients", map: { data: f32([-1, 0, 0, 1]), dtype: "float32", shape: [2, 2], signed: true } },
      ],
    });
    await tick();
    const figs = root.querySelectorAll(".nbx-compare figure");
    expect([...figs].map((f) => f.querySelector("figcaption").textContent)).toEqual(["Saliency", "Integrated Gradients"]);
    const c0 = figs[0].querySelector("canvas");
    expect([c0._pixels[0], c0._pixels[12]]).toEqual([0, 255]); // gray, opacity 1
    // signed map with auto sign: -1 → 0, 0 → 128 (centre), +1 → 255 in gray
    const c1 = figs[1].querySelector("canvas");
    expect([c1._pixels[0], c1._pixels[4], c1._pixels[12]]).toEqual([0, 128, 255]);
    expect(root.querySelectorAll('input[data-param="compare"]:checked')).toHaveLength(2);
  });

  it("hover readout shows x, y and the raw value", () => {
    const { root, canvas } = mount({ _image: IMAGE, _map: mapMsg([0, 1, 2, 4]) });
    canvas.getBoundingClientRect = () => ({ left: 0, top: 0, width: 20, height: 20, right: 20, bottom: 20 });
    canvas.dispatchEvent(new MouseEvent("mousemove", { clientX: 15, clientY: 5 }));
    expect(root.querySelector(".nbx-hover").textContent).toBe("1, 0: 1");
    canvas.dispatchEvent(new MouseEvent("mousemove", { clientX: 15, clientY: 15 }));
    expect(root.querySelector(".nbx-hover").textContent).toBe("1, 1: 4");
  });

  it("zoom scales the canvas with CSS and ctrl+wheel changes it", async () => {
    const { model, canvas } = mount({ _image: IMAGE });
    expect(canvas.style.width).toBe("2px");
    model.kernel({ zoom: 4 });
    await tick();
    expect(canvas.style.width).toBe("8px");
    const viewport = el.querySelector(".nbx-viewport");
    const ev = new WheelEvent("wheel", { deltaY: -100, ctrlKey: true, cancelable: true });
    viewport.dispatchEvent(ev);
    expect(ev.defaultPrevented).toBe(true);
    expect(model.state.zoom).toBe(5);
    viewport.dispatchEvent(new WheelEvent("wheel", { deltaY: -100, cancelable: true })); // no ctrl: page scroll
    expect(model.state.zoom).toBe(5);
  });

  it("a map whose shape does not match the image shows the image and a message, no exception", async () => {
    const { model, root } = mount({ _image: IMAGE });
    model.kernel({ _map: { ...mapMsg([1, 2]), shape: [1, 2] } });
    await tick();
    expect(root.dataset.drawnMethod).toBe("");
    expect(root.querySelector(".nbx-error").textContent).toMatch(/does not match image/);
  });

  it("cleanup removes model listeners, DOM and stops redrawing", async () => {
    const { model, root } = mount({ _image: IMAGE, _map: mapMsg([0, 1, 2, 4]) });
    expect(model.listenerCount()).toBeGreaterThan(0);
    const draws = root.dataset.draws;
    cleanup();
    cleanup = undefined;
    expect(model.listenerCount()).toBe(0);
    expect(el.querySelector(".nbx-root")).toBeNull();
    model.kernel({ opacity: 0.3, _map: mapMsg([4, 3, 2, 1]) });
    await tick();
    expect(root.dataset.draws).toBe(draws);
  });
});
