import { describe, expect, it } from "vitest";
import { COLORMAPS, colorbarGradient, colorbarStops, isDiverging, isSequential, lut, luminance } from "./colormaps.js";

const rgb = (t, i) => [t[3 * i], t[3 * i + 1], t[3 * i + 2]];

describe("lut", () => {
  it("returns 256×3 Uint8ClampedArrays for every map", () => {
    for (const name of COLORMAPS) {
      const t = lut(name);
      expect(t).toBeInstanceOf(Uint8ClampedArray);
      expect(t.length).toBe(768);
    }
  });

  it("has the matplotlib endpoints", () => {
    expect(rgb(lut("viridis"), 0)).toEqual([68, 1, 84]); // #440154
    expect(rgb(lut("viridis"), 255)).toEqual([253, 231, 37]); // #fde725
    expect(rgb(lut("cividis"), 0)).toEqual([0, 34, 78]);
    expect(rgb(lut("cividis"), 255)).toEqual([254, 232, 56]);
    expect(rgb(lut("magma"), 0)).toEqual([0, 0, 4]);
    expect(rgb(lut("magma"), 255)).toEqual([252, 253, 191]);
    expect(rgb(lut("inferno"), 255)).toEqual([252, 255, 164]);
    expect(rgb(lut("gray"), 0)).toEqual([0, 0, 0]);
    expect(rgb(lut("gray"), 255)).toEqual([255, 255, 255]);
    expect(rgb(lut("jet"), 0)).toEqual([0, 0, 128]);
    expect(rgb(lut("jet"), 255)).toEqual([128, 0, 0]);
  });

  it("sequential maps have monotonically increasing luminance", () => {
    for (const name of ["cividis", "viridis", "magma", "inferno", "gray"]) {
      const t = lut(name);
      expect(isSequential(name)).toBe(true);
      expect(isDiverging(name)).toBe(false);
      for (let i = 1; i < 256; i++) {
        // 8-bit rounding may tie, never reverse by more than a hair
        expect(luminance(t, i), `${name} @ ${i}`).toBeGreaterThanOrEqual(luminance(t, i - 1) - 1e-3);
      }
      expect(luminance(t, 255) - luminance(t, 0)).toBeGreaterThan(0.5);
    }
  });

  it("blue_orange is diverging: blue low end, orange high end, neutral near-white centre", () => {
    const t = lut("blue_orange");
    expect(isDiverging("blue_orange")).toBe(true);
    const [r0, , b0] = rgb(t, 0);
    const [r1, , b1] = rgb(t, 255);
    expect(b0).toBeGreaterThan(r0); // blue
    expect(r1).toBeGreaterThan(b1); // orange / brown
    for (const i of [127, 128]) {
      const [r, g, b] = rgb(t, i);
      expect(Math.min(r, g, b)).toBeGreaterThan(230);
      expect(Math.max(r, g, b) - Math.min(r, g, b)).toBeLessThan(12);
    }
    // luminance falls away from the centre on both sides and the ends are comparably dark
    for (let i = 1; i <= 127; i++) expect(luminance(t, i)).toBeGreaterThanOrEqual(luminance(t, i - 1) - 1e-3);
    for (let i = 129; i < 256; i++) expect(luminance(t, i)).toBeLessThanOrEqual(luminance(t, i - 1) + 1e-3);
    expect(Math.abs(luminance(t, 0) - luminance(t, 255))).toBeLessThan(0.1);
  });

  it("rejects unknown names with the list of valid ones", () => {
    expect(() => lut("rainbow")).toThrow(/unknown colormap "rainbow".*cividis, viridis, magma, inferno, blue_orange, gray, jet/);
    expect(() => isDiverging("nope")).toThrow(/valid names/);
  });
});

describe("colour bar", () => {
  it("stops span the LUT from low to high", () => {
    const stops = colorbarStops("viridis", 3);
    expect(stops.map((s) => s.offset)).toEqual([0, 0.5, 1]);
    expect(stops[0].color).toBe("rgb(68, 1, 84)");
    expect(stops[2].color).toBe("rgb(253, 231, 37)");
  });

  it("CSS gradient string", () => {
    const g = colorbarGradient("gray", "to right", 2);
    expect(g).toBe("linear-gradient(to right, rgb(0, 0, 0) 0%, rgb(255, 255, 255) 100%)");
    expect(() => colorbarGradient("x")).toThrow(/unknown colormap/);
  });
});
