"""max_train_items and max_eval_items take a seeded stratified subset: every class in proportion to its share, the
same items for the same seed (runs, processes, resumes), not the first N items of a class-sorted folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemblekit.training.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from ensemblekit.training.data import SUBSET_RULE, dataset_labels, stratified_subset
from ensemblekit.training.trainer import data_settings, load_split

SORTED = np.repeat([0, 1, 2, 3], [50, 30, 15, 5])  # 100 labels, sorted by class as an ImageFolder lists them


def counts(labels, keep, classes: int = 4) -> list[int]:
    return np.bincount(np.asarray(labels)[keep], minlength=classes).tolist()


@pytest.mark.parametrize("size", [4, 10, 17, 20, 33, 99])
def test_every_class_in_proportion(size):
    keep = stratified_subset(SORTED, size, seed=0)
    assert len(keep) == size == len(set(keep.tolist())) and (np.diff(keep) > 0).all()
    got = counts(SORTED, keep)
    assert all(c >= 1 for c in got)  # every class present (size >= number of classes)
    exact = np.bincount(SORTED) * size / len(SORTED)
    assert all(abs(c - e) <= 1 for c, e in zip(got, exact)), (got, exact.tolist())  # its share, rounded


def test_the_same_seed_draws_the_same_subset_another_seed_another():
    a, b = stratified_subset(SORTED, 20, seed=3), stratified_subset(SORTED, 20, seed=3)
    assert (a == b).all()
    assert not np.array_equal(a, stratified_subset(SORTED, 20, seed=4))
    assert counts(SORTED, a) == counts(SORTED, stratified_subset(SORTED, 20, seed=4)) == [10, 6, 3, 1]
    assert not np.array_equal(a, np.arange(20))  # not the first 20 (all of class 0)


def test_a_subset_as_large_as_the_data_is_all_of_it_and_tiny_ones_still_work():
    assert (stratified_subset(SORTED, 100) == np.arange(100)).all()
    assert len(stratified_subset(SORTED, 2, seed=0)) == 2  # fewer items than classes: the largest shares
    with pytest.raises(ValueError, match="at least 1"):
        stratified_subset(SORTED, 0)


def sorted_imagefolder(root: Path, per_class: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for split, scale in (("train", 1), ("val", 1), ("test", 1)):
        for name, n in per_class.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n * scale):
                Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


def test_a_class_sorted_imagefolder_keeps_every_class(tmp_path):
    root = sorted_imagefolder(tmp_path / "images", {"ant": 12, "bee": 6, "cat": 3})
    data = DataConfig(name="imagefolder", root=str(root), image_size=8, max_train_items=7, max_eval_items=7)
    train, _ = load_split(data, "train", limit=7, seed=0)
    labels = dataset_labels(train)
    assert len(train) == 7 and np.bincount(labels).tolist() == [4, 2, 1]  # the first 7 would all be ants
    assert [int(train[i][1]) for i in range(len(train))] == labels.tolist()  # labels read without the images
    again, _ = load_split(data, "train", limit=7, seed=0)
    assert again.indices == train.indices
    other, _ = load_split(data, "train", limit=7, seed=1)
    assert other.indices != train.indices and np.bincount(dataset_labels(other)).tolist() == [4, 2, 1]
    test_a, _ = load_split(data, "test", limit=7)
    test_b, _ = load_split(data, "test", limit=7)
    assert test_a.indices == test_b.indices  # evaluation: one fixed subset for every run and seed


def test_digits_training_subset_follows_the_runs_seed():
    data = DataConfig(name="digits", image_size=8, max_train_items=30)
    first, _ = load_split(data, "train", limit=30, seed=0)
    assert np.bincount(dataset_labels(first), minlength=10).min() >= 2  # 10 classes of about 3
    assert load_split(data, "train", limit=30, seed=0)[0].indices == first.indices
    assert load_split(data, "train", limit=30, seed=1)[0].indices != first.indices


def test_the_subset_rule_is_recorded_where_the_splits_are_cut():
    """A checkpoint or a table's run made when the first N items were taken is not resumed or reused."""
    from ensemblekit.reproduce.runs import comparable

    cut = DataConfig(max_train_items=100)
    assert data_settings(cut)["subset"] == SUBSET_RULE == "stratified"
    assert "subset" not in data_settings(DataConfig())  # whole splits: nothing changed, old runs still resume
    run = RunConfig(ModelConfig("resnet10t"), cut, TrainConfig())
    assert comparable(run)["data"]["subset"] == SUBSET_RULE
