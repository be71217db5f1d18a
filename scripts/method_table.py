"""Print the README's method table from the registry (a test keeps the README in sync)."""
from __future__ import annotations


def method_table() -> str:
    from nbexplain.methods import REGISTRY
    rows = ["| method | what it shows | needs | parameters (default) |", "|---|---|---|---|"]
    for m in REGISTRY.values():
        needs = ", ".join(n for n, flag in (("a layer", m.needs_layer), ("a ViT", m.vit_only)) if flag) or "—"
        params = ", ".join(f"`{p.name}` ({p.default!r})" for p in m.params) or "—"
        summary = m.summary.replace("|", "\\|")
        rows.append(f"| `{m.name}` | {summary} ({m.reference}) | {needs} | {params} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(method_table())
