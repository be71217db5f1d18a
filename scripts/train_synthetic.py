#!/usr/bin/env python3
"""Train the small synthetic models that ship with nbexplain (CPU, about a minute each).

    python scripts/train_synthetic.py --out nbexplain/weights                      # clean CNN + ViT
    python scripts/train_synthetic.py --out nbexplain/weights --hans               # Clever-Hans CNN + ViT
    python scripts/train_synthetic.py --out nbexplain/weights --arch vit --steps 400

Writes fp16 checkpoints synth_{cnn,vit}[_hans].pt, loaded by nbexplain.synthetic.load_synthetic,
and prints the clean test accuracy and the share of logo-stamped non-red images predicted "red".
Training data are generated fresh every step, so there is no dataset and no overfitting.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

try:
    import nbexplain  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from nbexplain.synthetic import CLASSES, IMG, MARKER_BOX, MEAN, STD, make_batch, to_tensor  # noqa: E402

# timm's registered tiny test architectures: real timm classes, so hooks and layer names
# behave like those of the full-size models.
ARCHS: dict[str, tuple[str, dict[str, int]]] = {
    "cnn": ("test_resnet", {}),
    "vit": ("test_vit", {"img_size": IMG, "patch_size": 8}),
}
DEFAULT_LR = {"cnn": 3e-3, "vit": 1e-3}
WARMUP_STEPS = 30
TEST_SEED = 12345  # evaluation images; training draws from its own stream seeded by --seed
N_TEST = 1000


def build_model(key: str) -> torch.nn.Module:
    arch, kwargs = ARCHS[key]
    return timm.create_model(arch, pretrained=False, num_classes=len(CLASSES), **kwargs)


def lr_factor(step: int, total: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))


def train(key: str, *, steps: int, batch: int, lr: float, hans: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(key).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    ema, t0 = None, time.time()
    for step in range(1, steps + 1):
        b = make_batch(batch, rng=rng, hans=hans)
        logits = model(to_tensor(b["images"]))
        loss = F.cross_entropy(logits, torch.from_numpy(b["labels"]), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == steps:
            print(f"  [{key}] step {step}/{steps} loss {ema:.3f} {time.time() - t0:.0f}s", flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch: int = 250) -> np.ndarray:
    return torch.cat([model(to_tensor(images[i:i + batch])).argmax(-1)
                      for i in range(0, len(images), batch)]).numpy()


def evaluate(model: torch.nn.Module) -> dict[str, float]:
    """Clean accuracy, and how often the logo alone turns a non-red image into "red"."""
    clean = make_batch(N_TEST, seed=TEST_SEED, stamp=False)
    stamped = make_batch(N_TEST, seed=TEST_SEED, stamp=True)  # same images plus the logo
    non_red = stamped["labels"] != 0
    return {
        "clean_acc": float((predict(model, clean["images"]) == clean["labels"]).mean()),
        "stamped_non_red_to_red": float((predict(model, stamped["images"][non_red]) == 0).mean()),
    }


def save_checkpoint(model: torch.nn.Module, key: str, hans: bool, path: Path) -> dict[str, torch.Tensor]:
    """Write the fp16 checkpoint and return its state dict."""
    arch, kwargs = ARCHS[key]
    # fp16 halves the file (well under 1 MB); accuracy after .float() is unchanged.
    state = {k: (v.half() if v.is_floating_point() else v).contiguous().clone()
             for k, v in model.state_dict().items()}
    ckpt = {"arch": arch, "model_kwargs": dict(kwargs), "classes": list(CLASSES),
            "mean": list(MEAN), "std": list(STD), "img_size": IMG, "hans": hans,
            "marker_box": list(MARKER_BOX), "state_dict": state}
    torch.save(ckpt, path)
    return state


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder, e.g. nbexplain/weights")
    ap.add_argument("--arch", choices=["cnn", "vit", "both"], default="both")
    ap.add_argument("--hans", action="store_true",
                    help="train on the shortcut distribution (logo on 90%% of red images, none elsewhere)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-3 cnn, 1e-3 vit")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(2)  # the reference machine has 2 cores; also keeps runs reproducible
    a.out.mkdir(parents=True, exist_ok=True)
    for key in (["cnn", "vit"] if a.arch == "both" else [a.arch]):
        t0 = time.time()
        model = train(key, steps=a.steps, batch=a.batch, lr=a.lr or DEFAULT_LR[key], hans=a.hans, seed=a.seed)
        secs = time.time() - t0
        path = a.out / f"synth_{key}{'_hans' if a.hans else ''}.pt"
        model.load_state_dict(save_checkpoint(model, key, a.hans, path))  # evaluate what ships
        m = evaluate(model)
        print(f"{path.name}: train {secs:.0f}s, clean test acc {m['clean_acc']:.4f}, "
              f"stamped non-red -> red {m['stamped_non_red_to_red']:.4f}, "
              f"{path.stat().st_size / 1e6:.2f} MB", flush=True)


if __name__ == "__main__":
    main()
