"""The CUDA paths: every execution strategy equals the loop on the GPU, predict, anytime and the streaming engine,
a bf16 training step.

Marked ``cuda`` and skipped without a CUDA device (``pytest -m cuda``). Setting
``ENSEMBLEKIT_TEST_DEVICE=cpu`` runs the same checks on the CPU, to test the
tests where no GPU is available. Only the public API is used.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import ensemblekit as ek
from ensemblekit.backbones import create_backbone

DEVICE = torch.device(os.environ.get("ENSEMBLEKIT_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

EXECUTIONS = ("loop", "loop_nhwc", "vmap", "grouped", "grouped_nhwc", "auto")
NUM_CLASSES = 5
SIZE = 32


@pytest.fixture(autouse=True)
def exact_float32():
    """Full float32 convolutions and matrix products (TF32 would make the strategies differ by ~1e-3)."""
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tiny_tree(execution: str = "loop", loss: str = "independent", seed: int = 0) -> ek.Ensemble:
    """A depth-2 tree (4 members) of a narrow resnet10t, on :data:`DEVICE`."""
    torch.manual_seed(seed)
    backbone = create_backbone("resnet10t", num_classes=NUM_CLASSES, stem_width=8, channels=[8, 16, 16, 32])
    ens = ek.wrap(backbone, "tree", depth=2, loss=loss, execution=execution,
                  example_input=torch.zeros(1, 3, SIZE, SIZE))
    return ens.to(DEVICE)


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-3,
                 atol: float = 1e-3) -> None:
    """Equal up to float32 rounding: ``atol`` is relative to the largest entry (cuDNN picks other algorithms
    for grouped and single convolutions and sums in other orders; a wrong weight or order is off by O(1))."""
    scale = expected.abs().max().clamp_min(1e-6)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * float(scale), msg=lambda m: f"{what}: {m}")


def test_the_device_is_the_one_asked_for():
    ens = tiny_tree()
    assert all(p.device.type == DEVICE.type for p in ens.parameters())
    x, _ = batch()
    assert ens(x).device.type == DEVICE.type


@pytest.mark.parametrize("execution", [e for e in EXECUTIONS if e != "loop"])
def test_strategy_equals_the_loop_in_training(execution):
    """Outputs, loss, every gradient and every BatchNorm running buffer after one training step."""
    reference = tiny_tree("loop")
    other = copy.deepcopy(reference)
    other.execution = execution
    assert other.execution == execution
    x, y = batch()
    results = {}
    for name, ens in (("loop", reference), (execution, other)):
        ens.train()
        output = ens.forward_output(x)
        loss = ens.loss(output, y).total
        loss.backward()
        results[name] = output.members.detach(), loss.detach()
    assert_close(results[execution][0], results["loop"][0], f"{execution} member logits")
    assert_close(results[execution][1], results["loop"][1], f"{execution} loss")
    ref_params, other_params = dict(reference.named_parameters()), dict(other.named_parameters())
    assert ref_params.keys() == other_params.keys()
    for key, p in ref_params.items():
        q = other_params[key]
        assert (p.grad is None) == (q.grad is None), f"{execution}: gradient of {key} present in one only"
        if p.grad is not None:
            assert_close(q.grad, p.grad, f"{execution} gradient of {key}", rtol=5e-3)
    ref_buffers, other_buffers = dict(reference.named_buffers()), dict(other.named_buffers())
    bn = [k for k in ref_buffers if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn, "the tree has BatchNorm layers"
    for key in bn:
        assert_close(other_buffers[key].double(), ref_buffers[key].double(), f"{execution} buffer {key}")


@pytest.mark.parametrize("execution", [e for e in EXECUTIONS if e != "loop"])
def test_strategy_equals_the_loop_in_inference(execution):
    reference = tiny_tree("loop").eval()
    other = copy.deepcopy(reference)
    other.execution = execution
    x, _ = batch(8, seed=2)
    with torch.no_grad():
        expected = reference.forward_members(x)
        for _ in range(2):  # the second call reuses what the first built (auto's choice, stacked weights)
            assert_close(other.forward_members(x), expected, f"{execution} eval member logits")


@pytest.mark.parametrize("execution", ["loop", "auto"])
def test_predict_with_confidence_and_anytime(execution):
    ens = tiny_tree(execution).eval()
    x, _ = batch(8, seed=3)
    with torch.no_grad():
        full = ens(x)
        steps = list(ens.anytime(x))
        assert [s.members for s in steps] == list(range(1, ens.num_members + 1))
        assert all(s.prediction.device.type == DEVICE.type for s in steps)
        assert_close(steps[-1].prediction, full, "anytime's last prediction vs forward")
        flops = [s.flops for s in steps]
        assert flops == sorted(flops) and flops[0] > 0
        seconds = [s.seconds for s in steps]
        assert seconds == sorted(seconds) and seconds[0] >= 0

        everyone = ens.predict(x, halting=ek.halting.Confidence(1.01))  # never confident: every member runs
        assert everyone.members_used.tolist() == [ens.num_members] * len(x)
        assert_close(everyone.prediction, full, "predict with every member vs forward")
        first = ens.predict(x, halting=ek.halting.Confidence(0.0))  # always confident: member 1 only
        assert first.members_used.tolist() == [1] * len(x)
        assert_close(first.prediction, steps[0].prediction, "predict after member 1 vs anytime step 1")
        assert float(first.flops.max()) < float(everyone.flops.min())

        mixed = ens.predict(x, halting=ek.halting.Confidence(0.3))
        assert mixed.prediction.device.type == DEVICE.type and mixed.prediction.shape == full.shape
        used = mixed.members_used.tolist()
        assert all(1 <= k <= ens.num_members for k in used)
        for i, k in enumerate(used):  # each sample's prediction is the prefix it stopped at
            assert_close(mixed.prediction[i], steps[k - 1].prediction[i], f"sample {i} stopped after {k} members")


@pytest.mark.parametrize("execution", ["loop", "grouped", "auto"])
def test_stream_and_nested_anytime(execution):
    """The streaming engine joins samples of several batches on the device; nested anytime batches levels."""
    ens = tiny_tree(execution).eval()
    x, _ = batch(10, seed=4)
    with torch.no_grad():
        full = ens(x)
        steps = list(ens.anytime(x))
    nested = list(ens.anytime(x, granularity="nested"))
    assert [s.members for s in nested] == [s.members for s in steps]
    for a, b in zip(nested, steps):
        assert_close(a.prediction, b.prediction, f"nested anytime after {a.members} members")
    assert_close(nested[-1].prediction, full, "nested anytime's last prediction vs forward")
    results = list(ens.stream(x.split([3, 4, 3]), halting=ek.halting.Confidence(0.3), batch_size=4))
    assert [r.index for r in results] == [0, 1, 2]
    prediction = torch.cat([r.prediction for r in results])
    assert prediction.device.type == DEVICE.type and prediction.shape == full.shape
    used = torch.cat([r.members_used for r in results]).tolist()
    for i, k in enumerate(used):  # each sample's prediction is the prefix it stopped at
        assert_close(prediction[i], steps[k - 1].prediction[i], f"streamed sample {i} stopped after {k} members")
    assert all(bool((r.latency >= 0).all()) for r in results)


@pytest.mark.parametrize("execution", ["loop", "grouped", "auto"])
def test_training_step_in_bf16_autocast(execution):
    if DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    ens = tiny_tree(execution, loss="hierarchical_distillation").train()
    optimizer = torch.optim.SGD(ens.parameters(), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in ens.parameters()]
    x, y = batch(8, seed=4)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            output = ens.forward_output(x)
            result = ens.loss(output, y)
        assert torch.isfinite(result.total), f"loss {result.total}"
        result.total.float().backward()
        grads = [p.grad for p in ens.parameters()]
        assert all(g is not None for g in grads), "every parameter gets a gradient"
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, ens.parameters()))
