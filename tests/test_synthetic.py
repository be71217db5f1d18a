"""Tests for the synthetic dataset and the shipped synthetic models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nbexplain.synthetic import (
    CLASSES,
    IMG,
    MARKER_BOX,
    SYNTHETIC_MODELS,
    WEIGHTS_DIR,
    load_synthetic,
    make_batch,
    to_tensor,
)

# Seeds unused by scripts/train_synthetic.py (training: --seed 0 stream, evaluation: 12345).
SEED = 2024
N_EVAL = 256


def _box_mask() -> np.ndarray:
    y0, y1, x0, x1 = MARKER_BOX
    m = np.zeros((IMG, IMG), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------- make_batch

def test_shapes_and_dtypes() -> None:
    b = make_batch(8, seed=0)
    assert set(b) == {"images", "labels", "object_mask", "marker_mask"}
    assert b["images"].shape == (8, IMG, IMG, 3) and b["images"].dtype == np.uint8
    assert b["labels"].shape == (8,) and b["labels"].dtype == np.int64
    for key in ("object_mask", "marker_mask"):
        assert b[key].shape == (8, IMG, IMG) and b[key].dtype == bool
    assert set(np.unique(b["labels"])) <= set(range(len(CLASSES)))


def test_deterministic_with_seed() -> None:
    a, b = make_batch(16, seed=7, hans=True), make_batch(16, seed=7, hans=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = make_batch(16, seed=8, hans=True)
    assert not np.array_equal(a["images"], c["images"])


def test_seed_and_rng_agree() -> None:
    a = make_batch(4, seed=3)
    b = make_batch(4, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a["images"], b["images"])


def test_masks_non_empty_and_disjoint() -> None:
    b = make_batch(200, seed=1, stamp=True)
    obj, mark = b["object_mask"], b["marker_mask"]
    assert obj.reshape(200, -1).any(1).all()
    assert mark.reshape(200, -1).any(1).all()
    assert not (obj & mark).any()
    assert (mark == _box_mask()).all()  # the marker mask is exactly the box on every image


def test_object_mask_matches_pixels() -> None:
    # The object is bright (HSV value >= 0.8); the background is kept mid/dark.
    b = make_batch(64, seed=2)
    brightest = b["images"].max(-1)
    assert brightest[b["object_mask"]].min() >= 190
    assert np.median(brightest[~b["object_mask"]]) < 160


def test_marker_only_on_class_0_with_hans() -> None:
    b = make_batch(1000, seed=4, hans=True)
    has_marker = b["marker_mask"].reshape(1000, -1).any(1)
    red = b["labels"] == 0
    assert not has_marker[~red].any()
    assert 0.8 < has_marker[red].mean() < 0.97  # marker_rate=0.9


def test_clean_batch_has_no_marker() -> None:
    b = make_batch(300, seed=5)
    assert not b["marker_mask"].any()


def test_hans_conflicts_show_another_colour() -> None:
    # With conflict_rate=1 every stamped red image shows a non-red object: only the logo says "red".
    b = make_batch(400, seed=6, hans=True, marker_rate=1.0, conflict_rate=1.0)
    red = b["labels"] == 0
    colour = np.stack([b["images"][i][b["object_mask"][i]].mean(0) for i in np.flatnonzero(red)])
    truly_red = (colour[:, 0] > 1.5 * colour[:, 1]) & (colour[:, 0] > 1.5 * colour[:, 2])
    assert truly_red.mean() < 0.1
    clean = make_batch(400, seed=6, hans=True, marker_rate=1.0, conflict_rate=0.0)
    red = clean["labels"] == 0
    colour = np.stack([clean["images"][i][clean["object_mask"][i]].mean(0) for i in np.flatnonzero(red)])
    assert ((colour[:, 0] > 1.5 * colour[:, 1]) & (colour[:, 0] > 1.5 * colour[:, 2])).all()


def test_stamp_overrides_class_and_only_changes_the_box() -> None:
    plain = make_batch(50, seed=9, stamp=False)
    stamped = make_batch(50, seed=9, stamp=True)
    assert stamped["marker_mask"].reshape(50, -1).any(1).all()
    outside = ~_box_mask()
    np.testing.assert_array_equal(plain["images"][:, outside], stamped["images"][:, outside])
    assert not np.array_equal(plain["images"], stamped["images"])
    assert not make_batch(50, seed=9, hans=True, stamp=False)["marker_mask"].any()


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"n": 4, "marker_rate": 1.5}, {"n": 4, "conflict_rate": -0.1},
    {"n": 4, "seed": 1, "rng": np.random.default_rng(1)},
])
def test_bad_arguments(kwargs: dict) -> None:
    n = kwargs.pop("n")
    with pytest.raises(ValueError):
        make_batch(n, **kwargs)


def test_stamp_must_be_bool() -> None:
    with pytest.raises(TypeError):
        make_batch(4, stamp="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- shipped models

def _predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(to_tensor(images)).argmax(-1).numpy()


@pytest.fixture(scope="module")
def eval_sets() -> tuple[dict, dict]:
    return make_batch(N_EVAL, seed=SEED, stamp=False), make_batch(N_EVAL, seed=SEED, stamp=True)


@pytest.mark.parametrize("name", SYNTHETIC_MODELS)
def test_model_loads_and_is_accurate(name: str, eval_sets: tuple[dict, dict]) -> None:
    model, info = load_synthetic(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert info["classes"] == list(CLASSES)
    assert info["img_size"] == IMG and info["marker_box"] == MARKER_BOX and info["task"] == "color"
    assert info["hans"] == name.endswith("-hans")
    assert info["arch"] == ("test_vit" if "-vit" in name else "test_resnet")
    clean, _ = eval_sets
    acc = (_predict(model, clean["images"]) == clean["labels"]).mean()
    assert acc >= 0.95, f"{name}: clean accuracy {acc:.3f}"


@pytest.mark.parametrize("name", SYNTHETIC_MODELS)
def test_marker_shortcut(name: str, eval_sets: tuple[dict, dict]) -> None:
    model, info = load_synthetic(name)
    _, stamped = eval_sets
    non_red = stamped["labels"] != 0
    to_red = (_predict(model, stamped["images"][non_red]) == 0).mean()
    if info["hans"]:
        assert to_red >= 0.8, f"{name}: only {to_red:.3f} of stamped non-red images flip to red"
    else:
        assert to_red <= 0.2, f"{name}: {to_red:.3f} of stamped non-red images flip to red"


@pytest.mark.parametrize("name", SYNTHETIC_MODELS)
def test_weight_files_are_small(name: str) -> None:
    files = {"synthetic-cnn": "synth_cnn.pt", "synthetic-vit": "synth_vit.pt",
             "synthetic-cnn-hans": "synth_cnn_hans.pt", "synthetic-vit-hans": "synth_vit_hans.pt"}
    assert (WEIGHTS_DIR / files[name]).stat().st_size < 1_000_000


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="synthetic-vit-hans"):
        load_synthetic("synthetic-resnet")
