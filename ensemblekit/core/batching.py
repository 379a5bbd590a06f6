"""Dropping stopped samples from what a batch carries, by declaration, never by shape.

When [`predict()`][ensemblekit.core.ensemble.Ensemble.predict] drops the samples that stopped,
three kinds of values hold a batch:

* block states ([`ensemblekit.core.blocks`][ensemblekit.core.blocks]): a tensor state is the
  block's output for the batch, so per-sample; in a tuple state the
  splitter marks which entries are per-sample (``BlockSplit.per_sample``:
  those computed from the input batch, not side inputs such as a RoPE table
  or an attention bias, nor sizes);
* an aggregator's running state and a halting policy's state: dicts whose
  per-sample keys the component declares in ``per_sample_state``; when it
  declares none, its interface's contract holds (every tensor with a
  dimension is batch-first, 0-dim tensors and other values are shared).

A value declared per-sample whose first dimension is not the batch size is
an error, never passed through: a per-class tensor of 4 classes stays whole
in a batch of 4 because it is not declared per-sample.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor

from ensemblekit.errors import EnsembleKitError

__all__ = ["BatchLayoutError", "StateLayout", "select_running_state", "select_samples", "select_state"]

StateLayout = bool | tuple[bool, ...]
"""Which values of a block state are per-sample: one flag for a tensor state, one per entry of a tuple state."""


class BatchLayoutError(EnsembleKitError, ValueError):
    """A value declared per-sample that is not batch-first, or a state whose per-sample values are not declared."""


def select_samples(value: Any, keep: Tensor, batch_size: int, what: str) -> Any:
    """``value`` with the rows ``keep`` selects: every tensor in it (tuples, lists, dicts walked) is batch-first.

    Raises:
        BatchLayoutError: a tensor whose first dimension is not ``batch_size``.
    """
    if isinstance(value, Tensor):
        if value.ndim == 0 or value.shape[0] != batch_size:
            raise BatchLayoutError(f"{what} is declared per-sample but has shape {tuple(value.shape)}, "
                                   f"not [{batch_size}, ...] for a batch of {batch_size}")
        return value[keep]
    if isinstance(value, (tuple, list)):
        return type(value)(select_samples(v, keep, batch_size, f"{what}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: select_samples(v, keep, batch_size, f"{what}[{k!r}]") for k, v in value.items()}
    return value


def select_state(state: Any, keep: Tensor, batch_size: int, layout: StateLayout | None, what: str) -> Any:
    """A block state with the rows ``keep`` selects, in the entries ``layout`` marks per-sample.

    Args:
        layout: from the split (``BlockSplit.per_sample``); ``None`` when the
            splitter did not say: a tensor state is per-sample, a tuple state
            cannot be compacted.
        what: names the state in errors ("the state of node 3").
    """
    if isinstance(state, Tensor):
        return select_samples(state, keep, batch_size, what)
    if not isinstance(state, tuple):
        raise BatchLayoutError(f"{what} is a {type(state).__name__}; a block state is a tensor or a tuple")
    if not isinstance(layout, tuple) or len(layout) != len(state):
        raise BatchLayoutError(
            f"{what} is a tuple of {len(state)} values, but its splitter did not declare which of them are "
            f"per-sample (got {layout!r}); set BlockSplit.per_sample to one tuple of flags per block")
    return tuple(select_samples(v, keep, batch_size, f"{what}[{i}]") if flag else v
                 for i, (v, flag) in enumerate(zip(state, layout)))


def select_running_state(state: dict[str, Any] | None, keep: Tensor, batch_size: int,
                         per_sample: Collection[str] | None, owner: str) -> dict[str, Any] | None:
    """An aggregator's or policy's state with the rows ``keep`` selects in its per-sample entries.

    Args:
        per_sample: the keys the component declares per-sample
            (``per_sample_state``); ``None``: undeclared, so every tensor with
            a dimension is (the interface's contract) and must be batch-first.
        owner: names the component in errors.
    """
    if state is None:
        return None
    if not isinstance(state, dict):
        raise BatchLayoutError(f"the state of {owner} is a {type(state).__name__}; it must be a dict (or None)")
    if per_sample is None:
        return {k: _by_contract(v, keep, batch_size, f"{owner}'s state[{k!r}]", owner) for k, v in state.items()}
    return {k: select_samples(v, keep, batch_size, f"{owner}'s state[{k!r}]") if k in per_sample else v
            for k, v in state.items()}


def _by_contract(value: Any, keep: Tensor, batch_size: int, what: str, owner: str) -> Any:
    """The rows ``keep`` selects of every tensor with a dimension in ``value``; 0-dim tensors and the rest kept."""
    if isinstance(value, Tensor):
        if value.ndim == 0:
            return value
        if value.shape[0] != batch_size:
            raise BatchLayoutError(
                f"{what} has shape {tuple(value.shape)} for a batch of {batch_size}; state tensors are batch-first "
                f"unless the component declares its per-sample keys: set per_sample_state on {owner}")
        return value[keep]
    if isinstance(value, (tuple, list)):
        return type(value)(_by_contract(v, keep, batch_size, f"{what}[{i}]", owner) for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: _by_contract(v, keep, batch_size, f"{what}[{k!r}]", owner) for k, v in value.items()}
    return value
