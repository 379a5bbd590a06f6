"""Creating and narrowing timm backbones moved from splitting to ensemblekit.backbones; the old names still work."""

from __future__ import annotations

import importlib

import pytest

import ensemblekit.backbones as backbones

MOVED = ["WIDTH_ARGS", "create_backbone", "narrow_model", "width_arg"]


@pytest.mark.parametrize("path", ["ensemblekit.splitting", "ensemblekit.splitting.timm"])
@pytest.mark.parametrize("name", MOVED)
def test_moved_name_is_deprecated_and_is_the_backbones_one(path, name):
    module = importlib.import_module(path)
    with pytest.warns(DeprecationWarning, match=rf"{path}\.{name} moved to ensemblekit\.backbones"):
        assert getattr(module, name) is getattr(backbones, name)
    assert name not in module.__all__


def test_old_imports_warn_and_other_names_still_fail():
    with pytest.warns(DeprecationWarning, match="narrow_model moved to ensemblekit.backbones"):
        from ensemblekit.splitting import narrow_model
    assert narrow_model is backbones.narrow_model
    with pytest.warns(DeprecationWarning, match="UnknownBackboneError moved to ensemblekit.backbones"):
        from ensemblekit.splitting import UnknownBackboneError
    assert UnknownBackboneError is backbones.UnknownBackboneError
    for path in ("ensemblekit.splitting", "ensemblekit.splitting.timm"):
        with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
            importlib.import_module(path).NoSuchThing  # noqa: B018


def test_the_warning_points_at_the_caller():
    with pytest.warns(DeprecationWarning) as record:
        importlib.import_module("ensemblekit.splitting").narrow_model  # noqa: B018
    assert record[0].filename == __file__
