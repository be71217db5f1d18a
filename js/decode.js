// Decode binary array messages sent by the kernel: {data, dtype, shape}.
//
// anywidget splits bytes/memoryview values out of synced dicts into binary buffers, which arrive
// here as DataViews that usually point *into* a larger ArrayBuffer, so byteOffset matters and is
// not guaranteed to be aligned for Float32Array.

const ITEMSIZE = { float32: 4, float16: 2, uint8: 1 };

export const DTYPES = Object.freeze(Object.keys(ITEMSIZE));

/** View any supported binary container as a Uint8Array over exactly its bytes (no copy). */
export function asBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  if (typeof SharedArrayBuffer !== "undefined" && data instanceof SharedArrayBuffer) return new Uint8Array(data);
  throw new TypeError(
    `cannot decode array data of type ${Object.prototype.toString.call(data)}: ` +
      "expected a DataView, ArrayBuffer or typed array (send bytes/memoryview from Python)",
  );
}

/** Number of elements of a shape, validating it is a list of 2 or 3 non-negative integers. */
export function shapeSize(shape) {
  if (!Array.isArray(shape) || shape.length < 2 || shape.length > 3) {
    throw new Error(`array shape must be [h, w] or [h, w, c], got ${JSON.stringify(shape)}`);
  }
  let n = 1;
  for (const d of shape) {
    if (!Number.isInteger(d) || d < 0) {
      throw new Error(`array shape must contain non-negative integers, got ${JSON.stringify(shape)}`);
    }
    n *= d;
  }
  return n;
}

const _f16Buf = new DataView(new ArrayBuffer(4));

/** Convert one IEEE 754 half-precision bit pattern to a JS number. */
export function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >> 10) & 0x1f;
  const frac = bits & 0x03ff;
  if (exp === 0) return sign * frac * 2 ** -24; // zero / subnormal
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  // Normal numbers: rebuild the float32 bit pattern (exact, no rounding needed).
  _f16Buf.setUint32(0, ((bits & 0x8000) << 16) | ((exp - 15 + 127) << 23) | (frac << 13));
  return _f16Buf.getFloat32(0);
}

/**
 * Decode `{data, dtype, shape}` into a typed array.
 *
 * float32/float16 → Float32Array, uint8 → Uint8ClampedArray (ready for ImageData).
 * Multi-byte data is read as little-endian (what numpy produces on every platform Jupyter runs on).
 * Throws an Error whose message says what was expected when dtype or length do not fit the shape.
 */
export function decodeArray(msg) {
  if (msg == null || typeof msg !== "object") throw new Error("array message must be an object {data, dtype, shape}");
  const { dtype, shape } = msg;
  const itemsize = ITEMSIZE[dtype];
  if (!itemsize) {
    throw new Error(`unsupported dtype ${JSON.stringify(dtype)}: expected one of ${DTYPES.join(", ")}`);
  }
  const n = shapeSize(shape);
  const bytes = asBytes(msg.data);
  if (bytes.byteLength !== n * itemsize) {
    throw new Error(
      `array length mismatch: shape ${JSON.stringify(shape)} with dtype ${dtype} needs ` +
        `${n * itemsize} bytes, got ${bytes.byteLength}`,
    );
  }
  if (dtype === "uint8") return new Uint8ClampedArray(bytes.buffer, bytes.byteOffset, n);
  if (dtype === "float32") {
    if (bytes.byteOffset % 4 === 0) return new Float32Array(bytes.buffer, bytes.byteOffset, n);
    return new Float32Array(bytes.slice().buffer); // unaligned: copy into a fresh buffer
  }
  // float16
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = halfToFloat(dv.getUint16(2 * i, true));
  return out;
}

/**
 * Decode an image message into RGBA pixels: returns {rgba: Uint8ClampedArray, width, height}.
 * Accepts uint8 [h, w], [h, w, 1], [h, w, 3] or [h, w, 4].
 */
export function decodeImage(msg) {
  if (msg?.dtype !== "uint8") throw new Error(`image must have dtype uint8, got ${JSON.stringify(msg?.dtype)}`);
  const px = decodeArray(msg);
  const [h, w, c = 1] = msg.shape;
  if (c === 4) return { rgba: px, width: w, height: h };
  if (c !== 1 && c !== 3) throw new Error(`image must have 1, 3 or 4 channels, got shape ${JSON.stringify(msg.shape)}`);
  const rgba = new Uint8ClampedArray(w * h * 4);
  for (let i = 0, j = 0; i < w * h; i++, j += c) {
    rgba[4 * i] = px[j];
    rgba[4 * i + 1] = px[c === 3 ? j + 1 : j];
    rgba[4 * i + 2] = px[c === 3 ? j + 2 : j];
    rgba[4 * i + 3] = 255;
  }
  return { rgba, width: w, height: h };
}
