// Pure rendering logic (no DOM): sign handling, percentile clipping, normalisation, blending.

export const SIGNS = Object.freeze(["positive", "negative", "absolute", "signed"]);

/** "auto" → "signed" for methods whose map is signed, else "positive"; other values are validated. */
export function resolveSign(sign, methodSigned) {
  if (sign == null || sign === "" || sign === "auto") return methodSigned ? "signed" : "positive";
  if (!SIGNS.includes(sign)) {
    throw new Error(`unknown sign ${JSON.stringify(sign)}; valid values: auto, ${SIGNS.join(", ")}`);
  }
  return sign;
}

/** "auto" → "blue_orange" for signed display, "cividis" otherwise; explicit names pass through. */
export function resolveColormap(colormap, sign) {
  if (colormap == null || colormap === "" || colormap === "auto") return sign === "signed" ? "blue_orange" : "cividis";
  return colormap;
}

// k-th smallest value (0-based) of a scratch array, partially reordering it (Hoare quickselect).
function select(a, k, lo = 0, hi = a.length - 1) {
  while (lo < hi) {
    const pivot = a[(lo + hi) >> 1];
    let i = lo;
    let j = hi;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) {
        const t = a[i];
        a[i] = a[j];
        a[j] = t;
        i++;
        j--;
      }
    }
    if (k <= j) hi = j;
    else if (k >= i) lo = i;
    else return a[k];
  }
  return a[k];
}

/**
 * The p-th percentile (0..100) of the finite values, with numpy's default linear interpolation
 * (`np.percentile(v[np.isfinite(v)], p)`). Returns NaN when there is no finite value.
 * Runs in O(n) with quickselect so it stays cheap for large maps.
 */
export function percentile(values, p) {
  const n0 = values.length;
  const a = new Float64Array(n0);
  let n = 0;
  for (let i = 0; i < n0; i++) {
    const v = values[i];
    if (Number.isFinite(v)) a[n++] = v;
  }
  if (n === 0) return NaN;
  const q = Math.min(100, Math.max(0, Number(p))) / 100;
  const rank = q * (n - 1);
  const k = Math.floor(rank);
  const frac = rank - k;
  const view = a.subarray(0, n);
  const lo = select(view, k);
  if (frac === 0 || k + 1 >= n) return lo;
  // After selecting k, everything right of k is >= a[k]; the (k+1)-th smallest is their minimum.
  let hi = Infinity;
  for (let i = k + 1; i < n; i++) if (view[i] < hi) hi = view[i];
  return lo + (hi - lo) * frac;
}

/**
 * Turn raw attribution values into colormap positions in [0, 1].
 *
 * The sign picks what is shown: "positive" max(v, 0), "negative" max(-v, 0), "absolute" |v|,
 * "signed" v (0 lands at 0.5, the neutral centre of a diverging map, symmetric around 0).
 * NaN means "no attribution at this pixel" (e.g. outside the model's centre crop): it stays NaN, and
 * blend()/colorize() leave such pixels uncoloured.
 * The scale is the `clip` percentile of the shown magnitudes over all finite pixels (100 = the
 * maximum, 99 = the top 1 % saturate). Non-finite values map to the neutral position (0, or 0.5
 * when signed), and a map with nothing to show (all zero) yields neutral values, never NaN.
 *
 * Returns {values: Float32Array in [0, 1], signed, scale, vmin, vmax}; vmin and vmax are the raw
 * attribution values drawn with the lowest and highest colour (for "negative" vmax is -scale).
 */
export function prepareMap(values, { sign = "positive", clip = 100 } = {}) {
  if (!SIGNS.includes(sign)) throw new Error(`unknown sign ${JSON.stringify(sign)}; valid values: ${SIGNS.join(", ")}`);
  const clipP = clip == null || !Number.isFinite(Number(clip)) ? 100 : Math.min(100, Math.max(0, Number(clip)));
  const n = values.length;
  const shown = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const v = values[i];
    let t;
    if (!Number.isFinite(v)) t = NaN;
    else if (sign === "positive") t = v > 0 ? v : 0;
    else if (sign === "negative") t = v < 0 ? -v : 0;
    else if (sign === "absolute") t = Math.abs(v);
    else t = v;
    shown[i] = t;
  }
  let scale;
  if (sign === "signed") {
    const mag = new Float32Array(n);
    for (let i = 0; i < n; i++) mag[i] = Math.abs(shown[i]);
    scale = percentile(mag, clipP);
  } else {
    scale = percentile(shown, clipP);
  }
  if (!(scale > 0) || !Number.isFinite(scale)) scale = 0;

  const signed = sign === "signed";
  const out = shown; // normalise in place: `shown` is our own scratch copy
  const neutral = signed ? 0.5 : 0;
  const inv = scale > 0 ? 1 / scale : 0;
  for (let i = 0; i < n; i++) {
    const t = out[i];
    if (Number.isNaN(t)) continue; // NaN = no attribution here (outside the model's crop): stays NaN
    if (scale === 0) {
      out[i] = neutral;
      continue;
    }
    let m = t * inv;
    if (signed) {
      m = m > 1 ? 1 : m < -1 ? -1 : m;
      out[i] = 0.5 + 0.5 * m;
    } else {
      out[i] = m > 1 ? 1 : m < 0 ? 0 : m;
    }
  }
  let vmin = 0;
  let vmax = scale;
  if (signed) vmin = scale === 0 ? 0 : -scale;
  else if (sign === "negative") vmax = scale === 0 ? 0 : -scale;
  return { values: out, signed, scale, vmin, vmax };
}

/**
 * Blend a colormapped map over an RGBA image.
 *
 * `mapNorm` holds one colormap position in [0, 1] per pixel (from prepareMap), `table` is a 256×RGB
 * LUT. Each pixel's colour is image·(1−a) + colour·a with a = opacity, or, with alphaByMagnitude,
 * a = opacity·magnitude (|2m−1| when `signed`, else m) so weak attributions let the image through.
 * The alpha channel is composited "over" the image's own alpha. Writes into `out` when given.
 */
export function blend(imageRGBA, mapNorm, table, opacity, { alphaByMagnitude = false, signed = false, out } = {}) {
  const n = mapNorm.length;
  if (imageRGBA.length !== n * 4) {
    throw new Error(`map has ${n} pixels but the image has ${imageRGBA.length / 4}: map shape must equal image shape`);
  }
  if (!table || table.length < 256 * 3) throw new Error("colormap table must have 256 RGB entries");
  const dst = out ?? new Uint8ClampedArray(n * 4);
  if (dst.length !== n * 4) throw new Error("output buffer has the wrong size");
  const op = Math.min(1, Math.max(0, Number(opacity) || 0));
  for (let i = 0; i < n; i++) {
    let m = mapNorm[i];
    const none = Number.isNaN(m); // no attribution at this pixel: the image shows through untouched
    if (none || m < 0) m = signed ? 0.5 : 0;
    else if (m > 1) m = 1;
    const a = none ? 0 : alphaByMagnitude ? op * (signed ? Math.abs(2 * m - 1) : m) : op;
    const li = 3 * Math.round(m * 255);
    const p = 4 * i;
    const b = 1 - a;
    dst[p] = imageRGBA[p] * b + table[li] * a;
    dst[p + 1] = imageRGBA[p + 1] * b + table[li + 1] * a;
    dst[p + 2] = imageRGBA[p + 2] * b + table[li + 2] * a;
    dst[p + 3] = imageRGBA[p + 3] + (255 - imageRGBA[p + 3]) * a;
  }
  return dst;
}

/** Paint a map with the colormap alone (opaque), e.g. when no image is available. */
export function colorize(mapNorm, table, { out } = {}) {
  const n = mapNorm.length;
  const dst = out ?? new Uint8ClampedArray(n * 4);
  for (let i = 0; i < n; i++) {
    const m = mapNorm[i] >= 0 ? Math.min(1, mapNorm[i]) : 0;
    const li = 3 * Math.round(m * 255);
    dst[4 * i] = table[li];
    dst[4 * i + 1] = table[li + 1];
    dst[4 * i + 2] = table[li + 2];
    dst[4 * i + 3] = Number.isNaN(mapNorm[i]) ? 0 : 255; // no attribution: transparent
  }
  return dst;
}

/** Raw value under pixel (x, y) of an [h, w] map, or null outside it. x, y are floored. */
export function valueAt(values, shape, x, y) {
  if (!values || !shape) return null;
  const [h, w] = shape;
  const xi = Math.floor(x);
  const yi = Math.floor(y);
  if (!(xi >= 0 && yi >= 0 && xi < w && yi < h)) return null;
  const v = values[yi * w + xi];
  return v === undefined ? null : v;
}

/** Compact number formatting for labels and the hover readout. */
export function formatValue(v) {
  if (v == null) return "";
  if (Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "∞" : "−∞";
  if (v === 0) return "0";
  const a = Math.abs(v);
  const s = a >= 1e4 || a < 1e-3 ? v.toExponential(2) : String(Number(v.toPrecision(3)));
  return s.replace("-", "−");
}

/** "preprocess cached · forward ran 12 ms · …" from the kernel's `_stages` list. */
export function formatStages(stages) {
  if (!Array.isArray(stages)) return "";
  return stages
    .map((s) => {
      if (!s || !s.name) return "";
      if (!s.ran) return `${s.name} cached`;
      const ms = Number(s.ms);
      if (!Number.isFinite(ms)) return `${s.name} ran`;
      return `${s.name} ran ${ms < 10 ? ms.toFixed(1) : Math.round(ms)} ms`;
    })
    .filter(Boolean)
    .join(" · ");
}
