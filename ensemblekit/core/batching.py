"""Dropping samples from what a batch carries, and joining batches, by declaration, never by shape.

When [`predict()`][ensemblekit.core.ensemble.Ensemble.predict] drops the samples that stopped,
or the streaming engine ([`ensemblekit.core.streaming`][ensemblekit.core.streaming]) joins the samples
of several input batches into one batch, three kinds of values hold a batch:

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

Joining ([`concat_state()`][ensemblekit.core.batching.concat_state],
[`concat_running_state()`][ensemblekit.core.batching.concat_running_state]) is the inverse of selecting:
per-sample values are concatenated in order; a value shared by the samples of a batch is kept once, and only if
every part holds the same one ([`same_value()`][ensemblekit.core.batching.same_value]). Block states that
disagree there are an error; running states that disagree (a policy's per-batch timer) are not joined:
[`joinable()`][ensemblekit.core.batching.joinable] says so first, and the caller keeps them apart.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor

from ensemblekit.errors import EnsembleKitError

__all__ = [
    "BatchLayoutError",
    "StateLayout",
    "concat_running_state",
    "concat_samples",
    "concat_state",
    "joinable",
    "same_value",
    "select_running_state",
    "select_samples",
    "select_state",
]

StateLayout = bool | tuple[bool, ...]
"""Which values of a block state are per-sample: one flag for a tensor state, one per entry of a tuple state."""


class BatchLayoutError(EnsembleKitError, ValueError):
    """A value declared per-sample that is not batch-first, or a state whose per-sample values are not declared."""


def select_samples(value: Any, keep: Tensor | slice, batch_size: int, what: str) -> Any:
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


def select_state(state: Any, keep: Tensor | slice, batch_size: int, layout: StateLayout | None, what: str) -> Any:
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


def select_running_state(state: dict[str, Any] | None, keep: Tensor | slice, batch_size: int,
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


def _by_contract(value: Any, keep: Tensor | slice, batch_size: int, what: str, owner: str) -> Any:
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


# ------------------------------------------------------------------ joining
def same_value(a: Any, b: Any) -> bool:
    """Whether two values shared by the samples of their batches are the same: the same object, equal
    tensors (shape, dtype, device and values), or containers of the same values; other objects by ``==``."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_value(u, v) for u, v in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # an == that does not give a truth value (an array): not provably the same
        return False


def _shared(values: Sequence[Any], what: str) -> Any:
    """The value every part shares, or a clear error when the parts differ."""
    if not all(same_value(values[0], v) for v in values[1:]):
        raise BatchLayoutError(f"{what} is shared by the samples of a batch (not per-sample), but differs between "
                               "the batches being joined; declare it per-sample if it is computed from the samples")
    return values[0]


def concat_samples(values: Sequence[Any], sizes: Sequence[int], what: str) -> Any:
    """The rows of every part in turn: the inverse of
    [`select_samples()`][ensemblekit.core.batching.select_samples] (tuples, lists, dicts walked).

    Args:
        values: one value per part, all of one structure.
        sizes: the batch size of each part; every tensor must be batch-first.

    Raises:
        BatchLayoutError: a tensor whose first dimension is not its part's
            batch size, parts of different structures, or a non-tensor value
            (kept whole by selection) that differs between the parts.
    """
    first = values[0]
    if isinstance(first, Tensor):
        for value, size in zip(values, sizes):
            if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != size:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise BatchLayoutError(f"{what} is declared per-sample but is {shape}, not [{size}, ...] for a "
                                       f"batch of {size}")
        return values[0] if len(values) == 1 else torch.cat(list(values))
    if isinstance(first, (tuple, list)):
        if any(type(v) is not type(first) or len(v) != len(first) for v in values):
            raise BatchLayoutError(f"{what} has different structures in the batches being joined")
        return type(first)(concat_samples([v[i] for v in values], sizes, f"{what}[{i}]") for i in range(len(first)))
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise BatchLayoutError(f"{what} has different keys in the batches being joined")
        return {k: concat_samples([v[k] for v in values], sizes, f"{what}[{k!r}]") for k in first}
    return _shared(values, what)


def concat_state(states: Sequence[Any], sizes: Sequence[int], layout: StateLayout | None, what: str) -> Any:
    """One block state holding the samples of every part in turn: the inverse of
    [`select_state()`][ensemblekit.core.batching.select_state].

    The entries ``layout`` marks per-sample are concatenated; the others (side
    inputs, sizes) must be the same in every part and are kept once.
    """
    first = states[0]
    if isinstance(first, Tensor):
        return concat_samples(states, sizes, what)
    if not isinstance(first, tuple):
        raise BatchLayoutError(f"{what} is a {type(first).__name__}; a block state is a tensor or a tuple")
    if not isinstance(layout, tuple) or len(layout) != len(first):
        raise BatchLayoutError(
            f"{what} is a tuple of {len(first)} values, but its splitter did not declare which of them are "
            f"per-sample (got {layout!r}); set BlockSplit.per_sample to one tuple of flags per block")
    if any(not isinstance(s, tuple) or len(s) != len(first) for s in states):
        raise BatchLayoutError(f"{what} has different structures in the batches being joined")
    return tuple((concat_samples if flag else _shared_entry)([s[i] for s in states], sizes, f"{what}[{i}]")
                 for i, flag in enumerate(layout))


def _shared_entry(values: Sequence[Any], sizes: Sequence[int], what: str) -> Any:
    return _shared(values, what)


def _shared_leaves(value: Any, per_sample: Collection[str] | None) -> list[Any]:
    """The values of a running state that stay whole when samples are selected, in a fixed order."""
    if not isinstance(value, dict):
        return [value]
    if per_sample is not None:
        return [sorted(value)] + [value[k] for k in sorted(value) if k not in per_sample]
    return [sorted(value)] + [leaf for k in sorted(value) for leaf in _contract_leaves(value[k])]


def _contract_leaves(value: Any) -> list[Any]:
    """The leaves kept whole by contract (0-dim tensors, non-tensors), with the structure's shape."""
    if isinstance(value, Tensor):
        return [value] if value.ndim == 0 else [("tensor", value.ndim)]
    if isinstance(value, (tuple, list)):
        return [(type(value), len(value))] + [leaf for v in value for leaf in _contract_leaves(v)]
    if isinstance(value, dict):
        return [sorted(value)] + [leaf for k in sorted(value) for leaf in _contract_leaves(value[k])]
    return [value]


def joinable(states: Sequence[dict[str, Any] | None], per_sample: Collection[str] | None) -> bool:
    """Whether aggregator or policy states of several batches can be joined into one.

    They can when their values that are not per-sample (see
    [`select_running_state()`][ensemblekit.core.batching.select_running_state]) are the same
    ([`same_value()`][ensemblekit.core.batching.same_value]): the count of members added so far can; a policy's
    per-batch timer cannot.
    """
    first = _shared_leaves(states[0], per_sample)
    return all(same_value(first, _shared_leaves(s, per_sample)) for s in states[1:])


def concat_running_state(states: Sequence[dict[str, Any] | None], sizes: Sequence[int],
                         per_sample: Collection[str] | None, owner: str) -> dict[str, Any] | None:
    """One aggregator or policy state holding the samples of every part in turn (the inverse of
    [`select_running_state()`][ensemblekit.core.batching.select_running_state]); the values that are not
    per-sample must be the same in every part (check with [`joinable()`][ensemblekit.core.batching.joinable])
    and are kept once.

    Raises:
        BatchLayoutError: parts that cannot be joined, or a per-sample tensor that is not batch-first.
    """
    first = states[0]
    if len(states) == 1:
        return first
    if first is None:
        if any(s is not None for s in states):
            raise BatchLayoutError(f"the states of {owner} in the batches being joined are not all None")
        return None
    if any(not isinstance(s, dict) or s.keys() != first.keys() for s in states):
        raise BatchLayoutError(f"the states of {owner} in the batches being joined have different keys")
    dicts = [dict(s) for s in states if s is not None]
    out = {}
    for k in first:
        values, what = [s[k] for s in dicts], f"{owner}'s state[{k!r}]"
        if per_sample is None:
            out[k] = _join_by_contract(values, sizes, what)
        else:
            out[k] = concat_samples(values, sizes, what) if k in per_sample else _shared(values, what)
    return out


def _join_by_contract(values: Sequence[Any], sizes: Sequence[int], what: str) -> Any:
    first = values[0]
    if isinstance(first, Tensor) and first.ndim > 0:
        return concat_samples(values, sizes, what)
    if isinstance(first, (tuple, list)):
        if any(type(v) is not type(first) or len(v) != len(first) for v in values):
            raise BatchLayoutError(f"{what} has different structures in the batches being joined")
        return type(first)(_join_by_contract([v[i] for v in values], sizes, f"{what}[{i}]")
                           for i in range(len(first)))
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise BatchLayoutError(f"{what} has different keys in the batches being joined")
        return {k: _join_by_contract([v[k] for v in values], sizes, f"{what}[{k!r}]") for k in first}
    return _shared(values, what)
