// Writes every colormap's 256-entry LUT to nbexplain/static/colormaps.json, so that Python exports
// (PNG/HTML overlays) use exactly the colours the widget draws: one source of truth, here in js/.
import { mkdirSync, writeFileSync } from "node:fs";
import { COLORMAPS, lut } from "./colormaps.js";

const out = Object.fromEntries(COLORMAPS.map((name) => [name, Buffer.from(lut(name)).toString("hex")]));
mkdirSync("nbexplain/static", { recursive: true });
writeFileSync("nbexplain/static/colormaps.json", JSON.stringify(out));
