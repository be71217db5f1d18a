"""The GPU path: every method runs on the model's CUDA device and agrees with the CPU result.

Runs only where CUDA is available (the project's device runs); CPU-only machines skip it.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import nbexplain as nbx
from nbexplain.hygiene import hook_count

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PARAMS = {"integrated_gradients": {"steps": 16}, "smoothgrad": {"samples": 8}, "smoothgrad_sq": {"samples": 8},
          "vargrad": {"samples": 8}, "occlusion": {"patch": 32, "stride": 16}}


@pytest.mark.parametrize("arch", ["resnet18", "deit_tiny_patch16_224"])
def test_every_method_on_cuda_matches_cpu(arch):
    torch.manual_seed(0)
    cpu = timm.create_model(arch, pretrained=False).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 3, 224, 224)
    vit = "deit" in arch
    if not vit:                                  # batched passes fold BatchNorm on CUDA too
        from nbexplain.hygiene import borrowed
        from nbexplain.speed import plan
        with borrowed(gpu):
            assert plan(gpu, x.cuda()).pairs
    for spec in nbx.methods():
        name = spec["name"]
        if spec["vit_only"] and not vit:
            continue
        if name == "scorecam" and vit:
            continue                                                # 192 channels x 2 images: slow, same code
        a = nbx.attribute(cpu, x, name, target=[1, 2], **PARAMS.get(name, {}))
        b = nbx.attribute(gpu, x, name, target=[1, 2], **PARAMS.get(name, {}))
        assert b[0].meta["device"].startswith("cuda")
        for ea, eb in zip(a, b):
            scale = ea.raw.abs().max().clamp_min(1e-6)
            err = float((ea.raw - eb.raw).abs().max() / scale)
            assert err < 5e-3, (name, err)            # FP32 (TF32 off during attribution; it gave 7e-2)
    assert hook_count(gpu) == 0 and not gpu.training and all(p.grad is None for p in gpu.parameters())
    assert torch.backends.cudnn.allow_tf32                          # the user's global flag is restored


def test_auto_batch_size_uses_the_gpu_memory():
    from nbexplain.api import auto_batch_size
    x = torch.zeros(1, 3, 224, 224, device="cuda")
    assert auto_batch_size(x, x.device) >= 8


def test_a_gpu_models_digest_sees_edits_through_data_and_matches_its_cpu_copy():
    """A GPU's weights are summed in chunks queued by the calling thread (``digest.queue_sums``): the same
    values give the same key on every read, an edit through ``.data`` (a sign flip keeps every norm) moves
    it, and the provenance's sha256 is the CPU copy's."""
    from nbexplain.digest import module_tensors, value_fingerprint, weights_digest
    torch.manual_seed(0)
    cpu = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    gpu = copy.deepcopy(cpu).cuda()
    tensors = module_tensors(gpu)
    key = value_fingerprint(tensors)
    assert all(value_fingerprint(tensors) == key for _ in range(5))
    assert weights_digest(gpu) == weights_digest(cpu)
    gpu.layer2[0].conv2.weight.data[3].neg_()
    assert value_fingerprint(tensors) != key and weights_digest(gpu) != weights_digest(cpu)


def test_occlusion_on_a_gpu_runs_whole_images_not_crops(monkeypatch):
    """Occlusion's crop path (``incremental``) launches many small kernels per window: on a GPU it cost 15x
    the whole images (EfficientNet-Lite0, batch 8), so a CUDA input never builds it, and the map is the
    CPU's."""
    from nbexplain import context, incremental
    for module in (context, incremental):
        monkeypatch.setattr(module, "Occluded", lambda *a, **k: pytest.fail("crops built on a GPU"))
    torch.manual_seed(0)
    cpu = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 3, 96, 96)
    b = nbx.attribute(gpu, x.cuda(), "occlusion", target=[1, 2], patch=24, stride=12)
    monkeypatch.undo()
    a = nbx.attribute(cpu, x, "occlusion", target=[1, 2], patch=24, stride=12)
    for ea, eb in zip(a, b):
        assert float((ea.raw - eb.raw).abs().max() / ea.raw.abs().max()) < 5e-3
