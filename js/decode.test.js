import { describe, expect, it } from "vitest";
import { asBytes, decodeArray, decodeImage, halfToFloat, shapeSize } from "./decode.js";

// little-endian float32 bytes for the given numbers
const f32Bytes = (vals) => new Uint8Array(new Float32Array(vals).buffer);

describe("decodeArray", () => {
  it("decodes float32 from an ArrayBuffer, a Uint8Array and a DataView", () => {
    const vals = [0, 1.5, -2, 3.25, 1e-3, 7];
    const bytes = f32Bytes(vals);
    for (const data of [bytes.buffer, bytes, new DataView(bytes.buffer)]) {
      const out = decodeArray({ data, dtype: "float32", shape: [2, 3] });
      expect(out).toBeInstanceOf(Float32Array);
      expect(Array.from(out)).toEqual(Array.from(new Float32Array(vals)));
    }
  });

  it("honours the byteOffset of a DataView into a larger buffer (aligned and unaligned)", () => {
    const vals = [1, 2, 3, 4];
    for (const offset of [8, 3]) {
      const big = new Uint8Array(offset + 16 + 5).fill(0xff);
      big.set(f32Bytes(vals), offset);
      const dv = new DataView(big.buffer, offset, 16);
      const out = decodeArray({ data: dv, dtype: "float32", shape: [2, 2] });
      expect(Array.from(out)).toEqual(vals);
    }
  });

  it("honours the byteOffset of a Uint8Array subarray for uint8", () => {
    const big = new Uint8Array([9, 9, 1, 2, 3, 4, 9]);
    const out = decodeArray({ data: big.subarray(2, 6), dtype: "uint8", shape: [1, 1, 4] });
    expect(out).toBeInstanceOf(Uint8ClampedArray);
    expect(Array.from(out)).toEqual([1, 2, 3, 4]);
  });

  it("converts float16 to float32 (normal, subnormal, zero, inf, nan) at an odd offset", () => {
    // 1.0, -2.0, 0.5, 65504 (max), 2^-24 (smallest subnormal), -0, +inf, NaN
    const bits = [0x3c00, 0xc000, 0x3800, 0x7bff, 0x0001, 0x8000, 0x7c00, 0x7e00];
    const buf = new ArrayBuffer(1 + bits.length * 2);
    const dv = new DataView(buf);
    bits.forEach((b, i) => dv.setUint16(1 + 2 * i, b, true));
    const out = decodeArray({ data: new DataView(buf, 1), dtype: "float16", shape: [2, 4] });
    expect(out).toBeInstanceOf(Float32Array);
    expect(Array.from(out.slice(0, 5))).toEqual([1, -2, 0.5, 65504, 2 ** -24]);
    expect(Object.is(out[5], -0)).toBe(true);
    expect(out[6]).toBe(Infinity);
    expect(Number.isNaN(out[7])).toBe(true);
  });

  it("halfToFloat handles 0.1 approximately", () => {
    expect(halfToFloat(0x2e66)).toBeCloseTo(0.1, 3);
  });

  it("throws a clear error when the length does not match the shape", () => {
    const data = f32Bytes([1, 2, 3]);
    expect(() => decodeArray({ data, dtype: "float32", shape: [2, 2] })).toThrow(/needs 16 bytes, got 12/);
    expect(() => decodeArray({ data, dtype: "float64", shape: [3, 1] })).toThrow(/unsupported dtype.*float32, float16, uint8/);
    expect(() => decodeArray({ data, dtype: "float32", shape: [3] })).toThrow(/\[h, w\] or \[h, w, c\]/);
    expect(() => decodeArray({ data: "abc", dtype: "uint8", shape: [1, 3] })).toThrow(/DataView, ArrayBuffer or typed array/);
  });

  it("shapeSize multiplies dims and rejects bad dims", () => {
    expect(shapeSize([2, 3, 4])).toBe(24);
    expect(() => shapeSize([2, 1.5])).toThrow(/integers/);
  });

  it("asBytes returns a view over exactly the bytes", () => {
    const buf = new ArrayBuffer(10);
    const v = asBytes(new DataView(buf, 2, 5));
    expect(v.byteOffset).toBe(2);
    expect(v.byteLength).toBe(5);
  });
});

describe("decodeImage", () => {
  it("passes RGBA through and expands RGB and gray", () => {
    const rgba = decodeImage({ data: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]), dtype: "uint8", shape: [1, 2, 4] });
    expect([rgba.width, rgba.height]).toEqual([2, 1]);
    expect(Array.from(rgba.rgba)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    const rgb = decodeImage({ data: new Uint8Array([1, 2, 3, 4, 5, 6]), dtype: "uint8", shape: [2, 1, 3] });
    expect(Array.from(rgb.rgba)).toEqual([1, 2, 3, 255, 4, 5, 6, 255]);
    const gray = decodeImage({ data: new Uint8Array([7, 9]), dtype: "uint8", shape: [1, 2] });
    expect(Array.from(gray.rgba)).toEqual([7, 7, 7, 255, 9, 9, 9, 255]);
  });

  it("rejects non-uint8 images", () => {
    expect(() => decodeImage({ data: f32Bytes([1]), dtype: "float32", shape: [1, 1] })).toThrow(/uint8/);
  });
});
