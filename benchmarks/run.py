#!/usr/bin/env python
"""nbexplain vs captum / pytorch-grad-cam / torchcam: speed at equal results, bounds, widget latency, memory.

    python benchmarks/run.py                 # full run (CPU: restricted to fit ~15 min on 2 cores)
    python benchmarks/run.py --quick         # smoke: every section once with tiny settings (< 60 s)
    python benchmarks/run.py --models resnet50 --device cuda --out bench-results/

Writes OUT/bench.md (markdown tables) and OUT/bench.json (everything, raw times included).

Method (read before quoting a number):
- One model per name (timm, random weights, ``torch.manual_seed(seed)`` before creation, eval mode), one
  input batch (nbexplain's bundled sample photos, preprocessed once), the same targets (the predicted class)
  and the same settings for every implementation of a row.
- Every implementation's output from the first (untimed, except for heavy rows) run is compared with
  ours in the same run: ``rel`` = max|a-b| / max|b|; CAMs are compared min-max normalised, after
  pytorch-grad-cam's own upsampling where it only returns input-sized maps. A peer whose formula differs by
  design is reported with its correlation and marked "≠" (it never counts as the best peer).
  A mismatch where equality is expected makes the script exit 1 (after writing the results).
- Timing: after the check run, implementations run interleaved (ours, peers…, then the reverse order, and
  so on) for as many rounds as fit in ``--row-budget`` seconds (at least 1, at most ``--max-reps``);
  medians are reported. ratio = peer median / our median (> 1: nbexplain is faster), against the fastest
  peer that agrees. Peers are called the way their docs show (model as given: parameters keep
  requires_grad=True; grad-cam/torchcam extractors built inside the timed call with ``with``).
- CPU: one torch thread per process. A full run spreads the models' rows and the accuracy section over
  ``--jobs`` worker processes (one per core, at most 2); a row's implementations always run in the same
  process, so both cores' shared caches and memory bandwidth weigh on ours and the peers' alike.
- bound (IG, SmoothGrad): a bare batched forward + ``torch.autograd.grad`` w.r.t. the input (parameters
  frozen) of the same number of evaluations in chunks of the same size, with the input in the memory
  format nbexplain uses for that model (channels-last for CNNs on the CPU), of the model as the user
  has it (BatchNorm not folded); efficiency = bound / ours, so above 1 is the fold's gain.
- CUDA: TF32 is turned off for the whole process (``cudnn.allow_tf32`` and ``cuda.matmul.allow_tf32``), so
  peers and bounds run in FP32 like nbexplain, which always attributes in FP32 (TF32 convolutions, PyTorch's
  default, put a resnet50 saliency map 6-17% off the FP32 one: not an equal result).
- CNN rows: nbexplain feeds channels-last inputs on the CPU and folds BatchNorm into the convs in batched
  passes, so its fp32 sums run in another order than a peer's. Where a model amplifies that past the
  tolerance (random-weight EfficientNet), the check falls back to the peer run on the model as nbexplain
  runs it (its NHWC twin: same layout, same fold), and the twin's own distance is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                      # run from a checkout without an install (device machine)
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MODELS = ("resnet50", "tf_efficientnet_lite0", "deit_small_patch16_224")
CHEAP = "tf_efficientnet_lite0"          # CPU full runs keep the expensive rows for this model only
# IG at equal accuracy on CPU: with random weights, deit's completeness gap is large (f(x)-f(b) ~ 0.6) and 8
# Gauss-Legendre steps reach 1%; tf_efficientnet_lite0's gap is ~0.01 and neither captum (512 steps) nor
# steps='auto' (1024, its cap) reaches 1% — that costs ~3000 evaluations, too many for 2 CPU cores.
ACC_CPU = "deit_small_patch16_224"
# and the bundled ImageNet-trained EfficientNet-Lite0 (nbx.load_model()): a trained ReLU net's path score jumps
# within a small stretch that uniform grids keep missing (random weights show none of it); on the cat photo
# captum's doubling search reaches 1% at 256 Gauss-Legendre steps
TRAINED = "bundled_efficientnet_lite0"
SAMPLES = ("cat", "coffee", "astronaut", "rocket", "motorcycle", "camera")


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Settings:
    quick: bool
    device: str
    size: int
    batches: tuple[int, ...]
    ig_steps: tuple[int, ...]
    sg_samples: tuple[int, ...]
    sg_noise: float
    occ_patch: int
    occ_stride: int
    row_budget: float
    max_reps: int
    heavy_s: float                 # a check run longer than this also counts as the first timed run
    restrict: bool                 # CPU full run: expensive rows only on CHEAP, batch 8 only cheap methods
    scorecam_layer: dict           # model -> layer name ('' = nbexplain's default layer)
    acc_max_steps: int
    widget_model: str
    widget_reps: int
    widget_heavy_reps: int
    widget_ig: tuple[int, int]
    widget_sg: tuple[int, int]
    mem_model: str
    mem_steps: int
    acc_ref_steps: int = 257    # points of the fine reference that map errors are measured against (CPU: 129)
    first_models: tuple[str, ...] = ("resnet50", "deit_small_patch16_224")   # the first-call section's


def settings_for(args) -> Settings:
    cuda = args.device == "cuda"
    if args.quick:
        return Settings(True, args.device, args.size or 32, (1, 2), (2, 4, 8), (2, 4), 0.15, 16, 16,
                        0.0, 1, 0.0, not cuda, {m: "" for m in MODELS} | {"resnet50": "conv1",
                                                                        "tf_efficientnet_lite0": "blocks.2",
                                                                        "deit_small_patch16_224": ""},
                        16, args.widget_model or CHEAP, 2, 1, (2, 4), (2, 4), "resnet50", 8, 17, ("resnet50",))
    size = args.size or 224     # occlusion's window and stride scale with it: 56/28 at 224 px, 8/4 at 32
    return Settings(False, args.device, size, (1, 8), (16, 64, 128), (25, 50), 0.15,
                    max(2, 56 * size // 224), max(1, 28 * size // 224),
                    args.row_budget or (20.0 if cuda else 12.0), args.max_reps or (7 if cuda else 3),
                    5.0 if cuda else 8.0, not cuda and not args.no_restrict,
                    {"resnet50": "" if cuda else "layer1", "tf_efficientnet_lite0": "" if cuda else "blocks.5",
                     "deit_small_patch16_224": ""},
                    512, args.widget_model or (CHEAP if not cuda else "resnet50"),
                    12 if cuda else 6, 5 if cuda else 2, (32, 64), (25, 50), "resnet50", 128,
                    257 if cuda else 129)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def now() -> float:
    return time.perf_counter()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / ((a.norm() * b.norm()).clamp_min(1e-30)))


def minmax(m: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-image min-max normalisation of (N, ...) maps, as pytorch-grad-cam's scale_cam_image does."""
    flat = m.detach().double().cpu().flatten(1)
    flat = flat - flat.amin(1, keepdim=True)
    flat = flat / (flat.amax(1, keepdim=True) + eps)
    return flat.view_as(m)


def cam_to_input(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N,h,w) -> min-max normalised and bilinearly upsampled like grad-cam (cv2.resize = half-pixel)."""
    import torch.nn.functional as F
    return F.interpolate(minmax(m).float()[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]


def quiet():
    """Silence peers' progress bars and warnings inside timed calls (stderr only)."""
    return contextlib.redirect_stderr(io.StringIO())


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def machine(device: str) -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "python": platform.python_version(),
            "device": device, "load_avg_start": os.getloadavg()}
    try:
        import captum, timm, torchcam  # noqa: E401
        import importlib.metadata as md
        info.update(timm=timm.__version__, captum=captum.__version__, torchcam=torchcam.__version__,
                    grad_cam=md.version("grad-cam"))
    except Exception as e:  # pragma: no cover - reported, not fatal
        info["versions_error"] = repr(e)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["tf32"] = bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
    return info


# ------------------------------------------------------------------------------------------------
# models and inputs
# ------------------------------------------------------------------------------------------------
def make_model(name: str, size: int, device: str, seed: int = 0):
    import timm
    if name == TRAINED:
        import nbexplain as nbx
        return nbx.load_model().eval().to(device)
    torch.manual_seed(seed)
    kwargs = {"img_size": size} if ("deit" in name or "vit" in name) and size != 224 else {}
    return timm.create_model(name, pretrained=False, **kwargs).eval().to(device)


def make_input(model, batch: int, size: int, device: str) -> torch.Tensor:
    """The bundled sample photos through the model's own preprocessing (mirrored copies past 6)."""
    from PIL import ImageOps
    from nbexplain.images import prepare
    from nbexplain.models import describe
    pre = describe(model).preprocess
    pre = dataclasses.replace(pre, size=(size, size))
    imgs = []
    for i in range(batch):
        img = photo(SAMPLES[i % len(SAMPLES)], i)
        imgs.append(ImageOps.mirror(img) if i >= len(SAMPLES) else img)
    return prepare(imgs, pre).x.to(device)


def photo(name: str, i: int = 0):
    """A bundled sample photo; a seeded smooth random image where scikit-image's data is missing."""
    from PIL import Image
    from nbexplain.samples import sample_image
    try:
        return sample_image(name)
    except Exception:
        g = torch.Generator().manual_seed(i)
        low = torch.rand(3, 8, 8, generator=g)[None]
        img = torch.nn.functional.interpolate(low, size=(256, 256), mode="bicubic", align_corners=False)[0]
        return Image.fromarray((img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def token_reshape(model, size: int) -> Callable | None:
    """(N,T,C) ViT tokens -> (N,C,h,w), for pytorch-grad-cam and torchcam's reshape_transform."""
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return None
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
    prefix, g = int(getattr(model, "num_prefix_tokens", 1)), size // patch

    def f(t):
        if t.ndim != 3:
            return t
        return t[:, prefix:].reshape(t.shape[0], g, g, t.shape[2]).permute(0, 3, 1, 2)
    return f


# ------------------------------------------------------------------------------------------------
# implementations: each returns a callable running the method once and returning a torch tensor
# ------------------------------------------------------------------------------------------------
def ours(model, x, method, targets, bs, **params):
    import nbexplain as nbx

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = nbx.attribute(model, x, method, target=list(targets), batch_size=bs, **params)
        return torch.cat([r.raw for r in res])
    return run


class NHWC(torch.nn.Module):
    """The model run the way nbexplain runs it: channels-last inputs on the CPU and BatchNorm folded into
    its convs (``nbexplain.speed.plan``), so a peer computes the same sums in the same order. (A peer's own
    input handling, e.g. captum's path interpolation, would otherwise turn an NHWC input back into NCHW.)"""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        from nbexplain.folding import folded, folded_weights
        from nbexplain.hygiene import borrowed
        from nbexplain.speed import plan
        with borrowed(self.model):
            p = plan(self.model, x)
        with folded(list(p.pairs), folded_weights(list(p.pairs))):
            return self.model(x.contiguous(memory_format=p.memory_format))


def captum_fn(model, x, kind, targets, bs, **kw):
    import captum.attr as ca
    t = torch.tensor(targets, device=x.device)

    def run():
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            if kind == "saliency":
                return ca.Saliency(model).attribute(x, target=t, abs=False)
            if kind == "guided_backprop":
                return ca.GuidedBackprop(model).attribute(x, target=t)
            if kind == "ig":
                return ca.IntegratedGradients(model).attribute(
                    x, baselines=kw["baseline"], target=t, n_steps=kw["steps"], method="gausslegendre",
                    internal_batch_size=bs, return_convergence_delta=kw.get("delta", False))
            if kind == "smoothgrad":
                return ca.NoiseTunnel(ca.Saliency(model)).attribute(
                    x, nt_type="smoothgrad", nt_samples=kw["samples"], stdevs=kw["stdevs"],
                    nt_samples_batch_size=max(1, bs // len(x)), target=t, abs=False)
            if kind == "occlusion":
                p, s = kw["patch"], kw["stride"]
                return ca.Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1], p, p),
                                                     strides=(x.shape[1], s, s), baselines=0, target=t,
                                                     perturbations_per_eval=kw.get("ppe", max(1, bs // len(x))))
        raise ValueError(kind)
    return run


GRADCAM_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "layercam": "LayerCAM",
                   "scorecam": "ScoreCAM"}
TORCHCAM_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMpp", "layercam": "LayerCAM", "scorecam": "ScoreCAM"}


def gradcam_fn(model, x, method, targets, layer_name, reshape, bs):
    import pytorch_grad_cam as pgc
    import pytorch_grad_cam.score_cam as sc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    sc.tqdm.tqdm = lambda it, *a, **k: it          # its progress bar only writes to stderr
    cls = getattr(pgc, GRADCAM_CLASSES[method])
    layer = dict(model.named_modules())[layer_name]
    tg = [ClassifierOutputTarget(int(t)) for t in targets]

    def run():
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
                if method == "scorecam":
                    cam.batch_size = bs
                return torch.from_numpy(cam(input_tensor=x, targets=tg))
    return run


def gradcam_gbp_fn(model, x, targets):
    """pytorch-grad-cam's GuidedBackpropReLUModel: one image; it swaps ReLU modules, so a private copy."""
    from pytorch_grad_cam import GuidedBackpropReLUModel
    own = copy.deepcopy(model)
    gb = GuidedBackpropReLUModel(model=own, device=x.device)

    def run():
        out = gb(x.clone(), target_category=int(targets[0]))          # (H,W,C) numpy
        return torch.from_numpy(out).permute(2, 0, 1)[None]
    return run


def torchcam_fn(model, x, method, targets, layer_name, reshape, bs):
    import torchcam.methods as tm
    cls = getattr(tm, TORCHCAM_CLASSES[method])
    idx = [int(t) for t in targets]

    def run():
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            kw = {"batch_size": bs} if method == "scorecam" else {}
            with cls(model, target_layer=layer_name, reshape_transform=reshape, **kw) as ext:
                if method == "scorecam":
                    with torch.no_grad():
                        model(x)
                    cams = ext(class_idx=idx)
                else:
                    cams = ext(class_idx=idx, scores=model(x))
            return cams[0].detach()
    return run


def bound_fn(model, points: int, x, bs: int):
    """Bare chunked forward + input-only backward of `points` evaluations (the floor for IG/SmoothGrad),
    in the memory format nbexplain picks for this model (channels-last for CNNs on the CPU), of the model
    as the user has it: efficiency > 1 is BatchNorm folding's gain (a CNN's BN passes are not run)."""
    from nbexplain.hygiene import borrowed
    from nbexplain.speed import input_format
    with borrowed(model):
        layout = input_format(model, x)
    sizes = [min(bs, points - i) for i in range(0, points, bs)]
    pools = {s: x[torch.arange(s) % len(x)].clone().contiguous(memory_format=layout) for s in set(sizes)}
    params = list(model.parameters())

    def run():
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            for s in sizes:
                xi = pools[s].detach().requires_grad_(True)
                out = model(xi)[:, 0].sum()
                torch.autograd.grad(out, xi)
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return None
    return run


# ------------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Peer:
    name: str
    fn: Callable
    check: str = "equal"          # equal | corr (loose agreement) | differs (documented formula difference)
    note: str = ""
    compare: Callable | None = None   # (ours_out, peer_out) -> (metric name, value, ok)
    # the same peer on a channels-last input (what nbexplain feeds CNNs on the CPU): when a model's fp32
    # result depends on the summation order more than the tolerance, agreeing with this twin shows that
    # both compute the same thing, and the twin's distance to the plain peer is that model's own noise
    twin: Callable | None = None


class Bench:
    def __init__(self, s: Settings, out: pathlib.Path):
        self.s, self.out = s, out
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.failures: list[str] = []
        self.first: list[dict] = []       # first calls in fresh processes
        self.t0 = now()

    def time_row(self, row: dict, impls: dict[str, Callable]) -> tuple[dict[str, list[float]], dict[str, Any], int]:
        """Check runs (outputs kept), then interleaved timed rounds within the row budget."""
        dev = self.s.device
        outs, first = {}, {}
        for name, fn in impls.items():
            sync(dev)
            t = now()
            outs[name] = fn()
            sync(dev)
            first[name] = now() - t
        times = {name: [] for name in impls}
        rnd = sum(first.values())
        fit = int(self.s.row_budget // max(rnd, 1e-9))
        if self.s.quick or max(first.values()) > self.s.heavy_s:
            # heavy rows: the check run is representative (one-time costs are small next to it): count it
            for name in impls:
                times[name].append(first[name])
            reps = max(0, min(self.s.max_reps - 1, fit - 1))
        else:
            reps = max(1, min(self.s.max_reps, fit))
        names = list(impls)
        for r in range(reps):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                sync(dev)
                t = now()
                impls[name]()
                sync(dev)
                times[name].append(now() - t)
        return times, outs, len(times[names[0]])

    def run_row(self, row: dict, our_fn: Callable, peers: list[Peer], bound: Callable | None = None,
                extra_check: Callable | None = None) -> None:
        impls = {"nbexplain": our_fn, **{p.name: p.fn for p in peers}}
        if bound is not None:
            impls["bound"] = bound
        try:
            times, outs, n = self.time_row(row, impls)
        except Exception as e:
            msg = f"{row['model']} b{row['batch']} {row['label']}: {type(e).__name__}: {e}"
            print("  ERROR", msg, flush=True)
            self.failures.append(msg)
            self.rows.append(dict(row, error=f"{type(e).__name__}: {e}"))
            return
        med = {k: statistics.median(v) for k, v in times.items()}
        checks = []
        for p in peers:
            try:
                metric, value, ok = (p.compare or compare_rel)(outs["nbexplain"], outs[p.name])
            except RuntimeError:       # another shape: e.g. a peer reading a channels-last layer as NCHW
                metric, value, ok = f"shape {tuple(outs[p.name].shape)}", float("nan"), False
            if not ok and p.twin is not None and p.check == "equal" and value == value:
                twin = p.twin()
                _, floor, _ = (p.compare or compare_rel)(twin, outs[p.name])
                metric, value, ok = (p.compare or compare_rel)(outs["nbexplain"], twin)
                metric = f"{metric} vs NHWC twin (twin↔NCHW {floor:.2g})"
            status = ("ok" if ok else "FAIL") if p.check != "differs" else "≠"
            if p.check == "equal" and not ok:
                self.failures.append(f"{row['model']} b{row['batch']} {row['label']} vs {p.name}: "
                                     f"{metric}={value:.3g}")
            checks.append({"peer": p.name, "check": p.check, "metric": metric, "value": value, "ok": ok,
                           "status": status, "note": p.note})
        if extra_check is not None:
            for c in extra_check(outs):
                checks.append(c)
                if c["check"] == "equal" and not c["ok"]:
                    self.failures.append(f"{row['model']} b{row['batch']} {row['label']}: {c['metric']}="
                                         f"{c['value']:.3g}")
        agreeing = [p.name for p, c in zip(peers, checks) if c["ok"] and p.check != "differs"]
        best = min(agreeing, key=lambda k: med[k]) if agreeing else None
        result = dict(row, reps=n, times={k: [round(t, 5) for t in v] for k, v in times.items()},
                      median_s={k: round(v, 5) for k, v in med.items()}, checks=checks, best_peer=best,
                      ratio=(med[best] / med["nbexplain"]) if best else None,
                      ratios={p.name: med[p.name] / med["nbexplain"] for p in peers},
                      bound_s=med.get("bound"), efficiency=(med["bound"] / med["nbexplain"]) if bound else None)
        self.rows.append(result)
        agree = ", ".join(f"{c['peer']} {c['metric']}={c['value']:.2g} {c['status']}" for c in checks)
        extra = f"  bound {med['bound']:.3f}s eff {result['efficiency']:.2f}" if bound else ""
        ratio = f"{result['ratio']:.2f}x vs {best}" if best else "no agreeing peer"
        print(f"  {row['model']:<24} b{row['batch']} {row['label']:<22} ours {med['nbexplain']:.3f}s  "
              f"{ratio}{extra}  [{agree}] n={n}  (+{now() - self.t0:.0f}s)", flush=True)

    def skip(self, model: str, batch: int, label: str, why: str) -> None:
        self.skipped.append({"model": model, "batch": batch, "label": label, "why": why})


def compare_rel(a, b, tol: float = 2e-3):
    v = rel_err(a, b.to(a.dtype).view_as(a) if b.numel() == a.numel() else b)
    return "rel", v, v <= tol


def compare_cam_gradcam(ours_out, peer_out, tol: float = 2e-3):
    """grad-cam returns maps min-max scaled, cv2-resized to the input and scaled again: do the same to ours
    with its own function (cv2's bilinear resize differs from torch's by up to ~0.1 at 2×2→64×64)."""
    from pytorch_grad_cam.utils.image import scale_cam_image
    h, w = peer_out.shape[-2:]
    mine = scale_cam_image(scale_cam_image(ours_out.detach().float().cpu().numpy(), (w, h)))
    v = float(np.abs(mine - peer_out.numpy()).max())
    return "max|Δ|", v, v <= tol


def compare_cam_norm(ours_out, peer_out, tol: float = 2e-3):
    """torchcam returns min-max normalised maps at the layer's resolution."""
    v = float((minmax(ours_out) - minmax(peer_out)).abs().max())
    return "max|Δ|", v, v <= tol


def compare_corr_to_input(ours_out, peer_out, floor: float = 0.9):
    mine = cam_to_input(ours_out, tuple(peer_out.shape[-2:])) if ours_out.shape[-2:] != peer_out.shape[-2:] \
        else minmax(ours_out)
    v = corr(mine, minmax(peer_out))
    return "corr", v, v >= floor


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
def bench_model(b: Bench, name: str) -> None:
    s = b.s
    from nbexplain.api import auto_batch_size
    from nbexplain.layers import default_layer
    from nbexplain.models import describe
    from nbexplain.methods.baselines import make_baseline
    model = make_model(name, s.size, s.device)
    reshape = token_reshape(model, s.size)
    layer = default_layer(model, (1, 3, s.size, s.size)).name
    # warm every implementation once on this model (allocator, nbexplain's layer probe and weights digest)
    x1 = make_input(model, 1, s.size, s.device)
    with torch.no_grad():
        t1 = model(x1).argmax(1).tolist()
    ours(model, x1, "saliency", t1, 16)()
    captum_fn(model, x1, "saliency", t1, 16)()
    ours(model, x1, "gradcam", t1, 16, layer=layer)()
    gbp_ok = any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    relu6 = any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    print(f"model {name}: CAM layer {layer}; ReLU modules: {gbp_ok}; ReLU6: {relu6}", flush=True)
    for batch in s.batches:
        x = make_input(model, batch, s.size, s.device)
        with torch.no_grad():
            targets = model(x).argmax(1).tolist()
        bs = auto_batch_size(x, torch.device(s.device))
        base = dict(model=name, batch=batch, size=s.size, device=s.device, chunk=bs)
        restricted_model = s.restrict and name != CHEAP
        restricted_batch = s.restrict and batch > 1

        # --- saliency
        b.run_row(dict(base, method="saliency", label="saliency"), ours(model, x, "saliency", targets, bs),
                  [Peer("captum", captum_fn(model, x, "saliency", targets, bs),
                        twin=captum_fn(NHWC(model), x, "saliency", targets, bs))])

        # --- guided backprop
        if restricted_batch and name != CHEAP:
            b.skip(name, batch, "guided backprop, gradcam++, layercam", f"CPU budget (batch > 1: saliency and "
                                                                          f"gradcam only, except on {CHEAP})")
        peers = [Peer("captum", captum_fn(model, x, "guided_backprop", targets, bs),
                      twin=captum_fn(NHWC(model), x, "guided_backprop", targets, bs),
                      check="equal" if not relu6 else "differs",
                      note="" if not relu6 else "captum hooks nn.ReLU only; this model uses ReLU6 (captum "
                                                "returns the plain gradient)")]
        if batch == 1:
            peers.append(Peer("grad-cam", gradcam_gbp_fn(model, x, targets),
                              check="equal" if not relu6 else "differs",
                              note="" if not relu6 else "grad-cam swaps nn.ReLU only (not ReLU6)"))
        if not (restricted_batch and name != CHEAP):
            b.run_row(dict(base, method="guided_backprop", label="guided backprop"),
                      ours(model, x, "guided_backprop", targets, bs), peers)

        # --- CAMs
        for method in ("gradcam", "gradcam++", "layercam"):
            if restricted_batch and name != CHEAP and method != "gradcam":
                continue
            peers = [Peer("grad-cam", gradcam_fn(model, x, method, targets, layer, reshape, bs),
                          compare=compare_cam_gradcam)]
            if method == "gradcam++":
                peers.append(Peer("torchcam", torchcam_fn(model, x, method, targets, layer, reshape, bs),
                                  check="differs", compare=compare_corr_to_input,
                                  note="torchcam's Grad-CAM++ uses Σ(A·g³) in the denominator and its alpha "
                                       "division is a no-op (boolean-index copy)"))
            else:
                peers.append(Peer("torchcam", torchcam_fn(model, x, method, targets, layer, reshape, bs),
                                  compare=compare_cam_norm))
            b.run_row(dict(base, method=method, label=method, layer=layer),
                      ours(model, x, method, targets, bs, layer=layer), peers)

        # --- Score-CAM
        if restricted_batch or (s.restrict and name != CHEAP) or (s.quick and batch > 1):
            b.skip(name, batch, "scorecam", "CPU budget: Score-CAM is one forward per channel; run on "
                                            f"{CHEAP} batch 1 only (use --no-restrict or CUDA)")
        else:
            sl = s.scorecam_layer.get(name) or layer
            peers = [Peer("grad-cam", gradcam_fn(model, x, "scorecam", targets, sl, reshape, 16),
                          compare=compare_cam_gradcam),
                     Peer("torchcam", torchcam_fn(model, x, "scorecam", targets, sl, reshape, 16),
                          check="differs", compare=compare_corr_to_input,
                          note="torchcam normalises activations before upsampling (align_corners=False); "
                               "grad-cam and nbexplain upsample first (align_corners=True)")]
            b.run_row(dict(base, method="scorecam", label=f"scorecam @{sl}", layer=sl, chunk=16),
                      ours(model, x, "scorecam", targets, 16, layer=sl), peers)

        # --- occlusion
        if restricted_batch:
            b.skip(name, batch, "occlusion", "CPU budget (batch > 1 not run on CPU)")
        else:
            p, st = s.occ_patch, s.occ_stride
            b.run_row(dict(base, method="occlusion", label=f"occlusion {p}/{st}"),
                      ours(model, x, "occlusion", targets, bs, patch=p, stride=st, fill="zeros"),
                      [Peer("captum", captum_fn(model, x, "occlusion", targets, bs, patch=p, stride=st),
                            twin=captum_fn(NHWC(model), x, "occlusion", targets, bs, patch=p, stride=st)),
                       Peer("captum (default: 1 window per forward)",
                            captum_fn(model, x, "occlusion", targets, bs, patch=p, stride=st, ppe=1),
                            twin=captum_fn(NHWC(model), x, "occlusion", targets, bs, patch=p, stride=st, ppe=1))])

        # --- Integrated Gradients
        baseline = make_baseline(x, "black", describe(model).preprocess)
        for i, steps in enumerate(s.ig_steps):
            if (restricted_model and i > 0) or (restricted_batch and (name != CHEAP or i > 0)):
                b.skip(name, batch, f"IG {steps}", "CPU budget")
                continue
            b.run_row(dict(base, method="integrated_gradients", label=f"IG {steps}", steps=steps,
                           evaluations=steps * batch),
                      ours(model, x, "integrated_gradients", targets, bs, steps=steps, baseline=baseline,
                           rule="gausslegendre"),
                      [Peer("captum", captum_fn(model, x, "ig", targets, bs, steps=steps, baseline=baseline),
                            twin=captum_fn(NHWC(model), x, "ig", targets, bs, steps=steps, baseline=baseline))],
                      bound=bound_fn(model, steps * batch, x, bs))

        # --- SmoothGrad
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1))
        stdevs = float(s.sg_noise * span.mean())
        for i, samples in enumerate(s.sg_samples):
            if (restricted_model and i > 0) or restricted_batch:
                b.skip(name, batch, f"SmoothGrad {samples}", "CPU budget")
                continue
            seeds = iter(range(1000))
            our_sg = lambda model=model: ours(model, x, "smoothgrad", targets, bs, samples=samples,  # noqa: E731
                                  noise=s.sg_noise, seed=next(seeds))()
            b.run_row(dict(base, method="smoothgrad", label=f"SmoothGrad {samples}", samples=samples,
                           noise=s.sg_noise, evaluations=samples * batch,
                           note="captum σ = noise × mean span" if batch > 1 else ""),
                      our_sg,
                      [Peer("captum", captum_fn(model, x, "smoothgrad", targets, bs, samples=samples,
                                                stdevs=stdevs), check="corr",
                            compare=lambda a, c, f=None: ("corr", corr(a, c), True))],
                      bound=bound_fn(model, samples * batch, x, bs),
                      extra_check=sg_checks(model, x, targets, bs, samples, s.sg_noise) if i == 0 else None)
    del model


def sg_checks(model, x, targets, bs, samples, noise):
    """Exact check of the 1-sample / zero-noise equivalent, and a noise-floor check of real settings."""
    def check(outs):
        a = ours(model, x, "smoothgrad", targets, bs, samples=1, noise=0.0, seed=0)()
        c = captum_fn(model, x, "smoothgrad", targets, bs, samples=1, stdevs=0.0)()
        v, metric = rel_err(a, c), "rel(1 sample, σ=0)"
        if v > 2e-3:                     # as the rows do: the peer on the model as we run it (same fold)
            twin = captum_fn(NHWC(model), x, "smoothgrad", targets, bs, samples=1, stdevs=0.0)()
            v, metric = rel_err(a, twin), f"{metric} vs NHWC twin (twin↔NCHW {rel_err(twin, c):.2g})"
        out = [{"peer": "captum", "check": "equal", "metric": metric, "value": v, "ok": v <= 2e-3,
                "status": "ok" if v <= 2e-3 else "FAIL", "note": "exact equivalent"}]
        other = ours(model, x, "smoothgrad", targets, bs, samples=samples, noise=noise, seed=12345)()
        floor = corr(outs["nbexplain"], other)            # ours vs ours with another seed
        peer = corr(outs["nbexplain"], outs["captum"])
        ok = peer >= 0.5 * floor
        out.append({"peer": "captum", "check": "corr", "metric": "corr/floor", "value": peer / max(floor, 1e-12),
                    "ok": ok, "status": "ok" if ok else "low", "floor": floor, "corr": peer,
                    "note": "corr(ours, captum) vs corr(ours seed a, ours seed b): different RNGs"})
        return out
    return check


# ------------------------------------------------------------------------------------------------
# IG at equal accuracy
# ------------------------------------------------------------------------------------------------
def bench_ig_accuracy(b: Bench, name: str) -> dict:
    import nbexplain as nbx
    from nbexplain.api import auto_batch_size
    from nbexplain.models import describe
    from nbexplain.methods.baselines import make_baseline
    s = b.s
    model = make_model(name, s.size, s.device)
    x = make_input(model, 1, s.size, s.device)
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()
    bs = auto_batch_size(x, torch.device(s.device))
    baseline = make_baseline(x, "black", describe(model).preprocess)
    tol = 0.01
    with torch.no_grad():
        gap = float(model(x)[0, targets[0]] - model(baseline)[0, targets[0]])
    search, n_star, t_star, cap_map = [], None, None, None
    n = 4
    while n <= s.acc_max_steps:
        fn = captum_fn(model, x, "ig", targets, bs, steps=n, baseline=baseline, delta=True)
        sync(s.device)
        t = now()
        cap_map, delta = fn()
        sync(s.device)
        dt = now() - t
        r = abs(float(delta[0])) / max(abs(gap), 1e-12)
        search.append({"steps": n, "s": dt, "relative_delta": r})
        if r <= tol:
            n_star, t_star = n, dt
            break
        n *= 2
    res = {"model": name, "gap": gap, "tolerance": tol, "captum_search": search, "captum_steps": n_star,
           "captum_s": t_star, "captum_search_total_s": sum(r["s"] for r in search)}
    maps = {}
    for rule in ("gausslegendre",) + (("riemann_trapezoid",) if not (s.quick or s.restrict) else ()):
        sync(s.device)
        t = now()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = nbx.attribute(model, x, "integrated_gradients", target=targets, steps="auto", tolerance=tol,
                              rule=rule, baseline=baseline, batch_size=bs)
        sync(s.device)
        dt = now() - t
        a = a[0]
        maps[rule] = a.raw
        res[f"ours_{rule}"] = {"rule": rule, "s": dt, "steps": a.meta["steps"], "evaluations": a.meta.get("evaluations"),
                               "relative_delta": float(np.ravel(a.meta["relative_delta"])[0])}
    # the delta is one number per image; how close the *map* is comes from a fine reference
    # (textbook trapezoid, REF_STEPS points): a rule can meet the delta by cancellation while the map
    # is still far off, so the table reports both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = nbx.attribute(model, x, "integrated_gradients", target=targets, steps=s.acc_ref_steps,
                            rule="riemann_trapezoid", baseline=baseline, batch_size=bs)[0].raw
    res["reference_steps"] = s.acc_ref_steps
    res["ours_map_error"] = float((maps["gausslegendre"] - ref).norm() / ref.norm())
    if n_star is not None:                    # captum's map from the search run that met the tolerance
        res["captum_map_error"] = float((cap_map.cpu() - ref).norm() / ref.norm())
    if n_star is not None:
        # the two side by side again (interleaved) for a steadier ratio
        f_c = captum_fn(model, x, "ig", targets, bs, steps=n_star, baseline=baseline, delta=True)
        f_o = ours(model, x, "integrated_gradients", targets, bs, steps="auto", tolerance=tol,
                   rule="gausslegendre", baseline=baseline)
        f_f = ours(model, x, "integrated_gradients", targets, bs, steps=n_star, rule="gausslegendre",
                   baseline=baseline)
        tc, to, tf = [t_star], [res["ours_gausslegendre"]["s"]], []
        reps = 0 if s.quick else min(2, int(s.row_budget // max(1e-9, 2 * t_star + to[0])))
        for r in range(reps):
            order = [(tf, f_f), (tc, f_c), (to, f_o)]
            for lst, fn in (order if r % 2 == 0 else order[::-1]):
                sync(s.device)
                t = now()
                fn()
                sync(s.device)
                lst.append(now() - t)
        res.update(captum_median_s=statistics.median(tc), ours_auto_median_s=statistics.median(to),
                   ours_fixed_n_star_median_s=statistics.median(tf) if tf else None,
                   ratio=statistics.median(tc) / statistics.median(to))
    print(f"  IG@1% {name}: captum needs {n_star} GL steps ({t_star if t_star is None else round(t_star, 3)} s); "
          f"ours auto GL -> {res['ours_gausslegendre']['steps']} steps, {res['ours_gausslegendre']['s']:.3f} s, "
          f"{res['ours_gausslegendre']['evaluations']} evaluations; auto trapezoid -> "
          f"{res.get('ours_riemann_trapezoid', {}).get('steps')} steps "
          f"{res.get('ours_riemann_trapezoid', {}).get('s')} s; ratio {res.get('ratio', float('nan')):.2f}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# widget
# ------------------------------------------------------------------------------------------------
def bench_widget(b: Bench) -> dict:
    import nbexplain as nbx
    from nbexplain.models import describe
    s = b.s
    model = make_model(s.widget_model, s.size, s.device)
    pre = dataclasses.replace(describe(model).preprocess, size=(s.size, s.size))
    images = [photo("cat", 0), photo("coffee", 1)]
    samples: dict[str, list[dict]] = {}

    def change(label: str | None, **traits) -> dict | None:
        """Set traits and wait; record the kernel time. A set that changes nothing is not recorded."""
        if all(getattr(w, k) == v for k, v in traits.items()):
            return None
        t = now()
        for k, v in traits.items():
            setattr(w, k, v)
        w.wait()
        ms = (now() - t) * 1000
        rec = {"ms": ms, "stage_ms": sum(st["ms"] for st in w.stages),
               "ran": [st["name"] for st in w.stages if st["ran"]],
               "evaluations": sum(st.get("evaluations", 0) for st in w.stages)}
        if label is not None:
            samples.setdefault(label, []).append(rec)
        return rec

    def toggle(label: str, trait: str, a, b, n: int) -> None:
        """Both values visited first (unrecorded), then n recorded switches between them."""
        change(None, **{trait: a})
        change(None, **{trait: b})
        for i in range(n):
            change(label, **{trait: a if i % 2 == 0 else b})

    t = now()
    w = nbx.explain(model, images, preprocess=pre, method="gradcam")
    w.wait()
    open_ms = (now() - t) * 1000
    layers = [layer["name"] for layer in w.view._layers]
    first_layer = w.layer_used
    others = [n for n in layers if n != first_layer]
    other = others[-1]
    change(None, layer=first_layer)
    R, H = s.widget_reps, s.widget_heavy_reps
    # view-only controls: drawn in the browser, no kernel stage
    toggle("opacity", "opacity", 0.8, 0.5, R)
    toggle("colormap", "colormap", "viridis", "auto", R)
    # layer switch: the CAM workspace captured every candidate layer in one pass
    for name in others[::-1][:R]:
        change("layer (first visit)", layer=name)
    toggle("layer (toggle, cached)", "layer", first_layer, other, R)
    for i in range(R):                       # a cold Grad-CAM through the widget: nothing cached (cheap: R, not H)
        w.cache.clear()
        change("cold Grad-CAM (cache cleared)", layer=other if w.layer == first_layer else first_layer)
    # target: a new class each time (the workspace is captured again) and toggling (cached)
    for i in range(H):
        change("target (new class)", target=100 + i)
    toggle("target (toggle, cached)", "target", 200, 201, R)
    # method within the CAM family (workspace reused) and across families
    for m in ["gradcam++", "layercam", "xgradcam", "hirescam"][:max(2, min(4, R))]:
        change("method (CAM→CAM, first visit)", method=m)
    toggle("method (toggle, cached)", "method", "gradcam", "gradcam++", R)
    change("method (CAM→saliency, first visit)", method="saliency")
    # Integrated Gradients: n1 -> n2 steps vs a cold n2 (the widget's default rule nests)
    n1, n2 = s.widget_ig
    change(None, target=-1)
    change("IG open", method="integrated_gradients", steps=n2)
    for i in range(H):
        w.cache.clear()
        change(f"IG cold {n1}", steps=n1)
        change(f"IG {n1}→{n2} (refine)", steps=n2)
        w.cache.clear()
        change(f"IG cold {n2}", seed=1000 + i)
    toggle(f"IG {n2}↔{n1} (toggle, cached)", "steps", n1, n2, R)
    # SmoothGrad: k1 -> k2 continues the running sums; fresh seeds make every cold run real
    k1, k2 = s.widget_sg
    change("SmoothGrad open", method="smoothgrad", samples=k1, seed=0)
    for i in range(H):
        change(f"SmoothGrad cold {k1} (new seed)", seed=2000 + 2 * i)
        change(f"SmoothGrad {k1}→{k2} (refine)", samples=k2)
        change(f"SmoothGrad cold {k2} (new seed)", seed=2001 + 2 * i)
        change(f"SmoothGrad {k2}→{k1} (same seed, {k1} never shown)", samples=k1)
    for i in range(H):
        change(f"noise (new value, {k1} samples)", noise=round(0.20 + 0.01 * i, 2))
    toggle("noise (toggle, cached)", "noise", 0.15, 0.20, R)
    w.close()

    # the same computations through the API, for reference
    x = make_input(model, 1, s.size, s.device)
    api = {}
    for label, method, kw in [("gradcam", "gradcam", {}), (f"IG {n2} riemann_right", "integrated_gradients",
                                                             {"steps": n2, "rule": "riemann_right"}),
                              (f"SmoothGrad {k2}", "smoothgrad", {"samples": k2})]:
        ts = []
        for _ in range(2 if not s.quick else 1):
            t = now()
            nbx.attribute(model, x, method, **kw)
            ts.append((now() - t) * 1000)
        api[label] = min(ts)
    summary = {label: {"n": len(v), "p50_ms": percentile([r["ms"] for r in v], 0.5),
                       "p95_ms": percentile([r["ms"] for r in v], 0.95),
                       "stage_p50_ms": percentile([r["stage_ms"] for r in v], 0.5),
                       "ran": v[-1]["ran"], "evaluations": v[-1]["evaluations"]}
               for label, v in samples.items()}
    res = {"model": s.widget_model, "open_ms": open_ms, "layers": [first_layer, other], "controls": summary,
           "api_ms": api, "raw": samples}
    for label, v in summary.items():
        print(f"  widget {label:<44} p50 {v['p50_ms']:9.1f} ms  p95 {v['p95_ms']:9.1f} ms  "
              f"ran {','.join(v['ran']) or '-'}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# peak memory (a subprocess each, so the high-water mark belongs to one computation)
# ------------------------------------------------------------------------------------------------
def memory_child(spec: dict) -> dict:
    from nbexplain.api import auto_batch_size
    from nbexplain.models import describe
    from nbexplain.methods.baselines import make_baseline
    device = spec["device"]
    model = make_model(spec["model"], spec["size"], device)
    x = make_input(model, 1, spec["size"], device)
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()
    bs = auto_batch_size(x, torch.device(device))
    baseline = make_baseline(x, "black", describe(model).preprocess)
    if spec["impl"] == "nbexplain":
        fn = ours(model, x, "integrated_gradients", targets, bs, steps=spec["steps"], baseline=baseline,
                  rule="gausslegendre")
    else:
        fn = captum_fn(model, x, "ig", targets, bs, steps=spec["steps"], baseline=baseline)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    # ru_maxrss keeps the parent's high-water mark across fork+exec; /proc's VmHWM is this process image's,
    # and writing 5 to clear_refs resets it, so the peak below belongs to the call alone
    rss_before = proc_status("VmRSS")
    reset = reset_peak_rss()
    t = now()
    fn()
    sync(device)
    dt = now() - t
    out = {"impl": spec["impl"], "chunk": bs, "s": dt, "rss_before_mib": rss_before,
           "peak_rss_mib": proc_status("VmHWM"), "peak_reset": reset,
           "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["rss_peak_increase_mib"] = out["peak_rss_mib"] - rss_before
    if device == "cuda":
        out["cuda_peak_increase_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return out


def proc_status(field: str) -> float:
    """A /proc/self/status memory field in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bench_memory(b: Bench) -> list[dict]:
    """Both implementations in parallel subprocesses (memory, not speed, is measured here)."""
    s = b.s
    res, procs = [], []
    for impl in ("nbexplain", "captum"):
        spec = {"impl": impl, "model": s.mem_model, "size": s.size, "device": s.device, "steps": s.mem_steps}
        procs.append((spec, subprocess.Popen(
            [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--device", s.device,
             "--_memory", json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        if s.device == "cuda":                       # one at a time on the GPU: peak stats are per process
            procs[-1] = (spec, procs[-1][1], procs[-1][1].communicate(timeout=1800))
    for item in procs:
        spec, p = item[0], item[1]
        stdout, stderr = item[2] if len(item) > 2 else p.communicate(timeout=1800)
        impl = spec["impl"]
        if p.returncode != 0:
            b.failures.append(f"memory {impl}: {stderr[-500:]}")
            res.append({"impl": impl, "error": stderr[-2000:]})
            continue
        r = json.loads(stdout.strip().splitlines()[-1])
        res.append(dict(spec, **r))
        extra = f", CUDA peak +{r['cuda_peak_increase_mib']:.0f} MiB" if "cuda_peak_increase_mib" in r else ""
        print(f"  memory IG {s.mem_steps} {s.mem_model} {impl}: chunk {r['chunk']}, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB (+{r['rss_peak_increase_mib']:.0f} over the {r['rss_before_mib']:.0f} MiB "
              f"before the call){extra}, "
              f"{r['s']:.1f} s", flush=True)
    return res


# ------------------------------------------------------------------------------------------------
# first calls (a fresh process each: what a user waits for after loading a model)
# ------------------------------------------------------------------------------------------------
FIRST_IMPLS = (("saliency", "nbexplain"), ("saliency", "captum"), ("gradcam", "nbexplain"),
               ("gradcam", "torchcam"), ("gradcam", "grad-cam"), ("gradcam (default layer)", "nbexplain"))


def first_child(spec: dict) -> dict:
    """Imports done and the model and input ready (nothing has run on them): the first and second call."""
    device, size, method, impl = spec["device"], spec["size"], spec["method"], spec["impl"]
    model = make_model(spec["model"], size, device)
    x = make_input(model, 1, size, device)
    targets, layer = [3], spec["layer"]
    if method == "saliency":
        fn = ours(model, x, "saliency", targets, 1) if impl == "nbexplain" else captum_fn(model, x, "saliency", targets, 1)
    elif impl == "nbexplain":
        fn = ours(model, x, "gradcam", targets, 1, **({} if "default" in method else {"layer": layer}))
    else:
        make = torchcam_fn if impl == "torchcam" else gradcam_fn
        fn = make(model, x, "gradcam", targets, layer, token_reshape(model, size), 1)
    times = []
    for _ in range(2):
        t = now()
        fn()
        sync(device)
        times.append(now() - t)
    return {"first_s": times[0], "second_s": times[1]}


def bench_first(b: Bench) -> list[dict]:
    """Each (model, method, implementation) in a fresh subprocess, one after another (timings)."""
    from nbexplain.layers import default_layer
    s, res = b.s, []
    for name in s.first_models:
        layer = default_layer(make_model(name, s.size, "cpu"), (1, 3, s.size, s.size)).name
        for method, impl in FIRST_IMPLS:
            spec = {"model": name, "size": s.size, "device": s.device, "method": method, "impl": impl,
                    "layer": layer}
            p = subprocess.run([sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--device",
                                s.device, "--_first", json.dumps(spec)], capture_output=True, text=True, timeout=900)
            if p.returncode != 0:
                b.failures.append(f"first call {name} {method} {impl}: {p.stderr[-500:]}")
                continue
            r = dict(spec, **json.loads(p.stdout.strip().splitlines()[-1]))
            res.append(r)
            print(f"  first call {name} {method} {impl}: {fmt_s(r['first_s'])} (second {fmt_s(r['second_s'])})",
                  flush=True)
    return res


def first_table(s: Settings, first: list[dict]) -> list[str]:
    L = ["", f"## First call after loading a model ({s.device}, batch 1, {s.size} px)", "",
         "Each implementation in a fresh process, timed from the call (imports done, model and input ready, "
         "nothing run on them yet): the one-time work (kernel set-up, nbexplain's layer probe and weights "
         "digest) is in it. Grad-CAM at the layer named in the row for everyone; the default-layer row is "
         "nbexplain choosing it (a probe forward).", "",
         "| model | method | ours first | ours second | best peer | peer first | ratio (first) | others |",
         "|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in first:
        by.setdefault((r["model"], r["method"]), {})[r["impl"]] = r
    for (model, method), impls in by.items():
        mine = impls.get("nbexplain")
        peers = {k: v["first_s"] for k, v in impls.items() if k != "nbexplain"}
        if mine is None:
            continue
        best = min(peers, key=peers.get) if peers else None
        label = f"{method} @{mine['layer']}" if method == "gradcam" else method
        others = ", ".join(f"{k} {fmt_s(v)}" for k, v in peers.items() if k != best)
        ratio = f"**{peers[best] / mine['first_s']:.2f}×**" if best else ""
        L.append(f"| {model} | {label} | {fmt_s(mine['first_s'])} | {fmt_s(mine['second_s'])} | {best or '—'} | "
                 f"{fmt_s(peers[best]) if best else ''} | {ratio} | {others} |")
    return L


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def fmt_err(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def fmt_s(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def write_report(b: Bench, info: dict, acc: list[dict], widget: dict | None, mem: list[dict]) -> None:
    s = b.s
    b.out.mkdir(parents=True, exist_ok=True)
    info = dict(info)
    info.setdefault("load_avg_end", os.getloadavg())
    info.setdefault("total_s", now() - b.t0)
    data = {"machine": info, "settings": dataclasses.asdict(s), "rows": b.rows, "skipped": b.skipped,
            "ig_accuracy": acc, "widget": widget, "memory": mem, "first_call": b.first, "failures": b.failures}
    (b.out / "bench.json").write_text(json.dumps(data, indent=1, default=str))
    L = ["# nbexplain benchmarks", ""]
    L.append(f"- machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
             f"({info['threads']} threads), device **{s.device}**"
             + (f" ({info.get('gpu')}, TF32 {'on' if info.get('tf32') else 'off'} for everyone)" if info.get("gpu") else "")
             + f"; load average {tuple(round(v, 1) for v in info['load_avg_start'])} at start, "
               f"{tuple(round(v, 1) for v in info['load_avg_end'])} at the end (shared machine: compare ratios)")
    L.append(f"- peers: captum {info.get('captum')}, grad-cam {info.get('grad_cam')}, torchcam {info.get('torchcam')}; "
             f"timm {info.get('timm')}; random weights (seed 0), eval mode; input {s.size}×{s.size} sample photos")
    L.append(f"- mode: {'quick (smoke: one run per row, tiny settings — ratios mean nothing)' if s.quick else 'full'}; "
             f"row budget {s.row_budget:.0f} s, ≤ {s.max_reps} interleaved rounds"
             + (f"; rows and accuracy in {info['workers']} worker processes of one thread each (a row's "
                "implementations always share one process)" if info.get("workers") else "")
             + f"; total {info['total_s']:.0f} s"
             + (f" (this run) + {info['merged_from'].get('total_s', 0):.0f} s (the run whose other sections were "
                "kept: `--merge`)" if info.get("merged_from") else ""))
    if s.restrict:
        L.append(f"- **CPU restriction** (2 shared cores): IG > {s.ig_steps[0]} steps, SmoothGrad > {s.sg_samples[0]} "
                 f"samples and Score-CAM run on {CHEAP} only; batch {s.batches[-1]} runs saliency and Grad-CAM on "
                 f"every model, guided backprop, Grad-CAM++, LayerCAM and IG {s.ig_steps[0]} on {CHEAP} only; "
                 "no occlusion or SmoothGrad at batch > 1. "
                 "Score-CAM uses a smaller layer than the default on CPU (named in the row). "
                 "Skipped rows are listed below the table.")
    L += ["", "## Speed at equal results", "",
          "ratio = best agreeing peer's median ÷ ours (> 1: nbexplain faster). bound = bare chunked "
          "forward+input-backward of the same evaluations; eff = bound ÷ ours (1.0 = no overhead; above 1 on CNNs: the BatchNorm passes that folding removes).", "",
          "| model | batch | method | ours | best peer | peer | ratio | bound | eff | agreement | n |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in b.rows:
        if "error" in r:
            L.append(f"| {r['model']} | {r['batch']} | {r['label']} | ERROR: {r['error'][:80]} |  |  |  |  |  |  |  |")
            continue
        med = r["median_s"]
        agree = "; ".join(f"{c['peer']} {c['metric']} {c['value']:.2g} {c['status']}" for c in r["checks"])
        others = [f"{k} {v:.2f}×" for k, v in r["ratios"].items() if k != r["best_peer"]]
        best = r["best_peer"] or "—"
        peer_t = fmt_s(med.get(r["best_peer"])) if r["best_peer"] else ""
        ratio = f"**{r['ratio']:.2f}×**" if r["ratio"] else ""
        if others:
            ratio += f" ({', '.join(others)})"
        L.append(f"| {r['model']} | {r['batch']} | {r['label']} | {fmt_s(med['nbexplain'])} | {best} | {peer_t} | "
                 f"{ratio} | {fmt_s(r.get('bound_s'))} | "
                 f"{'' if r.get('efficiency') is None else format(r['efficiency'], '.2f')} | {agree} | {r['reps']} |")
    notes = sorted({c["note"] for r in b.rows for c in r.get("checks", []) if c.get("note")})
    if notes:
        L += ["", "Notes on agreement:"] + [f"- {n}" for n in notes]
    if b.skipped:
        L += ["", "Skipped rows (not run in this mode):", ""]
        L += [f"- {r['model']} batch {r['batch']} {r['label']}: {r['why']}" for r in b.skipped]
    if acc:
        L += ["", "## Integrated Gradients at equal accuracy (|delta| ≤ 1% of |f(x) − f(baseline)|)", "",
              "captum: smallest Gauss-Legendre step count (4, 8, 16, …) that reaches the tolerance, timed at that "
              "count (a user who already knows it); ours: `steps='auto', tolerance=0.01` (includes its own search).",
              "Map error = ‖map − reference‖ / ‖reference‖ against a fine textbook-trapezoid reference (steps "
              "in the column): a 1% delta does not make a 1% map on ReLU networks (their path gradient is "
              "piecewise constant, so every rule converges slowly).",
              "", "| model | gap f(x)−f(b) | captum steps | captum | captum search total | ours auto (GL) | "
                  "ours auto (trapezoid) | ours fixed at captum's steps | ratio captum ÷ ours auto | "
                  "map error captum / ours (reference steps) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for a in acc:
            og = a["ours_gausslegendre"]
            ot = a.get("ours_riemann_trapezoid")
            L.append(f"| {a['model']} | {a['gap']:.3g} | {a['captum_steps'] or '> ' + str(s.acc_max_steps)} | "
                     f"{fmt_s(a.get('captum_median_s'))} | {fmt_s(a['captum_search_total_s'])} | "
                     f"{og['steps']} steps, {og['evaluations']} evals, {fmt_s(a.get('ours_auto_median_s', og['s']))} | "
                     + (f"{ot['steps']} steps, {ot['evaluations']} evals, {fmt_s(ot['s'])} | " if ot else "not run | ")
                     + f"{fmt_s(a.get('ours_fixed_n_star_median_s'))} | "
                     f"{'' if a.get('ratio') is None else format(a['ratio'], '.2f') + '×'} | "
                     f"{fmt_err(a.get('captum_map_error'))} / {fmt_err(a.get('ours_map_error'))} "
                     f"({a.get('reference_steps')}) |")
    if widget:
        L += ["", f"## Widget: kernel time per control change ({widget['model']}, {s.size} px, "
                  f"{s.device})", "",
              f"Opening the explorer (cold Grad-CAM with every candidate layer captured): "
              f"{widget['open_ms']:.0f} ms. Layers toggled: {widget['layers'][0]} ↔ {widget['layers'][1]}. "
              "Times are from setting the trait to `w.wait()` returning; 'stages' is the sum of the stage times "
              "the pipeline recorded.", "",
              "| control change | n | p50 | p95 | stages p50 | stages that ran | model evaluations |",
              "|---|---|---|---|---|---|---|"]
        for label, v in widget["controls"].items():
            L.append(f"| {label} | {v['n']} | {v['p50_ms']:.1f} ms | {v['p95_ms']:.1f} ms | "
                     f"{v['stage_p50_ms']:.1f} ms | {', '.join(v['ran']) or 'none (cached, or drawn in the browser)'} | "
                     f"{v['evaluations'] or ''} |")
        L += ["", "Same computations through `nbx.attribute` (best of 2, ms): " +
              ", ".join(f"{k} {v:.0f}" for k, v in widget["api_ms"].items())]
        c = widget["controls"]
        lines = []
        n1, n2 = s.widget_ig
        k1, k2 = s.widget_sg
        for a, bb in [("layer (first visit)", "cold Grad-CAM (cache cleared)"),
                      (f"IG {n1}→{n2} (refine)", f"IG cold {n2}"),
                      (f"SmoothGrad {k1}→{k2} (refine)", f"SmoothGrad cold {k2} (new seed)")]:
            if a in c and bb in c:
                lines.append(f"- {a}: {c[a]['p50_ms']:.0f} ms vs {bb}: {c[bb]['p50_ms']:.0f} ms "
                             f"→ {c[bb]['p50_ms'] / max(c[a]['p50_ms'], 1e-9):.1f}× cheaper")
        L += ["", "Incremental vs cold (p50):", ""] + lines
    if mem:
        L += ["", f"## Peak memory: IG {s.mem_steps} steps, {s.mem_model}, batch 1, chunk = auto", "",
              "A fresh subprocess per implementation (the model, the input and one forward already loaded): "
              "RSS peak = /proc VmHWM reset just before the call (ru_maxrss would carry the parent's high-water "
              "mark across fork); increase = peak − RSS before the call. CUDA: `max_memory_allocated` above the "
              "allocation before the call.", "",
              "| impl | chunk | RSS before | peak RSS | RSS increase | CUDA peak increase | time (CPU: both ran in parallel) |",
              "|---|---|---|---|---|---|---|"]
        for m in mem:
            if "error" in m:
                L.append(f"| {m['impl']} | ERROR |  |  |  |  |  |")
                continue
            cu = f"{m['cuda_peak_increase_mib']:.0f} MiB" if "cuda_peak_increase_mib" in m else "n/a"
            before = m.get("rss_before_mib")
            peak = m.get("peak_rss_mib", m.get("maxrss_after_mib"))
            L.append(f"| {m['impl']} | {m['chunk']} | {'' if before is None else format(before, '.0f') + ' MiB'} | "
                     f"{peak:.0f} MiB | {m['rss_peak_increase_mib']:.0f} MiB | {cu} | {fmt_s(m['s'])} |")
    if b.first:
        L += first_table(s, b.first)
    if b.failures:
        L += ["", "## FAILURES", ""] + [f"- {f}" for f in b.failures]
    (b.out / "bench.md").write_text("\n".join(L) + "\n")
    print(f"wrote {b.out / 'bench.md'} and {b.out / 'bench.json'}", flush=True)


# ------------------------------------------------------------------------------------------------
# worker processes (CPU): the models' rows and the accuracy section spread over the cores
# ------------------------------------------------------------------------------------------------
# a full CPU run's minutes per section on 2 cores, to balance the workers (unknown models count 4)
COST = {("rows", "resnet50"): 3.8, ("rows", "tf_efficientnet_lite0"): 5.0,
        ("rows", "deit_small_patch16_224"): 3.2, ("accuracy", "deit_small_patch16_224"): 1.5,
        ("accuracy", TRAINED): 2.5}


def split_work(row_models: list[str], acc_models: list[str], jobs: int) -> list[tuple[list[str], list[str]]]:
    """(models for rows, models for accuracy) per worker: the costliest first, each to the least loaded."""
    items = [("rows", m) for m in row_models] + [("accuracy", m) for m in acc_models]
    loads = [[0.0, [], []] for _ in range(jobs)]
    for item in sorted(items, key=lambda it: -COST.get(it, 4.0)):
        w = min(loads, key=lambda ld: ld[0])
        w[0] += COST.get(item, 4.0)
        (w[1] if item[0] == "rows" else w[2]).append(item[1])
    return [(rows, acc) for _, rows, acc in loads if rows or acc]


def run_workers(b: Bench, args, work: list[tuple[list[str], list[str]]], acc: list[dict]) -> None:
    """One process per share of the work, each with one torch thread; their rows, skips, accuracy results
    and failures are merged in the order of ``--models``."""
    procs = []
    for k, (rows, acc_models) in enumerate(work):
        out = b.out / f".worker{k}"
        sections = ",".join((["rows"] if rows else []) + (["accuracy"] if acc_models else []))
        cmd = [sys.executable, __file__, "--device", b.s.device, "--threads", "1", "--jobs", "1",
               "--out", str(out), "--sections", sections, "--models", ",".join(rows or acc_models)]
        if acc_models:
            cmd += ["--accuracy-models", ",".join(acc_models)]
        for flag, value in (("--size", args.size), ("--row-budget", args.row_budget), ("--max-reps", args.max_reps)):
            if value:
                cmd += [flag, str(value)]
        cmd += [flag for flag, on in (("--no-restrict", args.no_restrict), ("--quick", args.quick)) if on]
        print(f"worker {k}: rows {rows or '-'}, accuracy {acc_models or '-'}", flush=True)
        procs.append((out, subprocess.Popen(cmd)))
    order = {m: i for i, m in enumerate(args.models.split(","))}
    for out, p in procs:
        p.wait()
        try:
            d = json.loads((out / "bench.json").read_text())
        except (OSError, ValueError) as e:
            b.failures.append(f"worker {out.name}: exit {p.returncode}, no results ({e})")
            continue
        b.rows += d["rows"]
        b.skipped += d["skipped"]
        b.failures += d["failures"] or ([f"worker {out.name}: exit {p.returncode} (its results are partial)"]
                                        if p.returncode else [])
        acc += d["ig_accuracy"]
        shutil.rmtree(out, ignore_errors=True)
    b.rows.sort(key=lambda r: order.get(r["model"], len(order)))      # stable: each model's rows keep their order
    b.skipped.sort(key=lambda r: order.get(r["model"], len(order)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke mode: every section once, tiny settings")
    ap.add_argument("--out", default="bench-results/", help="output folder (bench.md, bench.json)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--size", type=int, default=0, help="input side (default 224; quick 64)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default: 1 on CPU, where the rows run in --jobs worker "
                         "processes instead; torch's default on CUDA)")
    ap.add_argument("--row-budget", type=float, default=0.0, help="seconds of timed rounds per row")
    ap.add_argument("--max-reps", type=int, default=0)
    ap.add_argument("--no-restrict", action="store_true", help="CPU: run every row on every model")
    ap.add_argument("--sections", default="rows,accuracy,widget,memory,first")
    ap.add_argument("--accuracy-models", default="", help="models for IG at equal accuracy (default: CPU the "
                                                          "cheapest, CUDA all)")
    ap.add_argument("--widget-model", default="")
    ap.add_argument("--merge", action="store_true", help="keep the sections of OUT/bench.json that this run skips")
    ap.add_argument("--render", action="store_true", help="only re-render OUT/bench.md from OUT/bench.json")
    ap.add_argument("--jobs", type=int, default=0,
                    help="CPU: worker processes (one torch thread each) that share the models' rows and the "
                         "accuracy section; every row still times its implementations side by side in one "
                         "process (default: one per core, at most 2; 1 on CUDA and in --quick)")
    ap.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_first", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    if args.device == "cuda":                       # equal settings: everyone in FP32 (see the docstring)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if args._memory:
        print(json.dumps(memory_child(json.loads(args._memory))))
        return 0
    if args._first:
        print(json.dumps(first_child(json.loads(args._first))))
        return 0
    if args.render:
        d = json.loads((pathlib.Path(args.out) / "bench.json").read_text())
        b = Bench(Settings(**d["settings"]), pathlib.Path(args.out))
        b.rows, b.skipped, b.failures, b.first = d["rows"], d["skipped"], d["failures"], d.get("first_call", [])
        write_report(b, d["machine"], d["ig_accuracy"], d["widget"], d["memory"])
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    s = settings_for(args)
    b = Bench(s, pathlib.Path(args.out))
    info = machine(s.device)
    print(f"machine: {info['cpu']} | {info['cores']} cores | torch {info['torch']} | threads {info['threads']} | "
          f"device {s.device}{' ' + info['gpu'] if 'gpu' in info else ''} | load {info['load_avg_start']}",
          flush=True)
    print(f"peers: captum {info.get('captum')} grad-cam {info.get('grad_cam')} torchcam {info.get('torchcam')}",
          flush=True)
    sections = set(args.sections.split(","))
    models = [m for m in args.models.split(",") if m]
    acc, widget, mem = [], None, []
    old = pathlib.Path(args.out) / "bench.json"
    if args.merge and old.exists():
        d = json.loads(old.read_text())
        if "rows" not in sections:
            b.rows, b.skipped = d["rows"], d["skipped"]
        acc = d["ig_accuracy"] if "accuracy" not in sections else acc
        widget = d["widget"] if "widget" not in sections else widget
        mem = d["memory"] if "memory" not in sections else mem
        b.first = d.get("first_call", []) if "first" not in sections else b.first
        info["merged_from"] = d["machine"]
    acc_models = [m for m in (args.accuracy_models.split(",") if args.accuracy_models else
                              (models if s.device == "cuda" and not s.quick else
                               [m for m in models if m == (CHEAP if s.quick else ACC_CPU)] or models[:1])
                              + ([TRAINED] if not s.quick and args.models == ",".join(MODELS) else [])) if m]
    jobs = args.jobs or (1 if s.device == "cuda" or s.quick else min(2, os.cpu_count() or 1))
    if jobs > 1 and sections & {"rows", "accuracy"}:
        run_workers(b, args, split_work(models if "rows" in sections else [],
                                        acc_models if "accuracy" in sections else [], jobs), acc)
        info["workers"] = jobs
        sections -= {"rows", "accuracy"}
    if "rows" in sections:
        for name in models:
            bench_model(b, name)
            write_report(b, info, acc, widget, mem)          # partial results survive a time limit
    if "accuracy" in sections:
        for name in acc_models:
            try:
                acc.append(bench_ig_accuracy(b, name))
            except Exception as e:
                b.failures.append(f"IG accuracy {name}: {type(e).__name__}: {e}")
    if "widget" in sections:
        try:
            widget = bench_widget(b)
        except Exception as e:
            import traceback
            traceback.print_exc()
            b.failures.append(f"widget: {type(e).__name__}: {e}")
    if "memory" in sections:
        mem = bench_memory(b)
    if "first" in sections:
        b.first = bench_first(b)
    write_report(b, info, acc, widget, mem)
    if b.failures:
        print("FAILURES:\n  " + "\n  ".join(b.failures), flush=True)
        return 1
    print(f"done in {now() - b.t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
