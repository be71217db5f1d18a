// @vitest-environment jsdom
import { afterEach, describe, expect, it, vi } from "vitest";
import { buildControl, buildControls, labelFor } from "./controls.js";

const schema = [
  { name: "steps", type: "int", default: 32, min: 4, max: 256, step: 4, help: "integration steps" },
  { name: "noise", type: "float", default: 0.15, min: 0, max: 1, step: 0.05 },
  { name: "seed", type: "int", default: 0 },
  { name: "baseline", type: "choice", default: "black", choices: ["black", "blur", "uniform"] },
  { name: "head", type: "choice", default: -1, choices: [[-1, "mean"], [0, "head 0"], [1, "head 1"]] },
  { name: "abs_grad", type: "bool", default: true },
  { name: "rule", type: "str", default: "epsilon" },
];

afterEach(() => {
  document.body.replaceChildren();
  vi.useRealTimers();
});

describe("buildControls", () => {
  it("builds one labelled, keyboard-operable control per parameter", () => {
    const set = buildControls(schema, { steps: 64 });
    document.body.appendChild(set.el);
    expect(set.controls.size).toBe(schema.length);
    for (const p of schema) {
      const input = set.el.querySelector(`[data-param="${p.name}"]`);
      expect(input, p.name).not.toBeNull();
      expect(input.getAttribute("data-lm-suppress-shortcuts")).toBe("true");
      expect(input.getAttribute("aria-label")).toBe(labelFor(p));
      const label = set.el.querySelector(`label[for="${input.id}"]`);
      expect(label?.textContent).toBe(labelFor(p));
      expect(input.disabled).toBe(false);
    }
    expect(labelFor({ name: "discard_ratio" })).toBe("discard ratio");
  });

  it("maps types to elements with the schema's range", () => {
    const set = buildControls(schema, { steps: 64 });
    const q = (n) => set.el.querySelector(`[data-param="${n}"]`);
    expect(q("steps").type).toBe("range");
    expect([q("steps").min, q("steps").max, q("steps").step, q("steps").value]).toEqual(["4", "256", "4", "64"]);
    expect(set.controls.get("steps").readout.textContent).toBe("64");
    expect(q("noise").type).toBe("range");
    expect(set.controls.get("noise").readout.textContent).toBe("0.15");
    expect(q("seed").type).toBe("number"); // no min/max: a number box, not a slider
    expect(q("baseline").tagName).toBe("SELECT");
    expect([...q("baseline").options].map((o) => o.textContent)).toEqual(["black", "blur", "uniform"]);
    expect(q("head").options[q("head").selectedIndex].textContent).toBe("mean");
    expect(q("abs_grad").type).toBe("checkbox");
    expect(q("abs_grad").checked).toBe(true);
    expect(q("rule").type).toBe("text");
    expect(q("rule").value).toBe("epsilon");
    expect(q("steps").title).toBe("integration steps");
  });

  it("commits typed values on change", () => {
    const onChange = vi.fn();
    const set = buildControls(schema, {}, { onChange });
    const q = (n) => set.el.querySelector(`[data-param="${n}"]`);
    q("steps").value = "128";
    q("steps").dispatchEvent(new Event("change"));
    q("head").selectedIndex = 2;
    q("head").dispatchEvent(new Event("change"));
    q("abs_grad").checked = false;
    q("abs_grad").dispatchEvent(new Event("change"));
    q("rule").value = "gamma";
    q("rule").dispatchEvent(new Event("change"));
    expect(onChange.mock.calls).toEqual([
      ["steps", 128],
      ["head", 1],
      ["abs_grad", false],
      ["rule", "gamma"],
    ]);
  });

  it("debounces slider drags of kernel parameters, commits at once when live", () => {
    vi.useFakeTimers();
    const onChange = vi.fn();
    const c = buildControl(schema[0], 32, { onChange, debounceMs: 100 });
    c.input.value = "40";
    c.input.dispatchEvent(new Event("input"));
    c.input.value = "44";
    c.input.dispatchEvent(new Event("input"));
    expect(onChange).not.toHaveBeenCalled();
    expect(c.readout.textContent).toBe("44");
    vi.advanceTimersByTime(100);
    expect(onChange.mock.calls).toEqual([["steps", 44]]);
    // the following `change` event with the same value is not sent twice
    c.input.dispatchEvent(new Event("change"));
    expect(onChange).toHaveBeenCalledTimes(1);

    const live = vi.fn();
    const o = buildControl({ name: "opacity", type: "float", min: 0, max: 1, step: 0.01 }, 0.5, { onChange: live, live: true });
    o.input.value = "0.25";
    o.input.dispatchEvent(new Event("input"));
    expect(live.mock.calls).toEqual([["opacity", 0.25]]);
  });

  it("set() updates the control without firing onChange; destroy() removes listeners", () => {
    const onChange = vi.fn();
    const c = buildControl(schema[0], 32, { onChange });
    c.set(200);
    expect(c.input.value).toBe("200");
    expect(c.readout.textContent).toBe("200");
    c.set(undefined);
    expect(c.input.value).toBe("32"); // default
    c.destroy();
    c.input.value = "8";
    c.input.dispatchEvent(new Event("change"));
    expect(onChange).not.toHaveBeenCalled();
  });

  it("gives unique ids to two instances of the same schema", () => {
    const a = buildControls(schema, {});
    const b = buildControls(schema, {});
    expect(a.controls.get("steps").input.id).not.toBe(b.controls.get("steps").input.id);
  });

  it("rejects an entry without a name", () => {
    expect(() => buildControl({ type: "int" })).toThrow(/needs a name/);
  });
});

describe("huge integer ranges", () => {
  it("use a number box, not a slider nobody can aim", async () => {
    const { buildControl } = await import("./controls.js");
    const c = buildControl({ name: "seed", type: "int", default: 0, min: 0, max: 2 ** 31 - 1, step: 1, help: "" }, 0, () => {});
    expect(c.el.querySelector("input").type).toBe("number");
    const s = buildControl({ name: "samples", type: "int", default: 25, min: 1, max: 500, step: 1, help: "" }, 25, () => {});
    expect(s.el.querySelector("input").type).toBe("range");
  });
});
