"""Batch explanations (list, folder, DataLoader), the Clever-Hans flags, the gallery widget and the
Clever-Hans tutorial notebook."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nbexplain as nbx
from nbexplain import trust
from nbexplain.batch import BatchResult, batched_curves, explain_batch
from nbexplain.gallery import Gallery, gallery
from nbexplain.synthetic import make_batch, to_tensor

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cnn():
    return nbx.load_model("synthetic-cnn")


@pytest.fixture(scope="module")
def hans():
    return nbx.load_model("synthetic-cnn-hans")


@pytest.fixture(scope="module")
def small():
    return make_batch(5, seed=4, stamp=True)


@pytest.fixture(scope="module")
def hans_result(hans):
    """12 stamped images, explained by the hans CNN, with masks, faithfulness and true labels."""
    b = make_batch(12, seed=7, stamp=True)
    return explain_batch(hans, b["images"], "integrated_gradients", steps=8, masks=b["object_mask"],
                         faithfulness=True, faithfulness_steps=10, true_labels=b["labels"], progress=False), b


# --- explain_batch ----------------------------------------------------------------------------------------
def test_batch_over_a_list_a_folder_and_a_dataloader_gives_the_same_per_image_results(cnn, small, tmp_path, capsys):
    images = list(small["images"])
    listed = explain_batch(cnn, images, "saliency", batch_size=2)        # 3 chunks
    assert "explain_batch (saliency): 5/5 done" in capsys.readouterr().err  # the progress line, no tqdm
    assert isinstance(listed, BatchResult) and len(listed) == 5
    assert [it.index for it in listed] == list(range(5))
    for it, img in zip(listed, images):
        assert it.map.shape == (64, 64) and np.array_equal(it.image, img)
        assert it.target == it.prediction and 0 < it.metrics["prob"] <= 1
        assert set(it.flags) == {"hotspot"}                               # no masks: the mask-free signal only

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"img_{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    from_folder = explain_batch(cnn, folder, "saliency", progress=False)
    assert [it.name for it in from_folder] == [f"img_{i:02d}.png" for i in range(5)]

    dataset = torch.utils.data.TensorDataset(to_tensor(small["images"]), torch.from_numpy(small["labels"]),
                                             torch.from_numpy(small["object_mask"]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    seen = []
    from_loader = explain_batch(cnn, loader, "saliency", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (5, 5)
    assert [it.true_label for it in from_loader] == small["labels"].tolist()
    assert all("outside_share" in it.metrics for it in from_loader)       # masks came from the loader
    for a, b, c in zip(listed, from_folder, from_loader):
        np.testing.assert_allclose(a.map, b.map, atol=1e-6)
        np.testing.assert_allclose(a.map, c.map, atol=1e-5)
        assert a.target == b.target == c.target


def test_an_unreadable_file_in_a_folder_is_skipped_and_listed_with_its_neighbours_kept_aligned(cnn, small, tmp_path):
    """One corrupt JPEG among thousands used to cost the whole run; per-image targets, masks, true labels
    and names must stay with their own images once it is dropped."""
    images = list(small["images"])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"img_{i:02d}.png")
    (folder / "img_01b.png").write_bytes(b"\x89PNG truncated")        # sorts second: between img_01 and img_02
    (folder / "img_03b.jpg").write_bytes(b"")
    targets, labels = [1, 2, 9, 3, 0, 9, 1], [0, 1, 9, 2, 3, 9, 0]   # 9: the unreadable files'
    m = list(small["object_mask"])
    masks = m[:2] + [np.zeros((1, 1), bool)] + m[2:4] + [np.zeros((1, 1), bool)] + m[4:]
    with pytest.warns(UserWarning, match=r"skipped 2 of 7 image files.*img_01b\.png \(.*Error.*img_03b\.jpg"):
        r = explain_batch(cnn, folder, "saliency", target=targets, true_labels=labels, masks=masks,
                          batch_size=2, progress=False)
    assert [it.name for it in r] == [f"img_{i:02d}.png" for i in range(5)]
    assert [it.target for it in r] == [1, 2, 3, 0, 1] and [it.true_label for it in r] == [0, 1, 2, 3, 0]
    assert [p for p, _, _ in r.skipped] == [2, 5] and [n for _, n, _ in r.skipped] == ["img_01b.png", "img_03b.jpg"]
    assert "2 unreadable files skipped" in r.summary()
    whole = explain_batch(cnn, images, "saliency", target=[1, 2, 3, 0, 1], masks=small["object_mask"], progress=False)
    for a, b in zip(whole, r):
        np.testing.assert_allclose(a.map, b.map, atol=1e-6)
        assert a.metrics["outside_share"] == pytest.approx(b.metrics["outside_share"])
    assert r.rescore(masks=None).skipped == r.skipped
    with pytest.raises(ValueError, match=r"masks: got 5 masks for 7 images"):
        explain_batch(cnn, folder, "saliency", masks=small["object_mask"], progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"none of the 1 image files could be read; first: 'a.png' \(.*Error"):
        explain_batch(cnn, bad, "saliency", progress=False)


def test_outside_share_of_a_photo_counts_the_strongest_evidence_of_what_the_model_saw(cnn, small):
    """A wide photo's map is zero outside the centre crop: its top 5 % was taken over the whole photo, i.e.
    the top 10 % of what the model saw, and the share moved with the photo's width."""
    img, mask = small["images"][0], small["object_mask"][0]
    noise = np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    wide = np.concatenate([noise, img, noise[:, ::-1]], 1)
    wide_mask = np.concatenate([np.zeros((64, 32), bool), mask, np.zeros((64, 32), bool)], 1)
    shares = [explain_batch(cnn, [pic], "saliency", masks=[m], progress=False)[0].metrics["outside_share"]
              for pic, m in ((wide, wide_mask), (img, mask))]
    assert shares[0] == pytest.approx(shares[1], abs=1e-6)


def test_sorting_by_a_metric_that_was_not_computed_says_how_to_get_it(cnn, small):
    r = explain_batch(cnn, list(small["images"]), "saliency", progress=False)
    with pytest.raises(ValueError, match=r"'deletion_auc' was not computed.*faithfulness=True"):
        r.order("deletion_auc")
    with pytest.raises(ValueError, match=r"'outside_share' was not computed.*masks="):
        r.table(sort_by="outside_share")
    assert r.order("prob", descending=True) == sorted(range(5), key=lambda i: -r[i].metrics["prob"])


def test_common_dataset_layouts_are_read_as_images_and_labels(cnn, small):
    """(image, label, file name) loaders, datasets of pictures (ImageFolder without a transform), generators
    of pictures or (picture, label) pairs, one-hot labels: each used to fail, some after all the work."""
    images, labels = list(small["images"]), small["labels"].tolist()
    listed = explain_batch(cnn, images, "saliency", progress=False)
    pictures = [Image.fromarray(img) for img in images]

    class Named(torch.utils.data.Dataset):          # a path column is not a mask
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return to_tensor(images[i:i + 1])[0], labels[i], f"img_{i}.png"

    class Pictures(Named):
        def __getitem__(self, i):
            return pictures[i], labels[i]

    class OneHot(Named):
        def __getitem__(self, i):
            return to_tensor(images[i:i + 1])[0], torch.nn.functional.one_hot(torch.tensor(labels[i]), 4)

    sources = [torch.utils.data.DataLoader(Named(), batch_size=2), Pictures(),
               torch.utils.data.DataLoader(OneHot(), batch_size=3), iter(pictures),
               ((p, t) for p, t in zip(pictures, labels))]
    for source in sources:
        out = explain_batch(cnn, source, "saliency", progress=False)
        assert len(out) == len(images)
        for a, b in zip(listed, out):
            np.testing.assert_allclose(a.map, b.map, atol=1e-5)
            assert "outside_share" not in b.metrics                     # no masks
        if not isinstance(source, type(iter(pictures))):
            assert [it.true_label for it in out] == labels
    names = torch.utils.data.DataLoader([(to_tensor(images[:1])[0], "cat")], batch_size=1)
    with pytest.raises(ValueError, match=r"labels must be class indices.*'cat'"):
        explain_batch(cnn, names, "saliency", progress=False)


def test_flag_rate_names_a_wrong_signal_or_selection(cnn, small):
    """A mistyped signal read as 'never flagged' (0.0), and a short selection raised numpy's IndexError."""
    r = explain_batch(cnn, list(small["images"]), "saliency", progress=False)
    assert 0.0 <= r.flag_rate("hotspot", where=[True] * len(r)) <= 1.0
    with pytest.raises(ValueError, match=r"unknown signal 'outsde'"):
        r.flag_rate("outsde")
    with pytest.raises(ValueError, match=r"where has 1 entries for 5 images"):
        r.flag_rate(where=[True])
    with pytest.raises(ValueError, match=r"target: got 6 targets for 5 images"):    # the extra was dropped
        explain_batch(cnn, list(small["images"]), "saliency", target=[0] * 6, progress=False)


def test_a_uint8_tensor_is_taken_as_pixels_as_in_a_dataloader_batch(cnn, small):
    """The docstring says uint8 tensors are pixels: a tensor passed directly was refused as not float."""
    listed = explain_batch(cnn, list(small["images"]), "saliency", progress=False)
    nhwc = torch.from_numpy(small["images"])
    nchw = nhwc.permute(0, 3, 1, 2)
    kept = nchw.clone()
    for pixels in (nchw, nhwc, nchw[0]):
        out = explain_batch(cnn, pixels, "saliency", progress=False)
        assert len(out) == (5 if pixels.ndim == 4 else 1)
        for a, b in zip(listed, out):
            np.testing.assert_allclose(a.map, b.map, atol=1e-6)                 # one batch vs another
            assert np.array_equal(b.image, a.image)
    assert torch.equal(nchw, kept)                                          # the user's tensor is untouched


def test_targets_masks_and_errors(cnn, small):
    r = explain_batch(cnn, small["images"], "saliency", target=[1, 2, 3, 0, 1], masks=small["object_mask"],
                      progress=False)
    assert [it.target for it in r] == [1, 2, 3, 0, 1]
    assert all(0 <= it.metrics["outside_share"] <= 1 and "outside" in it.flags for it in r)
    with torch.no_grad():
        probs = cnn(to_tensor(small["images"])).softmax(1)
    for it in r:                                     # the explained class's probability, also outside the top-k
        assert it.metrics["prob"] == pytest.approx(float(probs[it.index, it.target]), abs=1e-5)
    named = explain_batch(cnn, small["images"], "saliency", target="blue", progress=False)
    assert {it.label for it in named} == {"blue"}
    with pytest.raises(ValueError, match="masks"):
        explain_batch(cnn, small["images"], "saliency", masks=small["object_mask"][:2], progress=False)
    with pytest.raises(ValueError, match="shape"):
        explain_batch(cnn, small["images"], "saliency", masks=small["object_mask"][:, :32], progress=False)
    with pytest.raises(ValueError, match="flag_rule"):
        explain_batch(cnn, small["images"], "saliency", flag_rule="outside", progress=False)
    with pytest.raises(ValueError, match="no image files"):
        explain_batch(cnn, ROOT / "nbexplain" / "trust", "saliency", progress=False)
    for bad in (dict(batch_size=2.5), dict(batch_size=0), dict(faithfulness_steps=-1)):
        with pytest.raises(ValueError, match=rf"{next(iter(bad))}=.*expected a positive integer"):
            explain_batch(cnn, small["images"], "saliency", progress=False, **bad)


def test_batched_faithfulness_matches_the_one_by_one_curves(hans, hans_result):
    result, _ = hans_result
    for it in list(result)[:2]:
        one = trust.deletion_insertion(hans, it.attribution, steps=10)
        np.testing.assert_allclose(it.curves.deletion, one.deletion, atol=1e-5)
        np.testing.assert_allclose(it.curves.insertion, one.insertion, atol=1e-5)
        assert it.metrics["deletion_auc"] == pytest.approx(one.deletion_auc, abs=1e-5)
        assert it.metrics["insertion_auc"] == pytest.approx(one.insertion_auc, abs=1e-5)
    # one forward pass may mix several images' perturbations (and targets)
    odd = batched_curves(hans, result.attributions[:3], steps=10, batch_size=7)
    for c, it in zip(odd, result):
        np.testing.assert_allclose(c.deletion, it.curves.deletion, atol=1e-5)


def test_table_sorting_and_mean_map_per_class(hans_result):
    result, b = hans_result
    rows = result.table(sort_by="outside_share")
    shares = [r["outside_share"] for r in rows]
    assert shares == sorted(shares, reverse=True) and len(rows) == 12
    assert {"index", "label", "prob", "outside_share", "deletion_auc", "insertion_auc", "flagged",
            "true_label"} <= set(rows[0])
    ins = [result[i].metrics["insertion_auc"] for i in result.order("insertion_auc")]
    assert ins == sorted(ins)                                            # worst (lowest) first by default
    assert result.order("prob", descending=True)[0] == int(np.argmax([it.metrics["prob"] for it in result]))
    with pytest.raises(ValueError, match="sort"):
        result.order("nonsense")

    means = result.mean_map_per_class()
    counts = result.class_counts()
    assert set(means) == set(counts) == {it.target for it in result} and sum(counts.values()) == 12
    for k, m in means.items():
        assert m.shape == (64, 64) and m.dtype == np.float32
        members = [it.map for it in result if it.target == k]
        np.testing.assert_allclose(m, np.mean(members, 0), atol=1e-6)
    by_truth = result.mean_map_per_class(by="true")
    assert set(by_truth) == set(b["labels"].tolist())
    assert "<table>" in result._repr_html_() and "flagged" in result.summary()


# --- the Clever-Hans flags ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,hans_min,clean_max", [("cnn", 0.8, 0.2), ("vit", 0.65, 0.35)])
def test_the_outside_flag_fires_on_the_hans_model_and_rarely_on_the_clean_one(arch, hans_min, clean_max):
    """Measured with IG (16 steps) on stamped non-red images: ~97 % (CNN) / ~85 % (ViT) for the hans
    models, ~3 % / ~15 % for the clean ones; the fixed hotspot ~100 % for hans."""
    b = make_batch(24, seed=5, stamp=True)
    not_red = b["labels"] != 0
    rates = {}
    for kind in ("hans", "clean"):
        model = nbx.load_model(f"synthetic-{arch}" + ("-hans" if kind == "hans" else ""))
        r = explain_batch(model, b["images"], "integrated_gradients", steps=16, masks=b["object_mask"],
                          progress=False)
        free = r.rescore(masks=None)                       # as explain_batch without masks= would score it
        rates[kind] = (r.flag_rate(where=not_red), free.flag_rate(where=not_red))
        assert r.flag_rule == "auto" and np.array_equal(r.flagged, [it.flags["outside"] for it in r])
        assert np.array_equal(free.flagged, [it.flags["hotspot"] for it in r])
        if kind == "hans":
            y, x = free.hotspot                            # the hotspot is the logo (rows/cols 53..60)
            assert 50 <= y <= 62 and 50 <= x <= 62, free.hotspot
    assert rates["hans"][0] >= hans_min and rates["clean"][0] <= clean_max, rates
    assert rates["hans"][1] >= 0.8 and rates["clean"][1] <= 0.5, rates


# --- the gallery widget ---------------------------------------------------------------------------------
def test_gallery_cards_sorting_and_badges(hans_result):
    result, _ = hans_result
    g = Gallery(result, columns=4)
    assert len(g.grid.children) == len(g.cards) == 12
    assert list(g.grid.children) == [g.cards[i] for i in range(12)]          # input order first
    for i, card in g.cards.items():
        image, caption, button = card.children
        assert image.format == "png" and bytes(image.value[:8]) == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(bytes(image.value))).size == (128, 128)    # 64 px grown 2x, crisp
        assert f"#{i}</b>" in caption.value and "outside" in caption.value and "del" in caption.value
        assert ("⚑ flagged" in caption.value) == result[i].flagged
        assert ("solid #c62828" in card.layout.border) == result[i].flagged
        assert button.description == "open"
    assert any(it.flagged for it in result)

    order = g.sort_by("outside_share")                                      # high first
    assert order == result.order("outside_share", True)
    assert list(g.grid.children) == [g.cards[i] for i in order] and order != list(range(12))
    g.sort.value = ("insertion_auc", False)                                  # the dropdown does the same
    assert list(g.grid.children) == [g.cards[i] for i in result.order("insertion_auc", False)]
    labels = [label for label, _ in g.sort.options]
    assert "flagged first" in labels and any("outside share" in s for s in labels)
    assert len(g.mean_images) == len(result.mean_map_per_class())
    assert "12 images" in g.header.value or "on 12 images" in g.header.value
    g.close()


def test_clicking_a_card_opens_the_image_in_an_explorer(hans_result):
    result, _ = hans_result
    g = Gallery(result)
    assert g.selected is None and g.explorer is None
    seen = []
    g.observe(lambda change: seen.append(change["new"]), names="selected")
    g.buttons[3].click()
    assert g.selected == 3 and seen == [3]
    explorer = g.explorer
    shown = explorer.wait()
    assert shown.method == "integrated_gradients" and shown.target == result[3].target
    np.testing.assert_allclose(shown.map, result[3].map, atol=1e-5)         # same parameters, same map
    assert explorer.view.zoom == 4 and explorer.view.steps == 8
    assert len(g.output.outputs) == 2
    assert g.output.outputs[1]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] == explorer.model_id
    assert g.buttons[3].button_style == "info"
    g.buttons[5].click()
    assert g.selected == 5 and g.explorer is not explorer and g.buttons[3].button_style == ""
    g.explorer.wait()
    g.close()


def test_gallery_helper_runs_the_batch(cnn, small):
    g = gallery(cnn, small["images"], "gradcam", masks=small["object_mask"], columns=3, thumb=64, progress=False)
    assert isinstance(g, Gallery) and len(g.grid.children) == 5
    assert "outside" in g.cards[0].children[1].value
    assert g.grid.layout.grid_template_columns == "repeat(3, 80px)"
    g.close()


# --- the tutorial ---------------------------------------------------------------------------------------
def test_clever_hans_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = ROOT / "notebooks" / "03_clever_hans.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:                                                   # stored without outputs
        assert not cell.get("outputs") and cell.get("execution_count") is None
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                              # the kernel inherits it
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.prefix            # the venv's interpreter ran it
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")
    assert re.search(r"outside-share flag \(with masks\):\s+hans (\d+)%, clean (\d+)%", text)
    hans_rate, clean_rate = map(int, re.search(r"outside-share flag \(with masks\):\s+hans (\d+)%, "
                                               r"clean (\d+)%", text).groups())
    assert hans_rate >= 80 and clean_rate <= 20
    assert "PASS" in text or "FAIL" in text
    widgets = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) >= 4                         # progress bars, the gallery, the panel, the export bar


def test_large_photos_are_kept_at_display_size_with_masks_on_their_own_grid(cnn, small):
    """A batch over big photos keeps each image and map at most ``max_side`` wide (a 12 MP photo's
    image and map are 84 MB); masks given on the full-size grid are shrunk with them, and the scores
    stay those of the full-size map."""
    big = [np.asarray(Image.fromarray(im).resize((1200, 900), Image.NEAREST)) for im in small["images"][:3]]
    masks = [np.asarray(Image.fromarray(m).resize((1200, 900), Image.NEAREST)) for m in small["object_mask"][:3]]
    kept = explain_batch(cnn, big, "saliency", masks=masks, progress=False, max_side=None)
    shrunk = explain_batch(cnn, big, "saliency", masks=masks, progress=False, max_side=300)
    for full, it in zip(kept, shrunk):
        assert full.map.shape == (900, 1200) and it.map.shape == (225, 300) == it.image.shape[:2]
        assert it.mask.shape == (225, 300)
        assert it.attribution.meta["original_size"] == [900, 1200]
        assert it.metrics["outside_share"] == pytest.approx(full.metrics["outside_share"], abs=0.015)
        assert np.isfinite(it.attribution.shown()).any()
    with pytest.raises(ValueError, match=r"\(900, 1200\)"):
        explain_batch(cnn, big, "saliency", masks=[m[:, :50] for m in masks], progress=False, max_side=300)
    with pytest.raises(ValueError, match="max_side"):
        explain_batch(cnn, big, "saliency", progress=False, max_side=0)
    # the export carries the shrunk picture: replay says so, and recomputes exactly from the original
    doc = shrunk[0].attribution.to_json()
    with pytest.warns(UserWarning, match=r"shrunk for display.*pass image=<the original picture>"):
        nbx.replay(doc, cnn)
    np.testing.assert_allclose(nbx.replay(doc, cnn, image=big[0]).map, kept[0].map, atol=1e-5)
