"""One model per timm family: splitting reproduces ``model(x)`` exactly.

A family is the module a model is defined in plus the leading letters of its
name (``("resnet", "seresnext")``); the smallest model of each is tested. The
fast subset runs by default; the whole sweep is

    pytest -m slow tests/splitting/test_timm_sweep.py

(about half an hour on 2 CPU cores). With ``EK_SWEEP_REPORT=path.jsonl`` it
also writes one line of results per family (``docs/timm-families.md`` was
made from it).
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections import defaultdict

import pytest
import timm
import torch
from timm.models import _registry
from torch import nn

from ensemblekit.backbones import narrow_model, width_arg
from ensemblekit.core.blocks import BlockSplit
from ensemblekit.splitting import SplitError, split

MAX_PARAMS = 100e6
_SMALL = re.compile(r"(^|_)(test|tiny|small|atto|femto|pico|nano|mini|micro|xxs|xs|s|t|s0|b0|m0|a0|035|050)($|_)")

# families run by default, each with a small model: plain CNNs, NHWC and token
# models, tuple states, multi-stream HRNet, a feature tap inside a residual block
FAST = {
    ("resnet", "test"): "test_resnet",
    ("efficientnet", "test"): "test_efficientnet",
    ("byobnet", "test"): "test_byobnet",
    ("convnext", "test"): "test_convnext",
    ("vision_transformer", "test"): "test_vit",
    ("mambaout", "test"): "test_mambaout",
    ("nfnet", "test"): "test_nfnet",
    ("cspnet", "cs"): "cs3darknet_focus_s",
    ("cpubone", "cpubone"): "cpubone_nano",
    ("efficientnet", "mobilenetv"): "mobilenetv2_035",
    ("mobilenetv3", "mobilenetv"): "mobilenetv3_small_050",
    ("densenet", "densenetblur"): "densenetblur121d",
    ("efficientvit_mit", "efficientvit"): "efficientvit_b0",
    ("edgenext", "edgenext"): "edgenext_xx_small",
    ("mobilevit", "mobilevitv"): "mobilevitv2_050",
    ("dpn", "dpn"): "dpn48b",
    ("dla", "dla"): "dla46x_c",
    ("efficientvim", "efficientvim"): "efficientvim_m1",
    ("pvt_v2", "pvt"): "pvt_v2_b0",
    ("hgnet", "hgnetv"): "hgnetv2_b0",
    ("hrnet", "hrnet"): "hrnet_w18_small",
    ("xception_aligned", "xception"): "xception41",
}


@functools.cache
def families() -> dict[tuple[str, str], tuple[str, ...]]:
    """Model names of every timm family: ``(defining module, leading letters of the name)``."""
    out: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in timm.list_models():
        if _registry.model_entrypoint(name).__module__.startswith("ensemblekit."):
            continue  # ensemblekit's own entrypoints (ek_*) build ensembles, not backbones
        out[(_registry._model_to_module[name], re.match(r"[a-z]+", name).group(0))].append(name)
    return {family: tuple(names) for family, names in out.items()}


def num_params(name: str) -> int:
    """Parameters of a model, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def smallest(names: tuple[str, ...]) -> tuple[str, int]:
    """The family's smallest model, among the names that say small (tiny, atto, s0, ...) if any."""
    candidates = [n for n in names if _SMALL.search(n)] or names
    return min(((n, num_params(n)) for n in candidates), key=lambda item: (item[1], item[0]))


def check_exact(model: nn.Module, num_blocks: int | None = None) -> BlockSplit:
    """Split ``model`` and check the composed blocks against ``model(x)`` in eval and train mode."""
    s = split(model, num_blocks)
    assert len(s) == num_blocks or num_blocks is None
    x = torch.randn(2, s.in_chans, *s.example_size)
    for training in (False, True):
        model.train(training)
        for module in (*s.blocks, s.head):
            module.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        actual = s.forward(x)
        assert torch.equal(expected, actual), f"{'train' if training else 'eval'} output differs"
    return s


def _create(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False)


@pytest.mark.parametrize("family", sorted(FAST), ids=lambda f: "/".join(f))
def test_fast_families(family):
    assert FAST[family] in families()[family]
    check_exact(_create(FAST[family]))


@pytest.fixture
def report(request):
    """Skip unless ``-m slow`` was asked for; append one JSON line of results to ``$EK_SWEEP_REPORT``."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("part of the full sweep: run with -m slow")
    row: dict = {}
    yield row
    path = os.environ.get("EK_SWEEP_REPORT")
    if path and row:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(families()), ids=lambda f: "/".join(f))
def test_every_family(family, report):
    start = time.perf_counter()
    name, params = smallest(families()[family])
    report.update(family=list(family), model=name, params=params, status="skip")
    if params > MAX_PARAMS:
        pytest.skip(f"smallest model {name} has {params / 1e6:.0f}M parameters")
    model = _create(name)
    report["status"] = "fail"
    try:
        s = check_exact(model)
        report.update(blocks=len(s), names=s.names, tuple_state=any(i is not None for i in s.feature_index),
                      formats=sorted(set(s.feature_format)), example_size=s.example_size,
                      fixed_size=s.input_size is not None)
        try:
            more = check_exact(model, len(s) + 2)
        except SplitError as err:
            if "at most" not in str(err) or len(s) == 1:
                raise
            more = check_exact(model, len(s) - 1)
        report.update(balanced_blocks=len(more), status="ok")
    except (SplitError, AssertionError) as err:
        report["error"] = f"{type(err).__name__}: {err}"[:600]
        raise
    finally:
        report["seconds"] = round(time.perf_counter() - start, 1)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(families()), ids=lambda f: "/".join(f))
def test_narrow_every_family(family, report):
    name, params = smallest(families()[family])
    if params > MAX_PARAMS:
        pytest.skip(f"smallest model {name} has {params / 1e6:.0f}M parameters")
    arg = width_arg(name)
    report.update(family=list(family), model=name, width_arg=arg, narrow="none")
    if arg is None:
        pytest.skip(f"{name} has no width argument")
    try:
        narrow = narrow_model(name, 1 / 1.5)
    except SplitError as err:  # a clear refusal: the width argument cannot change alone
        report.update(narrow="unsupported", narrow_error=str(err)[:400])
        pytest.skip(str(err))
    report["narrow"] = "fail"
    try:
        wide = num_params(name)
        narrow_params = sum(p.numel() for p in narrow.parameters())
        report["narrow_params_ratio"] = round(narrow_params / wide, 3)
        assert narrow_params < wide
        check_exact(narrow)
        report["narrow"] = "ok"
    except Exception as err:
        report["narrow_error"] = f"{type(err).__name__}: {err}"[:400]
        raise
