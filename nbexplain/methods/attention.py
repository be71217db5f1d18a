"""ViT attention maps: raw attention, attention rollout and gradient-weighted rollout."""
from __future__ import annotations

import torch

from ..context import Context
from ..layers import TokenLayout, core, token_layout
from . import Param, register

FUSIONS = ("mean", "max", "min")
_BLOCK = Param("block", "int", -1, "transformer block (-1: the last)", -64, 63, 1, model_range=True)
_HEAD = Param("head", "int", -1, "attention head (-1: fuse all heads)", -1, 63, 1, model_range=True)
_FUSION = Param("fusion", "choice", "mean", "how heads are fused", choices=FUSIONS)
_DISCARD = Param("discard_ratio", "float", 0.9, "share of the weakest attention links dropped per block "
                 "(keeps the class token)", 0.0, 0.99, 0.01)


def fuse(attn: torch.Tensor, fusion: str) -> torch.Tensor:
    """(N,heads,T,T) -> (N,T,T)."""
    return {"mean": attn.mean(1), "max": attn.amax(1), "min": attn.amin(1)}[fusion]


# attention modules whose softmax scores keys once per pixel of a patch (MobileViT-v2): (N, 1, pixels, patches),
# square where a patch has as many pixels as the grid has patches, yet never a token-to-token matrix
_SEPARABLE = ("LinearSelfAttention",)


def reading(ctx: Context, a: torch.Tensor, name: str) -> TokenLayout | str:
    """How block ``name``'s attention (N, heads, queries, keys) lies on the patch grid, or why it does not.

    Global self-attention over [prefix tokens, patches] reads directly; so does class attention
    (CaiT, XCiT: only the prefix tokens query). Windowed (Swin, MaxViT), channel (XCiT),
    sub-sampled (Twins) and separable (MobileViT-v2) attention do not.
    """
    n, hw = len(ctx.x), tuple(ctx.x.shape[2:])
    if type(ctx.model.get_submodule(name)).__name__ in _SEPARABLE:
        return (f"{a.shape[-2]} rows of scores over {a.shape[-1]} key{'s' * (a.shape[-1] != 1)}, not a "
                "token-to-token matrix (separable linear attention)")
    if a.ndim != 4:
        return f"a {a.ndim}-d attention tensor {tuple(a.shape)} (grouped attention)"
    if a.shape[0] != n:
        return (f"attention within {a.shape[0] / n:g} windows per image of {a.shape[-1]} tokens each "
                "(windowed attention)")
    layout = token_layout(ctx.model, a.shape[-1], hw)
    if layout is None:
        return (f"attention over {a.shape[-1]} keys that are not patches of the {hw[0]}x{hw[1]} input "
                "(channel attention or pooled tokens)")
    if a.shape[2] != a.shape[3] and a.shape[2] > layout.prefix:
        return f"{a.shape[2]} queries over {a.shape[3]} keys (sub-sampled keys)"
    return layout


def to_patches(ctx: Context, rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Attention rows (N, queries, keys) -> the patches as seen by what the classifier reads.

    With class-token pooling that is the class token's row (also the only row of class attention);
    otherwise (no class token, average or attention pooling) the mean of the patch tokens' rows.
    Prefix tokens are not always a class token: register tokens come first too.
    """
    p = layout.prefix
    net = core(ctx.model)[1]
    reads_cls = getattr(net, "cls_token", True) is not None and getattr(net, "global_pool", "token") == "token"
    class_rows = rows.shape[1] < rows.shape[2]
    source = rows[:, 0] if p > 0 and (reads_cls or class_rows) else rows[:, p:].mean(1)
    return layout.patches(source).reshape(len(rows), *layout.grid)


def readings(ctx: Context, method: str, maps: list[torch.Tensor], names: list[str]) -> list[TokenLayout]:
    """The patch-grid reading of every block, or an error naming the first block without one."""
    found = [reading(ctx, a, name) for a, name in zip(maps, names)]
    for i, got in enumerate(found):
        if isinstance(got, str):
            raise ValueError(f"{method}: rollout multiplies the attention of every block, but block {i} "
                             f"({names[i]}) has {got}. {_instead(found)}")
    grids = {got.grid for got in found}
    if len(grids) > 1 or len({got.prefix for got in found} - {0}) > 1:
        spans = ", ".join(f"{g[0]}x{g[1]} at {_spans([i for i, f in enumerate(found) if f.grid == g])}"
                          for g in dict.fromkeys(f.grid for f in found))
        raise ValueError(f"{method}: the blocks attend over different token sets ({spans}): the model pools "
                         f"its tokens, so their attention cannot be multiplied through. {_instead(found)}")
    return found


def positive(ctx: Context, method: str, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The attention weights, which a softmax makes non-negative, unless the heads are mixed after it
    (CaiT's talking heads): then the negative weights are clipped, and a warning says so."""
    if not any(bool((a < 0).any()) for a in maps):
        return maps
    ctx.warn(f"{method}: this model mixes its heads after the softmax (talking-heads attention, as in CaiT), so "
             "some attention weights are negative; the map shows the positive ones", stacklevel=4)
    return [a.clamp(min=0) for a in maps]


def _instead(found: list) -> str:
    ok = [i for i, f in enumerate(found) if not isinstance(f, str)]
    where = f"Use 'attention' at a block that lies on the grid ({_spans(ok)}), or " if ok else "Use "
    return where + "'gradcam' or 'integrated_gradients', which work on any model"


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> 'blocks 0-2, 5'; [3] -> 'block 3'."""
    out, start = [], None
    for k, i in enumerate(indices):
        start = i if start is None else start
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ("block " if out == [str(indices[0])] else "blocks ") + ", ".join(out)


def rollout(fused: list[torch.Tensor], layouts: list[TokenLayout], discard_ratio: float
            ) -> tuple[torch.Tensor, TokenLayout]:
    """Abnar & Zuidema's rollout: (A + I)/2, row-normalised, multiplied through the blocks.

    A block that updates only some tokens is the identity on the others: CaiT's early blocks
    attend among the patches before the class token exists, its class-attention blocks update only
    the class token.
    """
    full = max(layouts, key=lambda lay: lay.prefix)
    n, t = len(fused[0]), full.prefix + full.grid[0] * full.grid[1]
    eye = torch.eye(t, device=fused[0].device)
    result = eye.expand(n, t, t).clone()
    for a, lay in zip(fused, layouts):
        a = a.clone()
        if discard_ratio > 0:
            flat = a.view(n, -1)
            k = int(flat.shape[1] * discard_ratio)
            drop = flat.topk(k, dim=1, largest=False).indices
            keep_cls = drop != 0                       # never drop the class token's self-link
            flat.scatter_(1, drop, flat.gather(1, drop) * ~keep_cls)
        off = full.prefix - lay.prefix
        block = eye.expand(n, t, t).clone()
        block[:, off:off + a.shape[1], off:] = a
        block = (block + eye) / 2
        block = block / block.sum(-1, keepdim=True)
        result = block @ result
    return result, full


@register("attention", kind="attention", signed=False, vit_only=True, params=(_BLOCK, _HEAD, _FUSION),
          summary="Raw attention from the class token to the patches at one block (one head or fused).",
          reference="Dosovitskiy et al. 2021")
def attention(ctx: Context, block: int, head: int, fusion: str) -> torch.Tensor:
    maps, _, names = ctx.attention()
    if not -len(maps) <= block < len(maps):
        raise ValueError(f"attention: block={block} out of range; the model has {len(maps)} blocks "
                         f"(0..{len(maps) - 1}, or -1..-{len(maps)} counting from the last)")
    i = block % len(maps)
    a = positive(ctx, "attention", [maps[i]])[0]
    layout = reading(ctx, a, names[i])
    if isinstance(layout, str):
        raise ValueError(f"attention: block {i} ({names[i]}) has {layout}, which does not lie on the patch "
                         f"grid. {_instead([reading(ctx, m, n) for m, n in zip(maps, names)])}")
    if not -1 <= head < a.shape[1]:
        raise ValueError(f"attention: head={head} out of range; block {block} has {a.shape[1]} heads "
                         "(0..{}, or -1 to fuse them)".format(a.shape[1] - 1))
    ctx.meta["layer"] = f"block {i}"
    return to_patches(ctx, a[:, head] if head >= 0 else fuse(a, fusion), layout)


@register("attention_rollout", kind="attention", signed=False, vit_only=True, params=(_FUSION, _DISCARD),
          summary="Attention propagated through all blocks, with the residual path (class-agnostic).",
          reference="Abnar & Zuidema 2020")
def attention_rollout(ctx: Context, fusion: str, discard_ratio: float) -> torch.Tensor:
    maps, _, names = ctx.attention()
    layouts = readings(ctx, "attention_rollout", maps, names)
    return to_patches(ctx, *rollout([fuse(a, fusion) for a in positive(ctx, "attention_rollout", maps)],
                                    layouts, discard_ratio))


@register("grad_rollout", kind="attention", signed=False, vit_only=True, params=(_DISCARD,),
          summary="Rollout of attention weighted by its positive gradient for the target class "
                  "(class-specific).", reference="Gildenblat, vit-explain; after Chefer et al. 2021")
def grad_rollout(ctx: Context, discard_ratio: float) -> torch.Tensor:
    maps, grads, names = ctx.attention(gradients=True)
    layouts = readings(ctx, "grad_rollout", maps, names)
    weighted = [(a * g).mean(1).clamp(min=0) for a, g in zip(maps, grads)]
    return to_patches(ctx, *rollout(weighted, layouts, discard_ratio))
