"""Find the layers a CAM method can use, and read ViT token layouts from the model's own geometry."""
from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ._errors import unknown
from .calls import size_hint
from .hygiene import borrowed, forward_hooks, model_device, model_dtype, module_set, modules_of

_SKIP = (nn.Dropout, nn.Identity)
_SEQUENCES = ("blocks", "layers", "stages", "features")


@dataclass(frozen=True)
class Layer:
    """A layer whose output can be read as a spatial map."""

    name: str
    kind: str                 # "conv": (N,C,h,w) output; "tokens": (N,T,C) reshaped to the patch grid
    grid: tuple[int, int]
    channels: int
    depth: int                # position in execution order
    module_type: str

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "grid": list(self.grid), "channels": self.channels,
                "depth": self.depth, "type": self.module_type}


UNCHECKED = "unchecked"        # a Layer's kind when named by the user and not probed yet (``checked``)
_MAX_PREFIX = 16              # class, distillation and register tokens before the patches


@dataclass(frozen=True)
class TokenLayout:
    prefix: int               # class/register/distillation tokens before the patches
    grid: tuple[int, int]
    # the token at each grid cell, row-major, when they are not in raster order
    order: torch.Tensor | None = field(default=None, compare=False)

    def patches(self, t: torch.Tensor) -> torch.Tensor:
        """The patch tokens of (N, T, ...) in raster order: (N, h*w, ...)."""
        t = t[:, self.prefix:]
        return t if self.order is None else t.index_select(1, self.order.to(t.device))


def core(model: nn.Module) -> tuple[str, nn.Module]:
    """The network inside single-child wrappers (a LightningModule's ``self.model``, a module that adds
    a softmax or returns a tuple), with its name prefix: layer roles and ViT geometry are read there."""
    prefix = ""
    while not any(p is not None for p in model._parameters.values()):
        owners = [(n, c) for n, c in model.named_children() if next(c.parameters(), None) is not None]
        if len(owners) != 1 or next(owners[0][1].children(), None) is None:
            break          # several parts, or the one that has parameters is a single layer, not a network
        name, model = owners[0]
        prefix += name + "."
    return prefix, model


def token_layout(model: nn.Module, num_tokens: int, input_hw: tuple[int, int]) -> TokenLayout | None:
    """How (N,T,C) tokens map onto the patch grid: from the model's attributes, else inferred."""
    model = core(model)[1]
    rolled = _unrolled(model, num_tokens)
    if rolled is not None:
        return rolled
    grid = _patch_grid(model, input_hw)
    declared = getattr(model, "num_prefix_tokens", None)
    if grid is not None:
        prefix = declared if declared is not None else num_tokens - grid[0] * grid[1]
        if 0 <= prefix <= _MAX_PREFIX and num_tokens == prefix + grid[0] * grid[1]:
            return TokenLayout(int(prefix), (int(grid[0]), int(grid[1])))
        if num_tokens == grid[0] * grid[1]:               # before the prefix tokens are added
            return TokenLayout(0, (int(grid[0]), int(grid[1])))
    # a model that declares its prefix tokens has no others: 32 channels of XCiT's channel attention
    # must not read as 16 "prefix" tokens and a 4x4 grid
    if declared is not None:
        return _infer_layout(num_tokens, input_hw, (declared, 0))
    found = _infer_layout(num_tokens, input_hw, range(_MAX_PREFIX + 1))
    # an inferred patch size must be one the model's patchify convs (kernel = stride) can make: CrossViT
    # resizes one stream to 224 whatever the input, and its 1 + 14x14 tokens fit "5 + 12x16" at a 96x128
    # input, a patch of 8 that no conv of the model has
    strides = _patchify_strides(model)
    if found is not None and strides and not any((input_hw[0] // found.grid[0]) % s == 0 for s in strides):
        return None
    return found


_STRIDES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _patchify_strides(model: nn.Module) -> set[int]:
    """Strides of the square convs whose kernel equals their stride (patch embeddings), once per model
    and set of submodules (a patch embedding swapped for another is seen)."""
    key = module_set(model)
    if _STRIDES.get(model, (None,))[0] != key:
        _STRIDES[model] = key, {m.stride[0] for m in modules_of(model) if isinstance(m, nn.Conv2d)
                                and m.kernel_size == m.stride and m.stride[0] == m.stride[1] and m.stride[0] > 1}
    return _STRIDES[model][1]


_UNROLLED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _unrolled(model: nn.Module, num_tokens: int) -> TokenLayout | None:
    """Hiera keeps its tokens "unrolled" (each mask unit's tokens together) until its last stage: its
    own ``reroll`` module, applied to the token indices, says which token sits at each grid cell.
    Memoised per reroll module and token count (one per stage): every CAM capture asks."""
    reroll = getattr(model, "reroll", None)
    schedule = getattr(reroll, "schedule", None)
    if not isinstance(schedule, dict) or not callable(reroll):
        return None
    known = _UNROLLED.setdefault(reroll, {})
    if num_tokens not in known:
        known[num_tokens] = next((_rerolled(reroll, block, size, num_tokens) for block, (_, size)
                                  in schedule.items() if len(size) == 2 and size[0] * size[1] == num_tokens), None)
    return known[num_tokens]


def _rerolled(reroll: nn.Module, block: int, size, num_tokens: int) -> TokenLayout:
    cells = reroll(torch.arange(num_tokens).view(1, num_tokens, 1), block).flatten()     # (1, h, w, 1)
    in_order = bool((cells == torch.arange(num_tokens)).all())
    return TokenLayout(0, (int(size[0]), int(size[1])), None if in_order else cells)


def _patch_grid(model: nn.Module, input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid for this input size, from the patch embedding (timm's, or one with the same names)."""
    pe = getattr(model, "patch_embed", None)
    if callable(getattr(pe, "dynamic_feat_size", None)):
        return tuple(int(g) for g in pe.dynamic_feat_size(input_hw))
    grid, img = getattr(pe, "grid_size", None), getattr(pe, "img_size", None)
    if grid is not None and img is not None and _pair(img) == tuple(input_hw):
        return _pair(grid)                      # strided or overlapping embeddings (PiT: 27x27 at 224)
    patch = getattr(pe, "patch_size", None) or getattr(model, "patch_size", None)
    if patch is not None:
        ph, pw = _pair(patch)
        return input_hw[0] // ph, input_hw[1] // pw     # follows the actual input size (dynamic img size)
    return _pair(grid) if grid is not None else None


def grid_extent(model: nn.Module, grid: tuple[int, int], input_hw: tuple[int, int]) -> tuple[int, int] | None:
    """The pixels, from the top-left corner, that a ViT's patch grid covers when they are not the input's.

    A dynamic-size ViT pads the input on the bottom and right up to whole patches (timm's
    ``dynamic_img_pad``; a plain strided conv drops the remainder instead): the grid must be laid over
    that extent, not stretched over the image, or each cell drifts by up to one patch.
    """
    model = core(model)[1]
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if patch is None or tuple(grid) != _patch_grid(model, input_hw):
        return None
    patch = _pair(patch)
    proj = getattr(pe, "proj", None)
    if isinstance(proj, nn.Conv2d) and (tuple(proj.kernel_size) != patch or tuple(proj.stride) != patch):
        return None                       # overlapping or hierarchical embeddings (PiT): the grid spans the image
    extent = (grid[0] * patch[0], grid[1] * patch[1])
    return None if extent == tuple(input_hw) else extent


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _infer_layout(num_tokens: int, input_hw: tuple[int, int], prefixes) -> TokenLayout | None:
    """A grid with the input's aspect ratio and an integer patch size, after one of ``prefixes`` tokens
    (a coarser grid of a hierarchical model's later stage, e.g. Swin's 7x7)."""
    h, w = input_hw
    for prefix in prefixes:
        n = num_tokens - prefix
        for patch in range(1, max(h, w) + 1):
            if h % patch == 0 and w % patch == 0 and (h // patch) * (w // patch) == n and n > 1:
                return TokenLayout(prefix, (h // patch, w // patch))
    return None


def as_spatial(t: torch.Tensor, layout: TokenLayout | None) -> torch.Tensor | None:
    """(N,C,h,w) view of a layer output, or None when it has no spatial reading."""
    if t.ndim == 4 and t.shape[2] * t.shape[3] > 1:
        return t
    if t.ndim == 3 and layout is not None and t.shape[1] == layout.prefix + layout.grid[0] * layout.grid[1]:
        n, _, c = t.shape
        return layout.patches(t).reshape(n, *layout.grid, c).permute(0, 3, 1, 2)
    return None


_CHANNELS_FIRST = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d,
                   nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def channels_first(module: nn.Module, t: torch.Tensor, model: nn.Module | None = None,
                   input_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """NCHW view of a 4-D module output. timm marks channels-last outputs with ``output_fmt='NHWC'``:
    on a module (a dynamic-size ViT's patch embedding) or on the whole model (Swin, MambaOut), whose
    stages and blocks then run channels last; convolutions, BatchNorm and pooling stay NCHW. Without a
    mark, an output whose middle two dimensions are a grid on the ``input_hw`` image and whose last two
    are not is channels last too (VOLO's stages)."""
    if t.ndim != 4:
        return t
    fmt = getattr(module, "output_fmt", None)
    if fmt is None and model is not None and not isinstance(module, _CHANNELS_FIRST):
        fmt = getattr(model, "output_fmt", None)
    if fmt is None and input_hw is not None and not isinstance(module, _CHANNELS_FIRST):
        fmt = "NHWC" if _on_image(tuple(t.shape[1:3]), input_hw) and not _on_image(tuple(t.shape[2:]), input_hw) \
            else None
    if getattr(fmt, "value", fmt) == "NHWC":
        return t.permute(0, 3, 1, 2)
    return t


def first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()


def discover(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer]:
    """Every module with a spatial output, in execution order (one probe forward, memoised)."""
    return _probe(model, input_shape)[0]


def spatial_layers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Layer]:
    """Every module with a spatial output by name, including those folded into a container's entry."""
    return _probe(model, input_shape)[1]


def output_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple]:
    """Every module's output shape (channels first) at one image of this size, spatial or not."""
    return _probe(model, input_shape)[2]


def _probe(model: nn.Module, input_shape: tuple[int, ...]
           ) -> tuple[list[Layer], dict[str, Layer], dict[str, tuple]]:
    key = tuple(input_shape[1:])
    per_model = _CACHE.setdefault(model, OrderedDict())
    if key in per_model:
        return per_model[key]
    names = {m: n for n, m in model.named_modules() if n}
    hw = tuple(input_shape[2:])
    seen: list[tuple[str, nn.Module, tuple, bool, bool]] = []
    previous: list[torch.Tensor] = []        # a container's hook fires right after its last child's

    def record(module, _inp, out):
        t = first_tensor(out)
        if t is not None and module in names:
            seen.append((names[module], module, tuple(channels_first(module, t, model, hw).shape),
                         bool(previous) and previous[0] is t, t.requires_grad))
            previous[:] = [t]

    # One image, tracked by autograd: an output whose first dimension is not 1 is not a map per image
    # (MobileViT's transformers fold the patch positions into it, (N*4, tokens, C)), nor is one that does
    # not depend on the image (a per-model constant). The clone lets a model edit its input in place.
    x = torch.zeros((1, *input_shape[1:]), device=model_device(model), dtype=model_dtype(model))
    tracked = x.is_floating_point()
    x = x.requires_grad_(tracked).clone()
    with borrowed(model), torch.enable_grad(), forward_hooks((m, record) for m in names), size_hint(x):
        model(x)
    _add_skipped_containers(seen, names)
    # a model that cuts the graph itself (no_grad in its forward) tells nothing by it
    tracked = tracked and any(entry[4] for entry in seen)
    layers: list[Layer] = []
    by_name: dict[str, Layer] = {}
    shapes = {entry[0]: entry[2] for entry in seen}
    for name, module, shape, same_as_previous, depends in seen:
        layer = reading(model, name, module, shape, (1, *input_shape[1:]), len(layers))
        if layer is None or (tracked and not depends):
            continue
        by_name[name] = layer
        if same_as_previous and layers and layers[-1].name.startswith(name + "."):
            # a container that returns its last child's output: one entry, under the more telling name
            if name.split(".")[-1] not in _SEQUENCES:
                layers[-1] = Layer(name, layer.kind, layer.grid, layer.channels, layers[-1].depth,
                                   layer.module_type)
        else:
            layers.append(layer)
    per_model[key] = (layers, by_name, shapes)
    while len(per_model) > 4:                      # bounded: a few input sizes per model
        per_model.popitem(last=False)
    return layers, by_name, shapes


def _add_skipped_containers(seen: list, names: dict) -> None:
    """Entries for the plain Sequentials that did not run because the model called their children one by one
    (timm's gradient checkpointing): each gives its last child's output, so it is listed right after it."""
    ran = {entry[0] for entry in seen}
    skipped = [(n, m) for m, n in names.items() if n not in ran and output_module(m) is not m]
    for name, module in sorted(skipped, key=lambda nm: -nm[0].count(".")):     # inner containers first
        inside = [i for i, entry in enumerate(seen) if entry[0].startswith(name + ".")]
        if not inside or seen[inside[-1]][0] != names.get(output_module(module)):
            continue                                # its last child did not run last either
        _, _, shape, _, depends = seen[inside[-1]]
        seen.insert(inside[-1] + 1, (name, module, shape, True, depends))


def output_module(module: nn.Module) -> nn.Module:
    """The module whose output is ``module``'s: a plain ``nn.Sequential`` returns its last child's output,
    and a model may call those children without the container (timm's gradient checkpointing runs a
    ResNet's blocks one by one), so the hook goes on the last child. Not past a container that carries
    a hook of the user's: it may change what the container returns."""
    while type(module).forward is nn.Sequential.forward and len(module) > 0 and not module._forward_hooks:
        module = module[-1]
    return module


def reading(model: nn.Module, name: str, module: nn.Module, shape: tuple, input_shape: tuple[int, ...],
            depth: int = -1) -> Layer | None:
    """The Layer for a module output of ``shape`` (channels first) at an input of ``input_shape``, or None
    when it is no map of each image: not spatial, its first dimension not the batch, or not on the image."""
    if shape[0] != input_shape[0]:
        return None
    hw = tuple(input_shape[2:])
    layout = token_layout(model, shape[1], hw) if len(shape) == 3 else None
    spatial = as_spatial(torch.empty(shape, device="meta"), layout)
    if spatial is None or isinstance(module, _SKIP) or not _on_image(spatial.shape[2:], hw):
        return None
    return Layer(name, "tokens" if len(shape) == 3 else "conv", tuple(spatial.shape[2:]), int(spatial.shape[1]),
                 depth, type(module).__name__)


def _on_image(grid: tuple[int, int], input_hw: tuple[int, int]) -> bool:
    """A feature map of the image keeps its aspect ratio (up to rounding); a 4-d tensor that is something
    else, e.g. CoaT's per-head position terms (N, heads, tokens, channels), does not."""
    (h, w), (height, width) = grid, input_hw
    if h > height or w > width:
        return False
    if abs(w - width * h / height) <= 1 + 0.1 * w:
        return True
    # a side of a few cells is mostly rounding (a 7x500 input is 2x125 at stride 4): one stride must give
    # both sides, each within one cell
    most = lambda side, cells: side / (cells - 1) if cells > 1 else float("inf")   # noqa: E731 - ceil-rounded
    return max(height / (h + 1), width / (w + 1)) <= min(most(height, h), most(width, w))


def candidates(model: nn.Module, input_shape: tuple[int, ...], all_layers: bool = False) -> list[Layer]:
    """Block-level layers (containers, top-level modules, ViT blocks' norm1), or every spatial one."""
    layers = discover(model, input_shape)
    if all_layers:
        return layers
    prefix = core(model)[0]
    inner = [layer for layer in layers if layer.name.startswith(prefix)]
    keep = [layer for layer in inner if _block_level(layer.name[len(prefix):], layer.kind)]
    if not keep and inner:
        # an unusual naming scheme: the shallowest spatial modules are the blocks
        top = min(layer.name.count(".") for layer in inner)
        keep = [layer for layer in inner if layer.name.count(".") == top]
    return keep


def _block_level(name: str, kind: str) -> bool:
    """Stem/head modules, numbered blocks and their stages, not the parts inside a block."""
    parts = name.split(".")
    inside_block = any(p.isdigit() for p in parts[:-1])
    if kind == "tokens" and parts[-1] == "norm1":
        return True                          # the usual ViT CAM layer (input of the block's attention)
    if inside_block:
        return False
    # named children of a top-level sequence count as blocks too (DenseNet: features.denseblock1)
    return len(parts) == 1 or parts[-1].isdigit() or parts[-1] in _SEQUENCES or \
        (len(parts) == 2 and parts[0] in _SEQUENCES)


def default_layer(model: nn.Module, input_shape: tuple[int, ...]) -> Layer:
    """A sensible layer for CAMs: the last one whose grid is still at least 7 cells on its short side, if
    any is (the last stage at 224 px; an earlier stage for small inputs where the last one is 2x2).

    CNNs: among the block-level layers. ViTs: with class-token pooling the last block's patch tokens get
    no gradient, so among the blocks' ``norm1``; hierarchical token models (PVT, DaViT) have stages of
    shrinking grids like a CNN's, where the rule picks the stage as it does there.
    """
    layers = candidates(model, input_shape)
    if not layers:
        raise ValueError("layer: this model has no layer with a spatial output (no (N,C,h,w) feature map "
                         "and no ViT patch tokens); use a pixel method such as 'integrated_gradients'")
    convs = [layer for layer in layers if layer.kind == "conv" and layer.depth > 0]
    tokens = [layer for layer in layers if layer.kind == "tokens"]
    if tokens and len(tokens) >= len(convs):
        norms = [layer for layer in tokens if layer.name.endswith(".norm1")]
        pool = getattr(core(model)[1], "global_pool", "token")
        pick = norms if norms and pool == "token" else \
            [layer for layer in tokens if not layer.name.endswith(".norm1")
             and layer.name != "norm" and "patch_embed" not in layer.name] or tokens
    else:
        pick = convs or layers
    big = [layer for layer in pick if min(layer.grid) >= 7]
    return (big or pick)[-1]


def checked(model: nn.Module, layer: Layer, module: nn.Module, shape: tuple, input_shape: tuple[int, ...]
            ) -> Layer:
    """``layer`` once its output's (channels-first) ``shape`` is seen: an unchecked name becomes its Layer,
    or the error ``resolve`` gives for a module without a map per image."""
    if layer.kind != UNCHECKED:
        return layer
    found = reading(model, layer.name, module, shape, input_shape)
    if found is None:
        resolve(model, input_shape, layer.name)     # probes, and raises the error that names the fix
        raise ValueError(f"layer {layer.name!r}: its output {tuple(shape)} is not a map per image at this "
                         f"input {tuple(input_shape)}; pick one of nbx.layers(model)")
    return found


def _why_no_map(model: nn.Module, input_shape: tuple[int, ...], name: str) -> str:
    """Why a module's output is no map of each image, for the error that names a better layer."""
    shape = output_shapes(model, input_shape).get(name)
    hw = "x".join(map(str, input_shape[2:]))
    if shape is not None and len(shape) == 4 and shape[0] == 1 and shape[2] * shape[3] == 1:
        # CIFAR-size inputs: a ResNet's last stage is 1x1, where a CAM is one value
        return (f" is a 1x1 grid at this {hw} input (output {shape}), so a CAM there is one value with nothing "
                "to localise (larger images keep a grid there)")
    got = "it did not run" if shape is None else f"its output at one image is {shape}"
    return (f" has no spatial output per image at this {hw} input ({got}: neither (N,C,h,w) maps nor ViT patch "
            "tokens with the batch first), so CAM methods cannot use it")


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The module at a dotted name from ``named_modules()``, or None: follows the path instead of walking
    the whole tree (a walk is ~0.3 ms on a mid-size net, and a call looks its layer up twice)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def layer_name(model: nn.Module, layer) -> str | None:
    """A layer given as a module of ``model`` (pytorch-grad-cam's ``model.layer4[-1]``) -> its name."""
    if not isinstance(layer, nn.Module):
        return layer
    name = next((n for n, m in model.named_modules() if m is layer), None)
    if name is None:
        raise ValueError(f"layer: the {type(layer).__name__} passed is not a module of this model (a copy, or "
                         "another model's?); pass one of its own modules or a name from nbx.layers(model)")
    if name == "":
        raise ValueError("layer: that is the whole model; pass one of its layers (nbx.layers(model) lists them)")
    return name


def resolve(model: nn.Module, input_shape: tuple[int, ...], layer: str | Layer | None, lazy: bool = False
            ) -> Layer:
    """The Layer for a user's name (or the default), with a close-match hint when it is wrong. ``lazy``: a
    module's name, before any probe at this input size, gives an UNCHECKED Layer (see ``checked``)."""
    if isinstance(layer, Layer):
        return layer
    if layer is None or layer == "":
        return default_layer(model, input_shape)
    if not isinstance(layer, str):
        raise TypeError(f"layer: expected a module name such as 'layer4', got {type(layer).__name__}")
    if lazy and tuple(input_shape[1:]) not in _CACHE.get(model, {}) and submodule(model, layer) is not None:
        # no probe forward for a named layer: the capture checks what it gets (``checked``)
        return Layer(layer, UNCHECKED, (0, 0), 0, -1, "")
    by_name = spatial_layers(model, input_shape)
    if layer in by_name:
        return by_name[layer]
    modules = dict(model.named_modules())
    if layer in modules:
        raise ValueError(f"layer {layer!r}{_why_no_map(model, input_shape, layer)}; pick one of nbx.layers(model), "
                         f"e.g. {default_layer(model, input_shape).name!r}")
    raise unknown("layer", layer, [x.name for x in candidates(model, input_shape)] or list(by_name))
