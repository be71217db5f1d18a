"""ViT attention maps: raw attention, attention rollout and gradient-weighted rollout."""
from __future__ import annotations

import torch

from ..context import Context
from . import Param, register

FUSIONS = ("mean", "max", "min")
_BLOCK = Param("block", "int", -1, "transformer block (-1: the last)", -64, 63, 1)
_HEAD = Param("head", "int", -1, "attention head (-1: fuse all heads)", -1, 63, 1)
_FUSION = Param("fusion", "choice", "mean", "how heads are fused", choices=FUSIONS)
_DISCARD = Param("discard_ratio", "float", 0.9, "share of the weakest attention links dropped per block "
                 "(keeps the class token)", 0.0, 0.99, 0.01)


def fuse(attn: torch.Tensor, fusion: str) -> torch.Tensor:
    """(N,heads,T,T) -> (N,T,T)."""
    return {"mean": attn.mean(1), "max": attn.amax(1), "min": attn.amin(1)}[fusion]


def to_patches(ctx: Context, rows: torch.Tensor) -> torch.Tensor:
    """Attention rows (N,T,T) -> the patches as seen by what the classifier reads.

    With class-token pooling that is the class token's row; otherwise (no class token, average or
    attention pooling) the mean of the patch tokens' rows. Prefix tokens are not always a class token:
    register tokens come first too (e.g. ``class_token=False, reg_tokens=4``).
    """
    layout = ctx.patch_layout(rows.shape[-1])
    p = layout.prefix
    reads_cls = getattr(ctx.model, "cls_token", True) is not None and \
        getattr(ctx.model, "global_pool", "token") == "token"
    source = rows[:, 0, p:] if p > 0 and reads_cls else rows[:, p:, p:].mean(1)
    return source.reshape(len(rows), *layout.grid)


def rollout(ctx: Context, fused: list[torch.Tensor], discard_ratio: float) -> torch.Tensor:
    """Abnar & Zuidema's rollout: (A + I)/2, row-normalised, multiplied through the blocks."""
    n, t, _ = fused[0].shape
    eye = torch.eye(t, device=fused[0].device)
    result = eye.expand(n, t, t).clone()
    for a in fused:
        a = a.clone()
        if discard_ratio > 0:
            flat = a.view(n, -1)
            k = int(flat.shape[1] * discard_ratio)
            drop = flat.topk(k, dim=1, largest=False).indices
            keep_cls = drop != 0                       # never drop the class token's self-link
            flat.scatter_(1, drop, flat.gather(1, drop) * ~keep_cls)
        a = (a + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result




@register("attention", kind="attention", signed=False, vit_only=True, params=(_BLOCK, _HEAD, _FUSION),
          summary="Raw attention from the class token to the patches at one block (one head or fused).",
          reference="Dosovitskiy et al. 2021")
def attention(ctx: Context, block: int, head: int, fusion: str) -> torch.Tensor:
    maps, _ = ctx.attention()
    if not -len(maps) <= block < len(maps):
        raise ValueError(f"attention: block={block} out of range; the model has {len(maps)} blocks "
                         f"(0..{len(maps) - 1}, or -1 for the last)")
    a = maps[block]
    if head >= a.shape[1]:
        raise ValueError(f"attention: head={head} out of range; block {block} has {a.shape[1]} heads "
                         "(0..{}, or -1 to fuse them)".format(a.shape[1] - 1))
    ctx.meta["layer"] = f"block {block % len(maps)}"
    return to_patches(ctx, a[:, head] if head >= 0 else fuse(a, fusion))


@register("attention_rollout", kind="attention", signed=False, vit_only=True, params=(_FUSION, _DISCARD),
          summary="Attention propagated through all blocks, with the residual path (class-agnostic).",
          reference="Abnar & Zuidema 2020")
def attention_rollout(ctx: Context, fusion: str, discard_ratio: float) -> torch.Tensor:
    maps, _ = ctx.attention()
    return to_patches(ctx, rollout(ctx, [fuse(a, fusion) for a in maps], discard_ratio))


@register("grad_rollout", kind="attention", signed=False, vit_only=True, params=(_DISCARD,),
          summary="Rollout of attention weighted by its positive gradient for the target class "
                  "(class-specific).", reference="Gildenblat, vit-explain; after Chefer et al. 2021")
def grad_rollout(ctx: Context, discard_ratio: float) -> torch.Tensor:
    maps, grads = ctx.attention(gradients=True)
    weighted = [(a * g).mean(1).clamp(min=0) for a, g in zip(maps, grads)]
    return to_patches(ctx, rollout(ctx, weighted, discard_ratio))
