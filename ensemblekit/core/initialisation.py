"""Where every member's copy of a block and of the head starts from (``init=``).

The modes (``docs/concepts.md``, "Initialisation"):

* ``"reinit"``: every copy is an independent draw of the backbone's own
  initialisation. Untrained given weights are one such draw: they are the first
  copy (member 0 is the given model). Every other copy, and the first one too
  when the given weights are trained, is a new draw: with `BlockSplit.fresh` (timm backbones through
  [`ensemblekit.wrap()`][ensemblekit.build.wrap]) from a fresh instance of the backbone, one instance
  per copy index serving every block and the head; without it by each
  submodule's ``reset_parameters`` (the rule that built torch's modules).
* ``"pretrained"``: every copy starts from the given weights, except each
  member's classifier (the head's layers with ``num_classes`` outputs), which
  is drawn anew for every member: members that start identical and see the
  same batches would stay identical.
* ``"pretrained+noise"``: ``"pretrained"``, plus Gaussian noise on every other
  parameter of every copy, with standard deviation ``scale`` (default
  [`NOISE_SCALE`][ensemblekit.core.initialisation.NOISE_SCALE]) times that tensor's own standard deviation.
* ``"copy"``: every copy, heads included, is an exact copy of the given
  weights (identical members; for tests and benchmarks, not for training an ensemble).
* ``"auto"``: ``"pretrained"`` when the given weights are trained, else ``"reinit"``.
  They count as trained when a parameter that the backbone's initialisation
  sets to a constant (norm weights 1 and biases 0, timm's zero-initialised last
  norms, layer scales) holds another value. [`ensemblekit.wrap()`][ensemblekit.build.wrap] decides
  from ``create_backbone(..., pretrained=)`` instead where it made the backbone.

Draws come from the global torch RNG in node order, so ``torch.manual_seed``
reproduces an ensemble.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ensemblekit.core.blocks import BlockSplit
from ensemblekit.core.heads import classifier_names, copy_with_state, reset_parameters
from ensemblekit.errors import EnsembleKitError, EnsembleKitWarning

__all__ = ["INIT_MODES", "NOISE_SCALE", "InitError", "InitWarning", "MemberInit", "is_trained"]

INIT_MODES = ("auto", "reinit", "pretrained", "pretrained+noise", "copy")
NOISE_SCALE = 0.01
"""Default ``scale`` of ``"pretrained+noise"``: noise std as a fraction of each tensor's std."""


class InitError(EnsembleKitError, ValueError):
    """An ``init`` that is not one of `INIT_MODES`, or that cannot apply to the backbone."""


class InitWarning(EnsembleKitWarning):
    """Copies cannot be drawn by the backbone's own rule and fall back to ``reset_parameters``."""


def is_trained(given: nn.Module, reference: nn.Module) -> bool:
    """Whether a parameter that is constant in ``reference`` (a fresh draw of ``given``) differs in ``given``."""
    fresh = dict(reference.named_parameters())
    for name, param in given.named_parameters():
        ref = fresh.get(name)
        if ref is None or not ref.is_floating_point() or ref.shape != param.shape or ref.numel() == 0:
            continue
        if bool((ref == ref.flatten()[0]).all()) and not torch.equal(param.detach().to(ref), ref.detach()):
            return True
    return False


class MemberInit:
    """Makes copy ``k`` of each block and of the head for one ``init``.

    Args:
        split: the backbone cut into blocks.
        init: a mode of `INIT_MODES` or a mapping ``{"name": mode, "scale": s}``
            (``scale`` for ``"pretrained+noise"`` only).

    Attributes:
        mode: the mode applied (``"auto"`` resolved).
        scale: the relative noise std of ``"pretrained+noise"``.
    """

    def __init__(self, split: BlockSplit, init: str | Mapping[str, Any] = "auto"):
        self.mode, self.scale = _parse(init)
        self.split = split
        self._draws: dict[int, BlockSplit] = {}
        self._trained: dict[int, bool] = {}
        self._spare: dict[int, nn.Module] = {}
        if self.mode == "auto":
            self.mode = "pretrained" if self.trained else "reinit"
        if self.mode.startswith("pretrained") and not classifier_names(split.head, split.num_classes):
            raise InitError(f"init={self.mode!r} draws each member's classifier anew, but the head has no linear or "
                            f"conv layer with {split.num_classes} outputs; use init='copy' or give such a head")

    @property
    def trained(self) -> bool:
        """Whether the given weights are trained: a parameter constant in a fresh draw differs."""
        return any(self._block_trained(b) for b in range(len(self.split)))

    def block(self, b: int, k: int) -> nn.Module:
        """Copy ``k`` of block ``b``."""
        given = self.split.blocks[b]
        if self.mode != "reinit":
            return self._noised(copy.deepcopy(given), ())
        if k == 0 and not self.trained:  # the given weights are one draw already
            return copy.deepcopy(given)
        if self.split.fresh is not None:
            return self._draw(k).blocks[b]
        spare = self._spare.pop(b, None)
        return spare if spare is not None else reset_parameters(copy.deepcopy(given))

    def head(self, k: int) -> nn.Module:
        """Copy ``k`` of the head (the head of the ``k``-th member that ends at the last block)."""
        given = self.split.head
        if self.mode == "copy":
            return copy.deepcopy(given)
        if self.mode == "reinit":
            if k == 0 and not self.trained:
                return copy.deepcopy(given)
            return self._draw(k).head if self.split.fresh is not None else reset_parameters(copy.deepcopy(given))
        names = classifier_names(given, self.split.num_classes)
        if self.split.fresh is not None:
            fresh = self._draw(k).head.state_dict()
            head = copy_with_state(given, {n: v for n, v in fresh.items() if _under(n, names)})
        else:
            head = copy.deepcopy(given)
            for name in names:
                reset_parameters(head.get_submodule(name))
        return self._noised(head, names)

    def _draw(self, k: int) -> BlockSplit:
        """The fresh split copy ``k`` comes from (draw ``k - 1`` when the given weights are copy 0)."""
        index = k if self.mode != "reinit" or self.trained else k - 1
        if index not in self._draws:
            assert self.split.fresh is not None
            self._draws[index] = self.split.fresh()
        return self._draws[index]

    def _block_trained(self, b: int) -> bool:
        if b not in self._trained:
            given = self.split.blocks[b]
            if self.split.fresh is not None:
                if 0 not in self._draws:
                    self._draws[0] = self.split.fresh()
                reference = self._draws[0].blocks[b]
            else:
                reference = self._spare[b] = reset_parameters(copy.deepcopy(given))
            self._trained[b] = is_trained(given, reference)
        return self._trained[b]

    def _noised(self, module: nn.Module, skip: tuple[str, ...] | list[str]) -> nn.Module:
        """``module`` with noise of ``scale`` times each parameter's std added ("pretrained+noise")."""
        if self.mode != "pretrained+noise":
            return module
        with torch.no_grad():
            for name, param in module.named_parameters():
                if _under(name, skip) or not param.is_floating_point() or param.numel() < 2:
                    continue
                param.add_(torch.randn_like(param) * (self.scale * param.float().std()).to(param.dtype))
        return module


def _under(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def _parse(init: Any) -> tuple[str, float]:
    options = dict(init) if isinstance(init, Mapping) else {"name": init}
    mode = options.pop("name", None)
    scale = options.pop("scale", NOISE_SCALE)
    if mode not in INIT_MODES or options:
        raise InitError(f"init must be one of {INIT_MODES} or {{'name': 'pretrained+noise', 'scale': s}}, "
                        f"got {init!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        raise InitError(f"the scale of init={mode!r} must be a number >= 0, got {scale!r}")
    if scale != NOISE_SCALE and mode != "pretrained+noise":
        raise InitError(f"init {mode!r} takes no scale; only 'pretrained+noise' does")
    return mode, float(scale)
