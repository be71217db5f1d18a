// Labelled, keyboard-operable form controls built from a parameter schema entry.
//
// Every input carries data-lm-suppress-shortcuts="true": without it JupyterLab / Notebook 7
// command-mode shortcuts (arrow keys are bound to notebook commands) swallow the key presses of a
// focused slider inside an output area.

let uid = 0;

/** A widget-instance-unique DOM id prefix (several widgets can share a page). */
export function nextId(prefix = "nbx") {
  uid += 1;
  return `${prefix}-${uid}`;
}

/** Human label for a parameter name: "discard_ratio" → "discard ratio". */
export function labelFor(param) {
  return param.label ?? String(param.name).replace(/_/g, " ");
}

/** Set attributes common to every interactive element we create. */
export function markInteractive(input, name, label) {
  input.setAttribute("data-lm-suppress-shortcuts", "true");
  if (name != null) input.setAttribute("data-param", name);
  if (label != null) input.setAttribute("aria-label", label);
  return input;
}

function decimals(step) {
  const s = String(step);
  if (s.includes("e-")) return Number(s.split("e-")[1]);
  return s.includes(".") ? s.split(".")[1].length : 0;
}

function coerce(param, raw) {
  switch (param.type) {
    case "int": {
      const v = Math.round(Number(raw));
      return Number.isFinite(v) ? v : undefined;
    }
    case "float": {
      const v = Number(raw);
      return Number.isFinite(v) ? v : undefined;
    }
    case "bool":
      return Boolean(raw);
    default:
      return raw == null ? "" : String(raw);
  }
}

/**
 * Build one control.
 *
 * param: {name, type: "int"|"float"|"choice"|"bool"|"str", default, min, max, step, choices, help,
 *         label?}
 * options.onChange(name, value): called with the coerced value when the user commits a change.
 * options.live: commit every `input` event at once (view-only controls such as opacity). Otherwise
 *   slider drags commit after `debounceMs` of quiet and immediately on `change` (release / key press),
 *   so dragging a kernel parameter does not queue one recomputation per pixel of travel.
 * options.idPrefix: DOM id prefix (unique per widget instance).
 *
 * Returns {el, input, name, param, get(), set(value), setDisabled(bool), destroy()}.
 */
export function buildControl(param, value, { onChange = () => {}, live = false, debounceMs = 150, idPrefix } = {}) {
  if (!param || typeof param.name !== "string" || !param.name) throw new Error("parameter schema entry needs a name");
  const doc = globalThis.document;
  const name = param.name;
  const label = labelFor(param);
  const id = `${idPrefix ?? nextId()}-${name}`;
  const type = param.type ?? "str";
  const initial = value === undefined || value === null ? param.default : value;

  const row = doc.createElement("div");
  row.className = `nbx-field nbx-field-${type}`;
  row.setAttribute("data-param-row", name);
  const lab = doc.createElement("label");
  lab.className = "nbx-label";
  lab.htmlFor = id;
  lab.textContent = label;
  if (param.help) {
    row.title = param.help;
    lab.title = param.help;
  }
  row.appendChild(lab);

  let input;
  let readout = null;
  let committed = initial;
  let timer = null;
  const ctrl = new AbortController();
  const on = (target, ev, fn) => target.addEventListener(ev, fn, { signal: ctrl.signal });

  const commit = (v) => {
    if (timer) {
      clearTimeout(timer);
      timer = null;
    }
    if (v === undefined) return;
    if (Object.is(v, committed)) return;
    committed = v;
    onChange(name, v);
  };

  const numeric = type === "int" || type === "float";
  // A slider is only usable when a pixel step means something: a seed (0..2^31) gets a number box.
  const SLIDER_MAX_POSITIONS = 2000;
  const span = (Number(param.max) - Number(param.min)) / Number(param.step || (type === "int" ? 1 : 0.01));
  const hasRange = numeric && Number.isFinite(Number(param.min)) && Number.isFinite(Number(param.max)) &&
    param.min !== null && param.max !== null && span <= SLIDER_MAX_POSITIONS;

  if (numeric) {
    input = doc.createElement("input");
    input.type = hasRange ? "range" : "number";
    const step = param.step ?? (type === "int" ? 1 : hasRange ? (param.max - param.min) / 100 : "any");
    if (param.min != null) input.min = String(param.min);
    if (param.max != null) input.max = String(param.max);
    input.step = String(step);
    input.value = String(initial ?? param.min ?? 0);
    const fmt = (v) => (type === "int" || step === "any" ? String(v) : Number(v).toFixed(Math.min(6, decimals(step))));
    if (hasRange) {
      readout = doc.createElement("output");
      readout.className = "nbx-readout-value";
      readout.htmlFor = id;
      readout.setAttribute("aria-hidden", "true"); // the slider already announces its value
      readout.textContent = fmt(input.value);
    }
    const current = () => coerce(param, input.value);
    on(input, "input", () => {
      if (readout) readout.textContent = fmt(input.value);
      if (live || debounceMs <= 0) commit(current());
      else {
        if (timer) clearTimeout(timer);
        timer = setTimeout(() => commit(current()), debounceMs);
      }
    });
    on(input, "change", () => commit(current()));
    input._nbxSet = (v) => {
      input.value = String(v);
      if (readout) readout.textContent = fmt(input.value);
    };
    input._nbxGet = current;
  } else if (type === "choice") {
    input = doc.createElement("select");
    const choices = Array.isArray(param.choices) ? param.choices : [];
    choices.forEach((c, i) => {
      // A choice is either a plain value or a [value, label] pair.
      const [val, text] = Array.isArray(c) ? c : [c, String(c)];
      const opt = doc.createElement("option");
      opt.value = String(i);
      opt.textContent = text;
      opt._nbxValue = val;
      input.appendChild(opt);
    });
    const indexOf = (v) => choices.findIndex((c) => Object.is(Array.isArray(c) ? c[0] : c, v) || String(Array.isArray(c) ? c[0] : c) === String(v));
    input._nbxSet = (v) => {
      const i = indexOf(v);
      input.selectedIndex = i; // -1 shows no selection for a value not in the list
    };
    input._nbxGet = () => input.options[input.selectedIndex]?._nbxValue;
    input._nbxSet(initial);
    on(input, "change", () => commit(input._nbxGet()));
  } else if (type === "bool") {
    input = doc.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(initial);
    input._nbxSet = (v) => {
      input.checked = Boolean(v);
    };
    input._nbxGet = () => input.checked;
    on(input, "change", () => commit(input.checked));
  } else {
    input = doc.createElement("input");
    input.type = "text";
    input.value = initial == null ? "" : String(initial);
    input.spellcheck = false;
    input._nbxSet = (v) => {
      input.value = v == null ? "" : String(v);
    };
    input._nbxGet = () => input.value;
    // Commit on Enter or blur (the `change` event), not on every keystroke.
    on(input, "change", () => commit(input.value));
  }

  input.id = id;
  input.className = `nbx-input nbx-input-${type}`;
  markInteractive(input, name, label);
  if (param.help) input.title = param.help;
  row.appendChild(input);
  if (readout) row.appendChild(readout);

  return {
    el: row,
    input,
    readout,
    name,
    param,
    get: () => input._nbxGet(),
    set(v) {
      const val = v === undefined || v === null ? param.default : v;
      committed = val;
      input._nbxSet(val);
    },
    setDisabled(flag) {
      input.disabled = Boolean(flag);
    },
    destroy() {
      if (timer) clearTimeout(timer);
      timer = null;
      ctrl.abort();
    },
  };
}

/** Build controls for a list of parameters; returns {el, controls: Map(name → control), destroy()}. */
export function buildControls(params, values, options = {}) {
  const doc = globalThis.document;
  const el = doc.createElement("div");
  el.className = "nbx-params";
  const controls = new Map();
  const idPrefix = options.idPrefix ?? nextId();
  for (const p of params ?? []) {
    const c = buildControl(p, values?.[p.name], { ...options, idPrefix });
    controls.set(p.name, c);
    el.appendChild(c.el);
  }
  return {
    el,
    controls,
    destroy() {
      for (const c of controls.values()) c.destroy();
    },
  };
}
