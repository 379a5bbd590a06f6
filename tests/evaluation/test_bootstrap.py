"""Bootstrap intervals of prefix accuracies and of their paired gains over the first member."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemblekit.components.aggregators import MeanLogits
from ensemblekit.evaluation.bootstrap import bootstrap_intervals
from ensemblekit.evaluation.reports import Report, anytime_report


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), m=st.integers(1, 4), seed=st.integers(0, 10))
def test_intervals_are_ordered_bounded_and_the_first_gain_is_zero(n, m, seed):
    correct = torch.rand(n, m, generator=torch.Generator().manual_seed(seed)) < 0.7
    iv = bootstrap_intervals(correct, resamples=50, seed=seed)
    for low, high in zip(iv.accuracy_low, iv.accuracy_high):
        assert 0 <= low <= high <= 1
    for low, high in zip(iv.gain_low, iv.gain_high):
        assert -1 <= low <= high <= 1
    assert iv.gain_low[0] == iv.gain_high[0] == 0
    assert bootstrap_intervals(correct, resamples=50, seed=seed) == iv  # reproducible


def test_identical_prefixes_have_no_gain_and_constant_scores_no_spread():
    correct = (torch.arange(100) % 3 == 0)[:, None].expand(100, 3)
    iv = bootstrap_intervals(correct, resamples=100)
    assert iv.gain_low == iv.gain_high == [0.0, 0.0, 0.0]
    assert bootstrap_intervals(torch.ones(50, 2, dtype=torch.bool), resamples=10).accuracy_low == [1.0, 1.0]


def test_width_matches_the_normal_approximation():
    n, p = 4000, 0.8
    correct = (torch.arange(n) < p * n)[:, None]
    iv = bootstrap_intervals(correct, resamples=2000)
    expected = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    assert iv.accuracy_high[0] - iv.accuracy_low[0] == pytest.approx(expected, rel=0.15)


def test_pairing_makes_the_gain_interval_narrower_than_the_accuracies():
    # prefix 2 fixes 2% of the images and breaks none: the paired gain is clearly positive although the two
    # accuracy intervals overlap
    n = 2000
    first = torch.arange(n) < int(0.85 * n)
    second = first | ((torch.arange(n) >= int(0.85 * n)) & (torch.arange(n) < int(0.87 * n)))
    iv = bootstrap_intervals(torch.stack([first, second], 1), resamples=1000)
    assert iv.accuracy_low[1] < iv.accuracy_high[0]  # the accuracy intervals overlap
    assert iv.gain_low[1] > 0.01


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="samples, prefixes"):
        bootstrap_intervals(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="level"):
        bootstrap_intervals(torch.ones(5, 1, dtype=torch.bool), level=1.0)


def test_anytime_report_carries_the_intervals_through_json_and_its_table():
    torch.manual_seed(0)
    members, labels = torch.randn(200, 3, 4), torch.randint(0, 4, (200,))
    report = anytime_report(members, labels, MeanLogits(), bootstrap=200)
    assert report.prefix_gain_low[0] == 0 and len(report.prefix_accuracy_high) == 3
    assert Report.from_dict(report.to_dict()) == report
    assert "gain vs k=1 (95% CI)" in report.table()
    assert anytime_report(members, labels, MeanLogits(), bootstrap=0).prefix_accuracy_low is None
