"""Provenance export and replay: PNG (text chunks), NPZ, JSON, self-contained HTML; nbx.replay()."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .attribution import Attribution
from .render import overlay

FORMAT = "nbexplain/attribution@1"


def _encode_png(rgb: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_itxt(k, v)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def provenance(exp: Attribution) -> dict:
    """Everything needed to recompute ``exp``: model identity, preprocessing, method, parameters, target."""
    return _jsonable({"format": FORMAT, **exp.meta, "probs": exp.probs})


def to_json(exp: Attribution, include_input: bool = True) -> str:
    """Provenance plus the input (original pixels as PNG) so that nbx.replay can recompute the map."""
    doc = provenance(exp)
    doc["map_shape"] = list(exp.map.shape)
    if exp.tensors:                       # a custom baseline: replay needs its values, not only its hash
        doc["tensors"] = {k: _npy(t) for k, t in exp.tensors.items()}
    if include_input:
        if exp.meta.get("crop_box") is not None and exp.image is not None:
            doc["input"] = {"kind": "image/png", "data": base64.b64encode(_encode_png(exp.image)).decode()}
        elif exp.input is not None:
            doc["input"] = _npy(exp.input)
    return json.dumps(doc)


def _npy(t: torch.Tensor) -> dict:
    buf = io.BytesIO()
    np.save(buf, t.numpy())
    return {"kind": "tensor/npy", "data": base64.b64encode(buf.getvalue()).decode()}


def _from_npy(entry: dict) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(base64.b64decode(entry["data"]))))


VIEW_SETTINGS = ("opacity", "colormap", "sign", "clip")     # overlay()'s, for the drawn formats


def save(exp: Attribution, path: str | os.PathLike, **view: Any) -> str:
    """Write ``exp`` by extension: .png overlay (+ provenance text chunk), .npz, .json, .html report."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    unknown = sorted(set(view) - set(VIEW_SETTINGS))
    if unknown:          # .json and .npz draw nothing, but a typo there is a typo all the same
        raise TypeError(f"save: unexpected keyword {unknown[0]!r}; the view settings are "
                        f"{', '.join(VIEW_SETTINGS)}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"save: {path!r} is a folder; pass a file name in it ending in .png, .npz, .json "
                                "or .html")
    # the content is made before the file is opened: a bad setting leaves no empty file behind
    if ext == ".json":
        content = to_json(exp).encode()
    elif ext == ".npz":
        buf = io.BytesIO()                    # a path would get ".npz" appended unless it ends in lower case
        np.savez_compressed(buf, map=exp.map, raw=exp.raw.numpy(), provenance=json.dumps(provenance(exp)))
        content = buf.getvalue()
    elif ext == ".png":
        content = _encode_png(_overlay(exp, **view), {"nbexplain": json.dumps(provenance(exp))})
    elif ext in (".html", ".htm"):
        content = report_html(exp, **view).encode("utf-8")
    else:
        raise ValueError(f"save: unknown file type {ext!r}; use .png, .npz, .json or .html")
    with open(path, "wb") as f:
        f.write(content)
    return path


def _overlay(exp: Attribution, **view: Any) -> np.ndarray:
    image = exp.image if exp.image is not None else np.zeros((*exp.map.shape, 3), np.uint8)
    return overlay(image, exp.shown(), signed_method=exp.signed, **view)


def report_html(exp: Attribution, **view: Any) -> str:
    """A static, offline, self-contained page: overlay, original, and the provenance table (all escaped)."""
    e = lambda v: html.escape(str(v), quote=True)  # noqa: E731
    png = base64.b64encode(_encode_png(_overlay(exp, **view))).decode()
    orig = base64.b64encode(_encode_png(exp.image)).decode() if exp.image is not None else ""
    meta = provenance(exp)
    rows = "".join(f"<tr><th>{e(k)}</th><td><code>{e(json.dumps(v) if not isinstance(v, str) else v)}</code>"
                   f"</td></tr>" for k, v in meta.items())
    probs = "".join(f"<li>{e(label)} ({e(i)}): {p:.3f}</li>" for i, label, p in exp.probs)
    title = f"{exp.method} for {exp.label or exp.target}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nbexplain: {e(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#222}}img{{max-width:45%;margin-right:1em;
image-rendering:auto}}table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:4px 8px;
text-align:left;vertical-align:top}}code{{white-space:pre-wrap;word-break:break-all}}</style></head>
<body><h1>{e(title)}</h1>
<p><img alt="attribution overlay" src="data:image/png;base64,{png}">
{f'<img alt="input image" src="data:image/png;base64,{orig}">' if orig else ''}</p>
<h2>Top predictions</h2><ul>{probs}</ul>
<h2>Provenance</h2><table>{rows}</table></body></html>"""


def replay(doc: str | dict | os.PathLike, model: torch.nn.Module, image: Any = None,
           **tensors: torch.Tensor) -> Attribution:
    """Recompute an exported attribution from its JSON text, dict, or file (.json, or the provenance of a
    .png or .npz export; those carry no input: pass ``image=``) and the model; raises if the weights differ.

    A tensor parameter (a custom IG baseline) travels in a JSON export; from a PNG's or an npz's provenance,
    which keep only its hash, pass it again (``baseline=...``): it is checked against that hash."""
    from .api import attribute
    from .digest import weights_digest
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"replay: model must be the torch.nn.Module the attribution was computed with, got "
                        f"{type(model).__name__}")
    d = _document(doc)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"replay: not an nbexplain export (format {got!r}, expected {FORMAT!r})")
    missing = [k for k in ("weights_sha256", "method", "params", "target") if k not in d]
    if missing:
        raise ValueError(f"replay: the export lacks {', '.join(missing)}; pass a file written by nbx.save or to_json")
    if weights_digest(model) != d["weights_sha256"]:
        raise ValueError("replay: the model's weights differ from the exported ones (sha256 mismatch); "
                         "pass the model the attribution was computed with")
    _warn_if_other_code(d, model)
    if image is None and d.get("original_size"):
        warnings.warn("replay: this attribution was shrunk for display (explain_batch's max_side), so its export "
                      "carries the shrunk picture, and a map recomputed from it differs; pass image=<the original "
                      "picture> for the exact map", stacklevel=2)
    if image is None:
        if "input" not in d:
            raise ValueError("replay: the export carries no input; pass image=...")
        try:
            image = _from_npy(d["input"]) if d["input"]["kind"] == "tensor/npy" else \
                Image.open(io.BytesIO(base64.b64decode(d["input"]["data"]))).convert("RGB")
        except (KeyError, TypeError, ValueError, OSError, EOFError) as e:
            raise ValueError(f"replay: the export's input is corrupt ({type(e).__name__}: {e}); pass image=... "
                             "or export the attribution again") from None
    from .images import Preprocess
    try:
        pre = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["preprocess"].items()}) \
            if d.get("preprocess") else None
        params = dict(d["params"])
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"replay: the export's preprocess or params field is corrupt ({type(e).__name__}: {e}); "
                         "export the attribution again") from None
    for name, note in params.items():
        if isinstance(note, dict) and "tensor" in note:
            try:
                params[name] = _tensor_param(name, note, tensors.get(name), (d.get("tensors") or {}).get(name))
            except (KeyError, TypeError, AttributeError, EOFError, OSError) as e:
                raise ValueError(f"replay: the export's tensor parameter {name!r} is corrupt ({type(e).__name__}: "
                                 f"{e}); pass it again ({name}=<the tensor>) or export the attribution again") from None
    layer = d.get("layer") if d.get("layer") and not str(d.get("layer")).startswith("block ") else None
    # an image explained with others in one pass each (saliency, CAMs) is replayed among as many copies of
    # itself: which fast paths a pass takes (BatchNorm folding, the memory format) depends on how many samples
    # it holds, and on a net with max pooling the other summation order moved 0.3% of a saliency map's pixels
    # by up to 8%. Methods of many samples per image (IG, SmoothGrad, occlusion) run batched passes either way,
    # so they replay alone (copies would multiply their cost).
    copies, evaluations = d.get("batch_images", 1), d.get("evaluations")
    if isinstance(copies, int) and copies > 1 and isinstance(evaluations, int) and evaluations <= 2 * copies:
        image = image.expand(copies, *image.shape[-3:]) if isinstance(image, torch.Tensor) else [image] * copies
    result = attribute(model, image, d["method"], target=d["target"], preprocess=pre, batch_size=d.get("batch_size"),
                       **({"layer": layer} if layer else {}), **params)
    return result[0] if isinstance(result, list) else result


def _warn_if_other_code(d: dict, model: torch.nn.Module) -> None:
    """The same weights in another architecture (timm's efficientnet_lite0 pads differently from
    tf_efficientnet_lite0), or another nbexplain, may compute another map: say so rather than differ silently."""
    from . import __version__
    from .models import describe
    now = {"model": describe(model).name, "model_class": type(model).__name__}
    for key, value in now.items():
        if d.get(key) not in (None, value):
            warnings.warn(f"replay: the export was computed with {key} {d[key]!r} and this is {value!r} (the same "
                          "weights); if their layers compute differently, so does the map", stacklevel=3)
    versions = d.get("versions") or {}
    if not isinstance(versions, dict):
        raise ValueError(f"replay: the export's versions field is corrupt (expected a mapping, got "
                         f"{type(versions).__name__}); export the attribution again")
    exported = versions.get("nbexplain")
    if exported not in (None, __version__):
        warnings.warn(f"replay: the export was computed with nbexplain {exported} and this is {__version__}; a "
                      "method's defaults or numerics may have changed since", stacklevel=3)


def _document(doc: Any) -> Any:
    """An export as a dict: given as one, as JSON text, or as the path of a .json, .png or .npz export."""
    if isinstance(doc, dict):
        return doc
    path = os.fspath(doc) if isinstance(doc, os.PathLike) else doc
    if isinstance(path, str) and path.lower().endswith((".html", ".htm")) and "\n" not in path:
        raise ValueError(f"replay: {path!r} is an .html report, whose provenance is a table for people to read; "
                         "replay the .json, .png or .npz export of the same attribution")
    if isinstance(path, str) and path.lower().endswith((".json", ".png", ".npz")) and "\n" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"replay: no file {path!r}")
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext == ".png":
                with Image.open(path) as im:
                    return json.loads(im.text["nbexplain"])
            if ext == ".npz":
                with np.load(path) as z:
                    return json.loads(str(z["provenance"]))
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (KeyError, OSError, ValueError) as e:
            raise ValueError(f"replay: {path!r} holds no nbexplain provenance ({type(e).__name__}: {e}); "
                             "pass a file written by exp.save(...)") from None
    if not isinstance(doc, (str, bytes)):
        return doc
    if isinstance(doc, str) and "\n" not in doc and not doc.lstrip().startswith(("{", "[")):
        raise ValueError(f"replay: {doc!r} is neither JSON text nor the path of a .json, .png or .npz export; pass "
                         "exp.to_json(), its dict, or such a file written by exp.save(...)")
    try:
        return json.loads(doc)
    except ValueError as e:
        raise ValueError(f"replay: the text is not valid JSON ({e}); pass exp.to_json(), its dict, or the path "
                         "of a .json, .png or .npz export") from None


def _tensor_param(name: str, note: dict, given, stored) -> torch.Tensor:
    """The tensor parameter ``name`` for a replay: the one passed, else the export's own; either must match
    the hash the provenance recorded."""
    from .api import tensor_note            # at call time, as replay imports attribute
    if given is None and stored is None:
        raise ValueError(f"replay: {name} was a tensor {tuple(note['tensor'])} that this export does not carry "
                         f"(only its hash); pass it again: replay(..., {name}=<the tensor>)")
    if given is not None and not isinstance(given, (torch.Tensor, np.ndarray)):
        raise ValueError(f"replay: {name} was a tensor in the export; pass a tensor ({name}=<the tensor>) or "
                         f"nothing, to use the export's own, not {given!r}")
    t = torch.as_tensor(given) if given is not None else _from_npy(stored)
    if tensor_note(t)["sha256"] != note["sha256"]:
        raise ValueError(f"replay: {name} differs from the tensor the attribution was computed with (sha256 mismatch)")
    return t
