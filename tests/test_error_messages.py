"""A bad value gives an ensemblekit error whose message names the value (property tests over validators)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ensemblekit as ek
from ensemblekit.components.halting.budgeted import Budgeted
from ensemblekit.components.halting.confidence import Confidence
from ensemblekit.components.halting.deadline import Deadline
from ensemblekit.components.halting.fixed import Fixed
from ensemblekit.components.halting.learned import Learned
from ensemblekit.components.losses.multi_exit import MultiExitLoss
from ensemblekit.core.registry import TOPOLOGIES
from ensemblekit.core.stages import Stage
from ensemblekit.errors import EnsembleKitError, UnknownNameError
from ensemblekit.functional import exit_distribution
from ensemblekit.training.config import ConfigError, DataConfig, ModelConfig, TrainConfig
from ensemblekit.training.data import load_dataset
from ensemblekit.training.trainer import select_device
from tests.conftest import toy_split

NOT_A_NUMBER = st.text(max_size=5) | st.none() | st.lists(st.integers(), max_size=2) | st.booleans()
NAME = st.text(st.characters(codec="ascii", categories=["L", "N", "Pd"]), min_size=1, max_size=12)


def names_the_value(call, value, error: type = EnsembleKitError) -> BaseException:
    """``call()`` raises an ensemblekit error (of ``error``) whose message holds ``value`` (its str or repr)."""
    with pytest.raises(EnsembleKitError) as raised:
        call()
    err = raised.value
    assert isinstance(err, error), repr(err)
    assert str(value) in str(err) or repr(value) in str(err), f"{value!r} is not named in: {err}"
    return err


def outside(low: float, high: float) -> st.SearchStrategy:
    """Floats below ``low`` or above ``high`` (infinities included), and NaN."""
    return (st.floats(max_value=low, exclude_max=True) | st.floats(min_value=high, exclude_min=True)
            | st.just(math.nan))


# ------------------------------------------------------------------ halting policies
@given(outside(0.0, 1.0))
def test_a_confidence_threshold_outside_0_1_is_named(value):
    names_the_value(lambda: Confidence(value), value, ValueError)


@given(st.lists(st.floats(0, 1), max_size=3), outside(0.0, 1.0), st.lists(st.floats(0, 1), max_size=3))
def test_a_bad_per_member_threshold_is_named(before, value, after):
    names_the_value(lambda: Confidence([*before, value, *after]), value, ValueError)


@given(st.text(max_size=5) | st.none() | st.booleans() | st.dictionaries(st.text(max_size=2), st.integers()))
def test_a_confidence_threshold_that_is_no_number_is_named(value):
    names_the_value(lambda: Confidence(value), value)


@given(st.integers(max_value=0) | st.floats(allow_nan=False) | NOT_A_NUMBER)
def test_fixed_needs_a_positive_member_count(value):
    names_the_value(lambda: Fixed(value), value, ValueError)


@given(branching=st.integers(2, 3), beyond=st.integers(1, 50))
def test_fixed_beyond_the_members_names_both_counts(branching, beyond):
    k = branching + beyond
    err = names_the_value(lambda: ek.wrap(toy_split(2), "tree", depth=1, branching=branching,
                                          halting={"name": "fixed", "members": k}), k, ValueError)
    assert str(branching) in str(err)


@given(st.floats(max_value=0, exclude_max=True) | st.just(math.nan))
def test_a_negative_deadline_is_named(value):
    names_the_value(lambda: Deadline(value), value, ValueError)


@given(outside(0.0, 1.0) | st.sampled_from([0.0, 1.0]))
def test_a_learned_threshold_outside_the_open_interval_is_named(value):
    names_the_value(lambda: Learned(threshold=value), value, ValueError)


@given(st.floats(max_value=0) | st.just(math.nan))
def test_a_budget_parameter_that_is_not_positive_is_named(value):
    names_the_value(lambda: Budgeted(q=value), value, ValueError)
    names_the_value(lambda: Budgeted(flops=value), value, ValueError)
    names_the_value(lambda: exit_distribution(value, 3), value, ValueError)


# ------------------------------------------------------------------ topologies and losses through wrap()
@given(st.integers(max_value=-1))
def test_a_negative_tree_depth_is_named(depth):
    names_the_value(lambda: ek.wrap(toy_split(2), "tree", depth=depth), depth, ValueError)


@given(st.integers(max_value=1))
def test_a_tree_branching_below_2_is_named(branching):
    names_the_value(lambda: ek.wrap(toy_split(2), "tree", depth=1, branching=branching), branching, ValueError)


@given(st.sampled_from(["depth", "branching"]), st.floats() | st.text(max_size=4))
def test_a_tree_size_that_is_no_integer_is_named(key, value):
    names_the_value(lambda: ek.wrap(toy_split(2), "tree", **{key: value}), value, TypeError)


@given(st.integers(max_value=0))
def test_a_member_count_below_1_is_named(members):
    names_the_value(lambda: ek.wrap(toy_split(2), "independent", members=members), members, ValueError)


@given(NAME)
def test_an_unknown_topology_is_named(name):
    if name in TOPOLOGIES.names():
        return
    err = names_the_value(lambda: TOPOLOGIES.create(name), name, KeyError)
    assert isinstance(err, UnknownNameError)


@given(st.sampled_from(["alpha", "temperature"]), st.floats(max_value=0, exclude_max=True) | st.just(math.nan))
def test_a_multi_exit_loss_option_out_of_range_is_named(key, value):
    names_the_value(lambda: MultiExitLoss(**{key: value}), value, ValueError)


@given(st.integers(max_value=0))
def test_a_stage_needs_epochs(epochs):
    names_the_value(lambda: Stage("warmup", epochs=epochs), epochs, ValueError)


# ------------------------------------------------------------------ configs
@given(st.integers(max_value=-1) | st.integers(min_value=2**32))
def test_a_seed_outside_the_range_is_named(seed):
    names_the_value(lambda: TrainConfig(seed=seed), seed, ConfigError)


@given(st.floats(allow_nan=False) | NOT_A_NUMBER)
def test_a_seed_that_is_no_integer_is_named(seed):
    names_the_value(lambda: TrainConfig(seed=seed), seed, ConfigError)


@given(st.sampled_from(["lr", "momentum", "gamma", "weight_decay", "grad_clip"]),
       st.floats(max_value=-1e-9) | st.just(math.nan) | NOT_A_NUMBER.filter(lambda v: v is not None))
def test_a_training_rate_out_of_range_is_named(key, value):
    names_the_value(lambda: TrainConfig(**{key: value}), value, ConfigError)


@given(st.sampled_from(["image_size", "num_classes", "in_chans", "num_blocks", "init"]),
       st.integers(max_value=0) | st.floats() | st.text(max_size=5))
def test_a_model_setting_out_of_range_is_named(key, value):
    names_the_value(lambda: ModelConfig(backbone="resnet10t", **{key: value}), value, ConfigError)


@given(st.sampled_from(["name", "train_split", "eval_split"]), NAME)
def test_an_unknown_data_setting_is_named(key, value):
    if value in ("digits", "cifar10", "cifar100", "imagefolder", "fashion-mnist", "train", "val", "trainval", "test"):
        return
    names_the_value(lambda: DataConfig(**{key: value}), value, ConfigError)


@given(NAME)
def test_an_unknown_dataset_is_an_unknown_name(name):
    if name in ("digits", "cifar10", "cifar100", "imagefolder", "fashion-mnist"):
        return
    names_the_value(lambda: load_dataset(name, "train"), name, UnknownNameError)


@given(NAME.filter(lambda n: n not in ("auto", "cpu", "cuda", "mps", "meta")))
def test_a_device_that_is_no_device_is_named(name):
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        names_the_value(lambda: select_device(name), name, ValueError)
