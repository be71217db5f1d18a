"""A ViT's last block computed only for the tokens its head reads.

With class-token pooling the head reads token 0 (and a distillation token) of the last block's output,
so that block's MLP and residual for the other tokens are dead work in the forward and the backward.
Attention still runs over every token: their keys and values are what the class token reads.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import nn

from .calls import call
from .hygiene import global_hooks, hooked
from .layers import core
from .speed import once_per_shape, same_logits

_FOUND: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class Tail(NamedTuple):
    block: nn.Module       # the last transformer block
    keep: int              # leading tokens of its output that the head reads


def dead_tokens(model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> Tail | None:
    """The last block and the tokens the head reads, checked once per model and input shape: a forward at
    x whose last block computes ``keep`` tokens and leaves the others NaN must give ``logits`` (the plain
    model's at x). One batch-1 forward per ``keep`` tried (1, then the model's prefix tokens)."""
    if x.ndim != 4 or not x.is_floating_point() or _unsafe(model):   # no pruning: nothing to check
        return None
    net = core(model)[1]
    # how the head pools is plain attributes (timm's global_pool), which the module ids do not show
    head = tuple(repr(getattr(net, a, None)) for a in ("global_pool", "pool_include_prefix", "num_prefix_tokens"))
    return once_per_shape(_FOUND, model, x, lambda: _probe(model, x[:1].detach(), logits[:1]), head)


def _last_block(model: nn.Module) -> nn.Module | None:
    """The last module whose forward is exactly timm's ViT ``Block.forward`` (the code ``pruned`` mirrors)."""
    try:
        from timm.models.vision_transformer import Block
    except ImportError:
        return None
    found = [m for m in model.modules() if isinstance(m, Block) and type(m).forward is Block.forward]
    return found[-1] if found else None


def _probe(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> Tail | None:
    block = _last_block(model)
    if block is None:
        return None
    for keep in _candidates(core(model)[1]):
        try:
            with torch.no_grad(), pruned(model, Tail(block, keep), poison=True) as active:
                got = call(model, x)
        except Exception:   # noqa: BLE001 - any failure means "not safe"; the real pass reports its own errors
            return None
        if active and same_logits(got, ref):
            return Tail(block, keep)
    return None


def _candidates(net: nn.Module) -> list[int]:
    """Token counts the head may read: the class token, then every prefix token (a distillation token;
    PiT declares no prefix count, but its class-token parameter holds both)."""
    prefix = getattr(net, "num_prefix_tokens", None)
    cls = getattr(net, "cls_token", None)
    if not isinstance(prefix, int) and isinstance(cls, torch.Tensor) and cls.ndim == 3:
        prefix = cls.shape[1]
    return list(dict.fromkeys([1] + ([prefix] if isinstance(prefix, int) and prefix > 1 else [])))


def _unsafe(model: nn.Module) -> bool:
    """A hook may read the block's dead tokens (or any module after it): then the model runs whole."""
    return global_hooks() or any(hooked(m) for m in model.modules())


@contextmanager
def pruned(model: nn.Module, tail: Tail | None, poison: bool = False) -> Iterator[bool]:
    """The tail block computes its first ``keep`` tokens; the others pass through unchanged (NaN with
    ``poison``, so a probe sees whether anything reads them). Yields whether it is pruned."""
    if tail is None or "forward" in tail.block.__dict__ or _unsafe(model):
        yield False
        return
    block, keep = tail

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:   # timm's Block.forward, on `keep` rows
        if x.ndim != 3 or x.shape[1] <= keep:
            return type(block).forward(block, x, *args, **kwargs)
        attended = block.attn(block.norm1(x), *args, **kwargs)[:, :keep]
        h = x[:, :keep] + block.drop_path1(block.ls1(attended))
        h = h + block.drop_path2(block.ls2(block.mlp(block.norm2(h))))
        rest = torch.full_like(x[:, keep:], float("nan")) if poison else x[:, keep:].detach()
        return torch.cat([h, rest], 1)

    block.forward = forward
    try:
        yield True
    finally:
        block.__dict__.pop("forward", None)
