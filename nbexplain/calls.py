"""Calling the user's model: the eager module behind a compiled one, inputs in its dtype, logits out."""
from __future__ import annotations

from collections.abc import Mapping

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
                    "wrap the model so its forward returns the logits, e.g. lambda x: model(x)['scores']")
