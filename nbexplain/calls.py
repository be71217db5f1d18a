"""Calling the user's model: the eager module behind a compiled one, inputs in its dtype, logits out."""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .hygiene import model_device, model_dtype


def eager(model: nn.Module) -> nn.Module:
    """The module behind ``torch.compile(model)``: explaining needs hooks and per-call module flags,
    which a compiled graph does not see (Dynamo asserts when hooks appear after compilation). The
    weights are the same objects, so the maps are the compiled model's."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def inputs_for(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.to(model_device(model), model_dtype(model, x.dtype))


_SHAPE_WORDS = ("size", "shape", "divisible", "dimension", "match")
_CHANNELS = re.compile(r"to have (\d+) channels, but got (\d+) channels")      # torch's conv message


def call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``x``, with ``size_hint``."""
    with size_hint(x):
        out = model(x)
    return logits_of(out)


@contextmanager
def size_hint(x: torch.Tensor) -> Iterator[None]:
    """A model failure that reads like a size mismatch (a ViT given a side its patches do not divide,
    say) keeps its type and message, plus a note with the fix: a tensor reaches the model as it is,
    where pictures are resized to the model's input size."""
    try:
        yield
    except (AssertionError, RuntimeError, ValueError, IndexError) as e:   # IndexError: MViTv2's position table
        channels = _CHANNELS.search(str(e))
        if channels and hasattr(e, "add_note"):
            want, got = channels.groups()
            e.add_note(f"nbexplain: the model's first layer takes {want} channels and the input has {got}. Pictures "
                       "get as many channels as the preprocessing's mean and std have values: pass preprocess="
                       f"nbx.Preprocess(..., mean=<{want} values>, std=<{want} values>), or a tensor with {want} channels.")
            raise
        if (not isinstance(e, torch.OutOfMemoryError) and hasattr(e, "add_note")
                and (any(w in str(e).lower() for w in _SHAPE_WORDS)
                     or (isinstance(e, AssertionError) and not str(e).strip()))):   # a bare shape assert
            e.add_note(f"nbexplain: the model failed on a batch of shape {tuple(x.shape)}. Pictures (paths, PIL "
                       "images, arrays) are resized to the model's data config; a timm model built for another "
                       "size (img_size=...) may still carry the default one: pass preprocess=nbx.Preprocess("
                       "size=(H, W), ...) with the size it was built for. A tensor reaches the model as it is: "
                       "pass one of a size the model accepts, or the pictures themselves.")
        raise


def logits_of(out) -> torch.Tensor:
    """Class scores from what a classifier returns: a tensor, Hugging Face's output object or dict
    (``.logits``), or a tuple whose first item is the scores."""
    if isinstance(out, torch.Tensor):
        return out
    found = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if found is None and isinstance(out, (tuple, list)) and out:
        found = out[0]
    if isinstance(found, torch.Tensor):
        return found
    raise TypeError(f"model: expected class scores (a tensor of shape (N, classes)), got {type(out).__name__}; "
                    "wrap the model in a small nn.Module whose forward returns the logits, e.g. model(x)['scores']")


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, classes) scores -> probabilities: softmax over the classes, or the sigmoid of a binary model's
    single logit (a softmax over one output is always 1)."""
    logits = logits.float()
    return logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)
