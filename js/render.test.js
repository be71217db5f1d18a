import { describe, expect, it } from "vitest";
import { lut } from "./colormaps.js";
import {
  blend,
  colorize,
  formatStages,
  formatValue,
  percentile,
  prepareMap,
  resolveColormap,
  resolveSign,
  valueAt,
} from "./render.js";

const arr = (a) => Array.from(a);
const close = (got, want) => {
  expect(got.length).toBe(want.length);
  want.forEach((w, i) => expect(got[i], `index ${i}`).toBeCloseTo(w, 6));
};

describe("percentile (numpy linear interpolation)", () => {
  it("matches hand-computed values", () => {
    const v = new Float32Array([4, 1, 3, 2]);
    expect(percentile(v, 0)).toBe(1);
    expect(percentile(v, 50)).toBe(2.5);
    expect(percentile(v, 100)).toBe(4);
    expect(percentile(v, 99)).toBeCloseTo(3.97, 6); // rank 2.97
    expect(percentile(new Float32Array([5]), 90)).toBe(5);
  });

  it("ignores non-finite values and does not reorder the input", () => {
    const v = new Float32Array([NaN, 3, 1, Infinity, 2]);
    expect(percentile(v, 50)).toBe(2);
    expect(Number.isNaN(v[0])).toBe(true);
    expect(v[1]).toBe(3);
    expect(Number.isNaN(percentile(new Float32Array([NaN]), 50))).toBe(true);
  });

  it("agrees with a sort-based reference on random data with duplicates", () => {
    let seed = 7;
    const rnd = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
    for (let trial = 0; trial < 20; trial++) {
      const n = 1 + Math.floor(rnd() * 300);
      const v = new Float32Array(n).map(() => Math.round(rnd() * 20) / 4);
      const s = Array.from(v).sort((a, b) => a - b);
      for (const p of [0, 10, 50, 90, 97.5, 99, 100]) {
        const r = (p / 100) * (n - 1);
        const k = Math.floor(r);
        const want = k + 1 < n ? s[k] + (s[k + 1] - s[k]) * (r - k) : s[k];
        expect(percentile(v, p)).toBeCloseTo(want, 5);
      }
    }
  });
});

describe("prepareMap", () => {
  const v = new Float32Array([-2, 0, 1, 2, 4]);

  it("positive keeps max(v, 0) scaled by the maximum", () => {
    const r = prepareMap(v, { sign: "positive", clip: 100 });
    close(r.values, [0, 0, 0.25, 0.5, 1]);
    expect([r.vmin, r.vmax, r.signed]).toEqual([0, 4, false]);
  });

  it("negative keeps max(-v, 0); vmax is the most negative raw value", () => {
    const r = prepareMap(v, { sign: "negative", clip: 100 });
    close(r.values, [1, 0, 0, 0, 0]);
    expect([r.vmin, r.vmax]).toEqual([0, -2]);
  });

  it("absolute uses |v|", () => {
    const r = prepareMap(v, { sign: "absolute", clip: 100 });
    close(r.values, [0.5, 0, 0.25, 0.5, 1]);
    expect([r.vmin, r.vmax]).toEqual([0, 4]);
  });

  it("signed is symmetric around 0 and maps [-1, 1] to [0, 1]", () => {
    const r = prepareMap(v, { sign: "signed", clip: 100 });
    close(r.values, [0.25, 0.5, 0.625, 0.75, 1]);
    expect([r.vmin, r.vmax, r.signed]).toEqual([-4, 4, true]);
  });

  it("clips at the requested percentile so the top values saturate", () => {
    const ramp = new Float32Array(11).map((_, i) => i); // 0..10
    const p90 = prepareMap(ramp, { sign: "positive", clip: 90 }); // scale = 9
    expect(p90.scale).toBe(9);
    close(p90.values, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9].map((x) => x / 9));
    const p95 = prepareMap(ramp, { sign: "positive", clip: 95 }); // rank 9.5 → 9.5
    expect(p95.scale).toBeCloseTo(9.5, 6);
    expect(p95.values[9]).toBeCloseTo(9 / 9.5, 6);
    expect(p95.values[10]).toBe(1);
    // signed: the percentile is taken over |v|, negative side saturates at 0
    const sym = new Float32Array([-10, -5, 0, 5, 10]);
    const s = prepareMap(sym, { sign: "signed", clip: 50 }); // |v| = [10,5,0,5,10] → median 5
    expect(s.scale).toBe(5);
    close(s.values, [0, 0, 0.5, 1, 1]);
  });

  it("clip defaults to 100 (no clipping)", () => {
    expect(prepareMap(new Float32Array([1, 3])).vmax).toBe(3);
  });

  it("keeps NaN (no attribution) as NaN and ignores it for the scale", () => {
    const r = prepareMap(new Float32Array([NaN, 2, -1]), { sign: "positive", clip: 100 });
    expect(Number.isNaN(r.values[0])).toBe(true);
    close(r.values.slice(1), [1, 0]);
    const s = prepareMap(new Float32Array([NaN, 2, -1]), { sign: "signed", clip: 100 });
    close(s.values.slice(1), [1, 0.25]);
    const allNaN = prepareMap(new Float32Array([NaN, NaN]), { sign: "absolute" });
    expect(Array.from(allNaN.values).every(Number.isNaN)).toBe(true);
    expect([allNaN.vmin, allNaN.vmax]).toEqual([0, 0]);
  });

  it("leaves pixels without attribution uncoloured when blending", () => {
    const image = new Uint8ClampedArray([10, 20, 30, 255, 10, 20, 30, 255]);
    const out = blend(image, new Float32Array([NaN, 1]), lut("gray"), 1);
    expect(Array.from(out.slice(0, 4))).toEqual([10, 20, 30, 255]);
    expect(Array.from(out.slice(4, 8))).toEqual([255, 255, 255, 255]);
    expect(colorize(new Float32Array([NaN]), lut("gray"))[3]).toBe(0);
  });

  it("all-zero map gives neutral values and no NaN", () => {
    for (const sign of ["positive", "negative", "absolute"]) {
      const r = prepareMap(new Float32Array(4), { sign, clip: 99 });
      expect(arr(r.values)).toEqual([0, 0, 0, 0]);
      expect([r.vmin, r.vmax]).toEqual([0, 0]);
    }
    const s = prepareMap(new Float32Array(3), { sign: "signed", clip: 99 });
    expect(arr(s.values)).toEqual([0.5, 0.5, 0.5]);
    expect([s.vmin, s.vmax]).toEqual([0, 0]);
    // only negative values shown as "positive": nothing to show
    const neg = prepareMap(new Float32Array([-1, -2]), { sign: "positive" });
    expect(arr(neg.values)).toEqual([0, 0]);
  });

  it("does not modify its input and rejects unknown signs", () => {
    const input = new Float32Array([1, -1]);
    prepareMap(input, { sign: "signed" });
    expect(arr(input)).toEqual([1, -1]);
    expect(() => prepareMap(input, { sign: "both" })).toThrow(/unknown sign "both"/);
  });
});

describe("blend", () => {
  const image = new Uint8ClampedArray([10, 20, 30, 255, 200, 100, 50, 255]);
  const map = new Float32Array([1, 0]);
  const gray = lut("gray");

  it("opacity 0 returns the image", () => {
    expect(arr(blend(image, map, gray, 0))).toEqual(arr(image));
  });

  it("opacity 1 returns the colormap colour", () => {
    const v = lut("viridis");
    const out = blend(image, map, v, 1);
    expect(arr(out)).toEqual([253, 231, 37, 255, 68, 1, 84, 255]);
  });

  it("opacity 0.5 mixes linearly", () => {
    const out = blend(image, new Float32Array([0, 0]), gray, 0.5);
    expect(arr(out)).toEqual([5, 10, 15, 255, 100, 50, 25, 255]);
  });

  it("alphaByMagnitude scales alpha by the value (sequential) or |2m-1| (signed)", () => {
    const one = new Uint8ClampedArray([10, 20, 30, 255]);
    // m = 0.5 → a = 0.5, gray colour at index round(127.5) = 128
    expect(arr(blend(one, new Float32Array([0.5]), gray, 1, { alphaByMagnitude: true }))).toEqual([69, 74, 79, 255]);
    // signed centre → a = 0 → image unchanged
    expect(arr(blend(one, new Float32Array([0.5]), lut("blue_orange"), 1, { alphaByMagnitude: true, signed: true }))).toEqual([10, 20, 30, 255]);
  });

  it("composites alpha over transparent pixels and writes into `out`", () => {
    const clear = new Uint8ClampedArray([0, 0, 0, 0]);
    const out = new Uint8ClampedArray(4);
    const r = blend(clear, new Float32Array([0]), gray, 0.5, { out });
    expect(r).toBe(out);
    expect(arr(out)).toEqual([0, 0, 0, 128]);
  });

  it("rejects a map whose size differs from the image", () => {
    expect(() => blend(image, new Float32Array(3), gray, 1)).toThrow(/map shape must equal image shape/);
  });

  it("colorize paints the map alone", () => {
    expect(arr(colorize(new Float32Array([0, 1]), gray))).toEqual([0, 0, 0, 255, 255, 255, 255, 255]);
  });
});

describe("valueAt", () => {
  const vals = new Float32Array([1, 2, 3, 4, 5, 6]); // shape [2, 3]
  it("indexes row-major with x = column, y = row", () => {
    expect(valueAt(vals, [2, 3], 0, 0)).toBe(1);
    expect(valueAt(vals, [2, 3], 2, 0)).toBe(3);
    expect(valueAt(vals, [2, 3], 1, 1)).toBe(5);
    expect(valueAt(vals, [2, 3], 2.9, 1.2)).toBe(6);
  });
  it("returns null outside the map", () => {
    expect(valueAt(vals, [2, 3], 3, 0)).toBeNull();
    expect(valueAt(vals, [2, 3], 0, 2)).toBeNull();
    expect(valueAt(vals, [2, 3], -1, 0)).toBeNull();
    expect(valueAt(null, [2, 3], 0, 0)).toBeNull();
  });
});

describe("resolveColormap / resolveSign", () => {
  it("auto colormap depends on the sign", () => {
    for (const s of ["positive", "negative", "absolute"]) expect(resolveColormap("auto", s)).toBe("cividis");
    expect(resolveColormap("auto", "signed")).toBe("blue_orange");
    expect(resolveColormap("magma", "signed")).toBe("magma");
  });
  it("auto sign depends on whether the method is signed", () => {
    expect(resolveSign("auto", true)).toBe("signed");
    expect(resolveSign("auto", false)).toBe("positive");
    expect(resolveSign("absolute", true)).toBe("absolute");
    expect(() => resolveSign("both", false)).toThrow(/auto, positive, negative, absolute, signed/);
  });
});

describe("formatting", () => {
  it("formats values compactly", () => {
    expect(formatValue(0)).toBe("0");
    expect(formatValue(0.123456)).toBe("0.123");
    expect(formatValue(-2.5)).toBe("−2.5");
    expect(formatValue(12345)).toBe("1.23e+4");
    expect(formatValue(NaN)).toBe("NaN");
  });
  it("formats the stage list", () => {
    expect(formatStages([{ name: "preprocess", ran: false, ms: 0 }, { name: "forward", ran: true, ms: 12.4 }, { name: "backward", ran: true, ms: 3.21 }])).toBe(
      "preprocess cached · forward ran 12 ms · backward ran 3.2 ms",
    );
    expect(formatStages(null)).toBe("");
  });
});
