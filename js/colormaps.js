// Colour maps as 256-entry RGB lookup tables.
//
// Sequential maps (cividis, viridis, magma, inferno) are matplotlib's perceptually uniform LUTs.
// The diverging `blue_orange` map interpolates ColorBrewer anchors: the blue half of RdBu and the
// orange half of PuOr, joined at a neutral near-white. Blue vs orange stays distinct for the common
// colour-vision deficiencies (they differ along the blue-yellow axis), unlike red vs green.
// `jet` is kept only for people comparing with older figures: it is not perceptually ordered.

import { LISTED } from "./colormap_data.js";

const BLUE_ORANGE_ANCHORS = [
  "053061", "2166ac", "4393c3", "92c5de", "d1e5f0", // RdBu, blue half (dark → light)
  "f7f7f7", // neutral centre (value 0)
  "fee0b6", "fdb863", "e08214", "b35806", "7f3b08", // PuOr, orange half (light → dark)
];

const SEQUENTIAL = ["cividis", "viridis", "magma", "inferno", "gray", "jet"];
const DIVERGING = ["blue_orange"];

/** Every valid colormap name, the recommended ones first. */
export const COLORMAPS = Object.freeze(["cividis", "viridis", "magma", "inferno", "blue_orange", "gray", "jet"]);

const cache = new Map();

function fromHex(hex) {
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256 * 3; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

function fromAnchors(anchors) {
  const rgb = anchors.map((h) => [0, 2, 4].map((k) => parseInt(h.substr(k, 2), 16)));
  const out = new Uint8ClampedArray(256 * 3);
  const segs = rgb.length - 1;
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * segs;
    const k = Math.min(Math.floor(t), segs - 1);
    const f = t - k;
    for (let c = 0; c < 3; c++) out[3 * i + c] = Math.round(rgb[k][c] * (1 - f) + rgb[k + 1][c] * f);
  }
  return out;
}

function fromFunction(fn) {
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const [r, g, b] = fn(i / 255);
    out[3 * i] = Math.round(r * 255);
    out[3 * i + 1] = Math.round(g * 255);
    out[3 * i + 2] = Math.round(b * 255);
  }
  return out;
}

const clamp01 = (v) => Math.min(1, Math.max(0, v));

const BUILDERS = {
  cividis: () => fromHex(LISTED.cividis),
  viridis: () => fromHex(LISTED.viridis),
  magma: () => fromHex(LISTED.magma),
  inferno: () => fromHex(LISTED.inferno),
  blue_orange: () => fromAnchors(BLUE_ORANGE_ANCHORS),
  gray: () => fromFunction((t) => [t, t, t]),
  // Classic MATLAB jet as piecewise-linear ramps.
  jet: () => fromFunction((t) => [1.5 - Math.abs(4 * t - 3), 1.5 - Math.abs(4 * t - 2), 1.5 - Math.abs(4 * t - 1)].map(clamp01)),
};

function check(name) {
  if (!Object.hasOwn(BUILDERS, name)) {
    throw new Error(`unknown colormap ${JSON.stringify(name)}; valid names: ${COLORMAPS.join(", ")} (or "auto")`);
  }
}

/** The 256×RGB lookup table of a colormap (cached; do not mutate). */
export function lut(name) {
  check(name);
  let table = cache.get(name);
  if (!table) {
    table = BUILDERS[name]();
    cache.set(name, table);
  }
  return table;
}

/** True for maps meant for signed data (neutral colour at the centre). */
export function isDiverging(name) {
  check(name);
  return DIVERGING.includes(name);
}

/** True for maps whose colour is ordered from low to high (sequential). */
export function isSequential(name) {
  check(name);
  return SEQUENTIAL.includes(name);
}

/** `n` evenly spaced colour stops [{offset: 0..1, color: "rgb(r, g, b)"}] for a Canvas gradient. */
export function colorbarStops(name, n = 17) {
  const table = lut(name);
  const stops = [];
  for (let k = 0; k < n; k++) {
    const offset = n === 1 ? 0 : k / (n - 1);
    const i = Math.round(offset * 255);
    stops.push({ offset, color: `rgb(${table[3 * i]}, ${table[3 * i + 1]}, ${table[3 * i + 2]})` });
  }
  return stops;
}

/** A CSS `linear-gradient(...)` running from the low end of the map to the high end. */
export function colorbarGradient(name, direction = "to right", n = 17) {
  const stops = colorbarStops(name, n).map((s) => `${s.color} ${+(s.offset * 100).toFixed(2)}%`);
  return `linear-gradient(${direction}, ${stops.join(", ")})`;
}

/** Relative luminance (WCAG / sRGB) of LUT entry i, in [0, 1]. */
export function luminance(table, i) {
  const lin = (v) => {
    const c = v / 255;
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  };
  return 0.2126 * lin(table[3 * i]) + 0.7152 * lin(table[3 * i + 1]) + 0.0722 * lin(table[3 * i + 2]);
}
