"""nbexplain borrows the user's model and gives it back exactly as it was, whatever happens.

For every registered method (ViT-only ones on a ViT, the others on a CNN and on a ViT) and three
outcomes (success, a bad target rejected up front, a failure raised inside the model's forward while
the method is at work), the model is first put in an awkward state: mixed train/eval modules, some
frozen parameters, a sentinel ``.grad``, mixed ``fused_attn`` flags and a user forward hook. After the
call every piece of that state must be untouched.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import nbexplain as nbx
from conftest import make_model
from nbexplain.hygiene import hook_count

METHODS = {m["name"]: m for m in nbx.methods()}
CASES = [(arch, name) for name, m in METHODS.items() for arch in (("vit",) if m["vit_only"] else ("cnn", "vit"))]
# keep the expanded work small: hygiene does not depend on how many samples a method takes
LIGHT = {"integrated_gradients": {"steps": 6}, "smoothgrad": {"samples": 3}, "smoothgrad_sq": {"samples": 3},
         "vargrad": {"samples": 3}, "occlusion": {"patch": 16, "stride": 16}}
SIZE = 64


class Injector:
    """A forward hook registered by the test: counts calls, raises on call number ``fail_at``."""

    def __init__(self):
        self.calls, self.fail_at = 0, None

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("injected failure inside the forward pass")


class UserHook:
    def __init__(self):
        self.calls = 0

    def __call__(self, module, inputs, output):
        self.calls += 1


def build(arch):
    if arch == "cnn":
        model = make_model("test_resnet")
        deep = model.layer4
    else:
        model = make_model("test_vit")              # dynamic image size: 64 px is a 4x4 grid
        deep = model.blocks[-1]
    return model, deep


def make_awkward(model):
    """Mixed modes, frozen parameters, a sentinel grad, mixed fused attention, a user hook."""
    model.train()
    for i, m in enumerate(model.modules()):
        if i % 3 == 1:
            m.eval()
    params = list(model.parameters())
    for i, p in enumerate(params):
        if i % 4 == 1:
            p.requires_grad_(False)
    owner = next(p for p in params if p.requires_grad)
    sentinel = torch.full_like(owner, 0.125)
    owner.grad = sentinel
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for i, m in enumerate(attn):
        m.fused_attn = i % 2 == 0
    user_module = list(model.children())[1]
    user = UserHook()
    handle = user_module.register_forward_hook(user)
    return {"owner": owner, "sentinel": sentinel, "user": user, "handle": handle, "user_module": user_module}


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [(name, m.training) for name, m in model.named_modules()],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "grads": [(name, p.grad) for name, p in model.named_parameters()],
        "fused": [(name, m.fused_attn) for name, m in model.named_modules() if hasattr(m, "fused_attn")],
        "hooks": hook_count(model),
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_untouched(model, before, extra):
    after = snapshot(model)
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), f"{k} changed"
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for (name, g0), (_, g1) in zip(before["grads"], after["grads"]):
        assert g1 is g0, f"{name}.grad was replaced"
    assert extra["owner"].grad is extra["sentinel"]
    assert bool((extra["sentinel"] == 0.125).all()), "the sentinel .grad was written to"
    assert after["fused"] == before["fused"]
    assert after["hooks"] == before["hooks"], "hooks were left on the model"
    assert extra["handle"].id in extra["user_module"]._forward_hooks
    assert after["grad_mode"] == before["grad_mode"]


def run(model, x, method, **kw):
    return nbx.attribute(model, x, method, **{**LIGHT.get(method, {}), **kw})


@pytest.mark.filterwarnings("ignore:guided_backprop")
@pytest.mark.parametrize("scenario", ["success", "bad_target", "raises_inside"])
@pytest.mark.parametrize("arch,method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_model_and_input_left_exactly_as_found(arch, method, scenario):
    model, deep = build(arch)
    extra = make_awkward(model)
    injector = Injector()
    injected = deep.register_forward_hook(injector)
    x = torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    x_before, x_version = x.clone(), x._version
    before = snapshot(model)
    assert before["hooks"] >= 2 and any(not t for _, t in before["training"]) and \
        any(t for _, t in before["training"])

    if scenario == "success":
        out = run(model, x, method)
        assert out.map.shape == (SIZE, SIZE)
        assert extra["user"].calls > 0            # the user's hook saw nbexplain's forwards too
    elif scenario == "bad_target":
        with pytest.raises(ValueError, match="target"):
            run(model, x, method, target=10_000)
    else:
        run(model, x, method)                     # warm-up: the layer probe runs once per model
        injector.calls = 0
        run(model, x, method)
        passes = injector.calls                   # forwards one call makes, probe cached
        assert passes >= 1
        injector.calls, injector.fail_at = 0, passes
        with pytest.raises(RuntimeError, match="injected failure"):
            run(model, x, method)                 # fails in its last forward, mid-method
        assert injector.calls == passes

    assert_untouched(model, before, extra)
    assert torch.equal(x, x_before) and x._version == x_version
    assert not x.requires_grad and x.grad is None

    injected.remove()
    assert hook_count(model) == before["hooks"] - 1
    # the user's hook is still registered and still called
    extra["user"].calls = 0
    with torch.no_grad():
        model.eval()(x[None])
    assert extra["user"].calls == 1


def test_input_that_requires_grad_is_not_touched():
    model, _ = build("cnn")
    x = torch.randn(1, 3, SIZE, SIZE, requires_grad=True)
    before = x.detach().clone()
    for method in ("saliency", "gradcam", "integrated_gradients"):
        run(model, x, method)
    assert x.requires_grad and x.grad is None and x.is_leaf
    assert torch.equal(x.detach(), before)


def test_no_hooks_accumulate_over_many_calls():
    model, _ = build("vit")
    start = hook_count(model)
    x = torch.randn(3, SIZE, SIZE)
    for _ in range(2):
        for name in METHODS:
            if name not in ("guided_backprop", "guided_gradcam"):     # they warn on a GELU ViT
                run(model, x, name)
    assert hook_count(model) == start == 0


def test_works_under_no_grad_and_restores_grad_mode():
    model, _ = build("cnn")
    x = torch.randn(3, SIZE, SIZE)
    with torch.no_grad():
        a = run(model, x, "saliency")
        assert not torch.is_grad_enabled()
    b = run(model, x, "saliency")
    assert torch.equal(a.raw, b.raw)


def test_works_inside_inference_mode_on_an_inference_tensor():
    model, _ = build("cnn")
    with torch.inference_mode():
        x = torch.randn(3, SIZE, SIZE)                   # an inference tensor: it cannot enter autograd
        inside = {m: run(model, x, m) for m in ("saliency", "gradcam", "integrated_gradients")}
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    outside = x.clone()
    for method, got in inside.items():
        assert torch.equal(got.raw, run(model, outside, method).raw)
    assert hook_count(model) == 0


def test_a_compiled_model_is_explained_through_its_eager_module():
    """torch.compile wraps the module; hooks added after compilation would trip Dynamo."""
    model, _ = build("cnn")
    compiled = torch.compile(model)
    x = torch.randn(3, SIZE, SIZE)
    for method in ("gradcam", "saliency"):
        got = run(compiled, x, method)
        assert torch.equal(got.raw, run(model, x, method).raw)
        assert "_orig_mod" not in str(got.meta.get("layer"))
    assert [d["name"] for d in nbx.layers(compiled, x)] == [d["name"] for d in nbx.layers(model, x)]
    w = nbx.explain(compiled, [x], method="gradcam")               # the explorer too
    try:
        assert torch.equal(w.wait().raw, run(model, x, "gradcam").raw)
    finally:
        w.close()
    assert hook_count(model) == 0


def test_the_batch_and_trust_tools_run_a_compiled_model_through_its_eager_module():
    """explain_batch, the faithfulness curves and the randomisation test call the model themselves: a
    compiled one would be recompiled per batch shape, and its only child is ``_orig_mod``, so the
    randomisation test would randomise everything in one step."""
    from nbexplain.trust import deletion_insertion, layer_groups, randomization_test
    model, _ = build("cnn")
    compiles = []
    compiled = torch.compile(model, backend=lambda gm, _inputs: compiles.append(1) or gm.forward)
    x = torch.randn(3, SIZE, SIZE)
    assert layer_groups(compiled) == layer_groups(model) and len(layer_groups(model)) > 1
    report = randomization_test(compiled, x, ["saliency"])
    assert report.steps == randomization_test(model, x, ["saliency"]).steps
    exp = run(compiled, x, "saliency")
    deletion_insertion(compiled, exp, steps=4)
    nbx.explain_batch(compiled, torch.randn(2, 3, SIZE, SIZE), "saliency", faithfulness=True, progress=False)
    assert compiles == [], "Dynamo compiled the model: a tool called the compiled wrapper"
    assert hook_count(model) == 0


def test_a_users_hook_on_a_sequential_layer_is_part_of_what_a_cam_reads():
    """A Sequential's output is its last child's, so a CAM may read it there (a checkpointed model never
    calls the container), but not when the user's hook on the container changes what it returns."""
    class ZeroFirst(nn.Module):
        def forward(self, t):
            return torch.cat([torch.zeros_like(t[:, :2]), t[:, 2:]], 1)

    def body(*extra):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), *extra)

    hooked = nn.Sequential(body(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    built_in = nn.Sequential(body(ZeroFirst()), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    built_in[3].load_state_dict(hooked[3].state_dict())
    handle = hooked[0].register_forward_hook(lambda m, i, out: ZeroFirst()(out))
    x = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2))
    for method in ("gradcam", "eigencam"):
        got = nbx.attribute(hooked, x, method, layer="0", target=1)
        want = nbx.attribute(built_in, x, method, layer="0", target=1)
        torch.testing.assert_close(got.raw, want.raw)
    assert len(hooked[0]._forward_hooks) == 1
    handle.remove()


def test_a_private_copy_is_settled_for_good_and_gives_back_the_attention_flags_a_pass_turns_off():
    from nbexplain.replica import Replica
    model, _ = build("vit")
    extra = make_awkward(model)
    before = snapshot(model)
    copy = Replica(model).get()
    fused = [(name, m.fused_attn) for name, m in copy.named_modules() if hasattr(m, "fused_attn")]
    assert fused == before["fused"] and fused
    assert not any(m.training for m in copy.modules())
    assert not any(p.requires_grad for p in copy.parameters())
    x = torch.rand(1, 3, SIZE, SIZE)
    for method in ("attention_rollout", "gradcam", "saliency"):   # attention is read unfused, then put back
        run(copy, x, method)
        assert [(name, m.fused_attn) for name, m in copy.named_modules() if hasattr(m, "fused_attn")] == fused
        assert not any(m.training for m in copy.modules())
        assert not any(p.requires_grad for p in copy.parameters())
    assert_untouched(model, before, extra)


def test_the_module_walk_is_model_modules_in_order_with_shared_and_missing_children():
    from nbexplain.hygiene import module_tree
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Sequential(nn.ReLU(), shared), nn.Identity())
    model.add_module("gone", None)
    assert module_tree(model) == list(model.modules())
    resnet, _ = build("cnn")
    assert module_tree(resnet) == list(resnet.modules())
