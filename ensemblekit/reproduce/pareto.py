"""``ensemblekit reproduce pareto``: when is an adaptive ensemble better than just a bigger model?

Every method is trained once per seed on the same data with the same epochs,
optimiser and seed, and read as points of (FLOPs per image, measured latency
per image, test accuracy):

* the single backbone a user would pick instead: resnet10t at 1/8, 1/4 and
  1/2 of its channels, and the deeper resnet18d and resnet34d at 1/4 (the
  ``d`` variants, whose deep stem takes ``stem_width``; plain resnet18 ignores
  it and keeps a 64-channel stem), one point each;
* a deep ensemble of 4 independent quarter-width networks, at every prefix 1..4;
* the HNE tree (depth 4, its default loss L_I + L_HD), at every prefix 1..16;
* EnsembleNet (2 branches at 1/1.5 of the quarter width, co-distillation), at
  both prefixes;
* a multi-exit network (an exit after each of the 5 blocks) with budgeted
  exits calibrated on the validation split, one point per budget;
* IRENE (3 members, its sequential schedule: one stage of ``epochs`` per
  member), one point at its learned halting.

FLOPs count a multiply-add as 2, per image of the dataset's size; an adaptive
point's FLOPs are the mean over the test images of the prefixes used. Latency
is measured here, in seconds per image: a fixed-cost point (prefix ``k``) is
[`predict()`][ensemblekit.core.ensemble.Ensemble.predict] with ``Fixed(k)`` on one batch of test
images, fastest of a few repeats after a warm-up; an adaptive point is
``predict`` with its policy over the whole test set in batches of the same
size (so that its cost is averaged over the same images as its FLOPs),
fastest of the same number of repeats. Every point goes through the same
``predict`` code path.

Settings (shown on screen and stored in ``pareto.json``):

* default, Fashion-MNIST: 1 epoch on the 54k training split without
  augmentation (random crops cost ~5 points on one epoch), batch 128, SGD
  lr 0.1 with a cosine schedule, momentum 0.9, weight decay 5e-4, seed 0; the
  whole command takes about 5 minutes on a quiet 2-core CPU (training ~4 min,
  from 7 s for resnet10t x1/8 to ~60 s for the HNE tree; measuring ~20 s,
  most of it the multi-exit budget sweep). One seed: the other tables
  (``hne-table1``, ...) carry the seed-to-seed spread; ``--seeds N``
  averages the points over N seeds.
* digits (where Fashion-MNIST is absent): 16x16 images, 5 epochs, batch 64,
  lr 0.05.
* ``--smoke``: a seconds-long check: digits, 128 training and 128 test
  images, 1 epoch, backbones at 1/16 and 1/8 width, an HNE of depth 2.

The command is resumable: each finished model is kept with its points in
``<out>/seed-<s>/<model>/run.json`` and reused; a model finished with other
settings (including the latency device) makes the command exit with 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ensemblekit.reproduce.runs import (
    RunStore,
    TableError,
    check_settings,
    comparable,
    default_dataset,
    device_name,
    get_or_train,
    load_splits,
    seed_range,
)

__all__ = [
    "BUDGET_QS",
    "HELP",
    "METHODS",
    "NAME",
    "Point",
    "add_arguments",
    "band_edges",
    "bands",
    "bands_table",
    "best_per_band",
    "dominates",
    "mean_points",
    "measure",
    "models",
    "pareto_front",
    "plot",
    "run",
    "settings",
    "table",
    "verdict",
]

NAME = "pareto"
HELP = ("When is an adaptive ensemble better than a bigger model? Every method against the single backbone at "
        "several widths and depths: accuracy vs FLOPs and measured latency, the Pareto front, the best method per "
        "cost band.")

SINGLE = "single backbone"
DEEP_ENSEMBLE = "deep ensemble"
HNE = "HNE"
ENSEMBLENET = "EnsembleNet"
MULTI_EXIT = "multi-exit (budgeted)"
IRENE = "IRENE (learned halting)"
METHODS = (SINGLE, DEEP_ENSEMBLE, HNE, ENSEMBLENET, MULTI_EXIT, IRENE)
"""Every method, in the order of the plots' legends."""
MARKERS = dict(zip(METHODS, "osD^vP"))

WIDTHS = {
    "x1/8": {"stem_width": 4, "channels": [8, 16, 32, 64]},
    "x1/4": {"stem_width": 8, "channels": [16, 32, 64, 128]},
    "x1/2": {"stem_width": 16, "channels": [32, 64, 128, 256]},
}
"""resnet10t widths (timm options), as fractions of its default channels 64/128/256/512."""
SMOKE_WIDTHS = {
    "x1/16": {"stem_width": 4, "channels": [4, 8, 16, 32]},
    "x1/8": {"stem_width": 8, "channels": [8, 16, 32, 64]},
}
BUDGET_QS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Budget parameters of the multi-exit sweep: from almost every image at exit 1 to most at the last exits."""

DEFAULTS = {"digits": (16, 5, 64, 0.05), "fashion-mnist": (28, 1, 128, 0.1)}
"""Per dataset: image size, epochs, batch size, learning rate."""

RESULTS = ("pareto.json", "pareto.md", "pareto_flops.png", "pareto_latency.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=tuple(DEFAULTS), default=None,
                        help="default: fashion-mnist where its files are on this machine, else digits "
                             "(--smoke: digits)")
    parser.add_argument("--root", default=None, help="Fashion-MNIST folder (default: $ENSEMBLEKIT_FASHION_MNIST, "
                                                     "then the Debian package dataset-fashion-mnist)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 1 (fashion-mnist), 5 (digits)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-train-items", type=int, default=None,
                        help="train on a stratified subset of N images of the training split, drawn per seed "
                             "(default: all)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds seed..seed+N-1, points averaged (default 1: the other tables show the spread)")
    parser.add_argument("--latency-batch", type=int, default=256, help="images per timed predict call")
    parser.add_argument("--latency-repeats", type=int, default=3, help="each latency is the fastest of this many")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--out", type=Path, default=None, help="default: ensemblekit-runs/pareto-<data>")
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long check: digits, 128 images, 1 epoch, narrow backbones, HNE of depth 2")


# ------------------------------------------------------------------ points, front, bands
@dataclass(frozen=True)
class Point:
    """One way to run one model: FLOPs and seconds per image, test accuracy in %, members evaluated per image."""

    method: str
    label: str
    flops: float
    latency: float
    accuracy: float
    members: float


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether ``a`` = (cost, accuracy) is no costlier and no less accurate than ``b``, and differs from it.

    Examples:
        >>> dominates((1.0, 90.0), (2.0, 90.0)), dominates((1.0, 90.0), (1.0, 90.0))
        (True, False)
    """
    return a[0] <= b[0] and a[1] >= b[1] and (a[0], a[1]) != (b[0], b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points no other point dominates, by increasing cost.

    Examples:
        >>> pareto_front([(1.0, 80.0), (2.0, 85.0), (2.0, 84.0), (3.0, 85.0), (0.5, 70.0)])
        [4, 0, 1]
    """
    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def band_edges(costs: Sequence[float], marks: Sequence[float]) -> list[float]:
    """Edges of the cost bands: the lowest cost, the ``marks`` (the single backbones' costs), the highest cost.

    Examples:
        >>> band_edges([1.0, 3.0, 8.0], [2.0, 3.0])
        [1.0, 2.0, 3.0, 8.0]
        >>> band_edges([5.0], [5.0])
        [5.0, 5.0]
    """
    edges = sorted({min(costs), *marks, max(costs)})
    return edges if len(edges) > 1 else edges * 2


def best_per_band(points: Sequence[tuple[float, float]], edges: Sequence[float]) -> list[int | None]:
    """Index of the most accurate (cost, accuracy) point in each band, None where a band is empty.

    Band ``i`` holds the costs in ``(edges[i], edges[i + 1]]`` (the first band
    also its lower edge): what a cost of at most ``edges[i + 1]`` buys beyond
    the band below. Ties go to the cheaper point.

    Examples:
        >>> best_per_band([(1.0, 80.0), (1.5, 83.0), (2.0, 82.0), (4.0, 90.0)], [1.0, 2.0, 3.0, 4.0])
        [1, None, 3]
    """
    best: list[int | None] = []
    for i, (low, high) in enumerate(zip(edges, edges[1:])):
        inside = [j for j, (cost, _) in enumerate(points) if (low <= cost if i == 0 else low < cost) and cost <= high]
        best.append(max(inside, key=lambda j: (points[j][1], -points[j][0]), default=None))
    return best


def mean_points(runs: Sequence[Sequence[Point]]) -> tuple[list[Point], dict[str, float]]:
    """Points averaged over seeds (matched by method and label), and each label's accuracy std over seeds.

    Examples:
        >>> points, std = mean_points([[Point("HNE", "k=1", 2.0, 1.0, 80.0, 1)],
        ...                            [Point("HNE", "k=1", 2.0, 2.0, 82.0, 1)]])
        >>> points[0].accuracy, points[0].latency, round(std["k=1"], 3)
        (81.0, 1.5, 1.414)
    """
    groups: dict[tuple[str, str], list[Point]] = {}
    for points in runs:
        for p in points:
            groups.setdefault((p.method, p.label), []).append(p)
    means = [Point(method, label, *(statistics.fmean(getattr(p, key) for p in group)
                                    for key in ("flops", "latency", "accuracy", "members")))
             for (method, label), group in groups.items()]
    spread = {label: statistics.stdev(p.accuracy for p in group) if len(group) > 1 else 0.0
              for (_, label), group in groups.items()}
    return means, spread


def verdict(points: Sequence[Point], cost: Callable[[Point], float], axis: str,
            show: Callable[[float], str]) -> str:
    """One sentence: for each single backbone, whether another method is more accurate at no more ``cost``.

    Examples:
        >>> ps = [Point(SINGLE, "small", 1.0, 0, 80.0, 1), Point(SINGLE, "big", 4.0, 0, 85.0, 1),
        ...       Point("HNE", "HNE k=4", 3.0, 0, 86.0, 4)]
        >>> text = verdict(ps, lambda p: p.flops, "FLOPs", str)
        >>> text.startswith("By FLOPs, another method beats the single backbone at equal or lower cost for 1 of 2")
        True
        >>> print(text.split("sizes: ")[1])
        big (4.0): HNE k=4 86.0% vs 85.0% at 3.0; the single backbone stays best for small (1.0).
    """
    singles = sorted((p for p in points if p.method == SINGLE), key=cost)
    others = [p for p in points if p.method != SINGLE]
    wins, losses = [], []
    for single in singles:
        rivals = [p for p in others if cost(p) <= cost(single)]
        best = max(rivals, key=lambda p: (p.accuracy, -cost(p)), default=None)
        if best is not None and best.accuracy > single.accuracy:
            wins.append(f"{single.label} ({show(cost(single))}): {best.label} {best.accuracy:.1f}% vs "
                        f"{single.accuracy:.1f}% at {show(cost(best))}")
        else:
            losses.append(f"{single.label} ({show(cost(single))})")
    text = (f"By {axis}, another method beats the single backbone at equal or lower cost for {len(wins)} of "
            f"{len(singles)} sizes")
    text += (": " + "; ".join(wins)) if wins else ""
    text += ("; the single backbone stays best for " + ", ".join(losses)) if losses else ""
    return text + "."


# ------------------------------------------------------------------ settings and models
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command's results depend on, as ``args`` choose (``args.data`` already set)."""
    size, epochs, batch, lr = DEFAULTS[args.data]
    chosen: dict[str, Any] = {
        "data": args.data, "image_size": size, "epochs": epochs, "batch_size": batch, "lr": lr, "augment": False,
        "train_split": "train", "max_train_items": args.max_train_items, "max_eval_items": None,
        "widths": WIDTHS, "base_width": "x1/4", "deeper": ["resnet18d", "resnet34d"], "hne_depth": 4,
        "ensemble_members": 4, "ensemblenet_branches": 2, "irene_members": 3, "budget_qs": list(BUDGET_QS),
        "latency_batch": args.latency_batch, "latency_repeats": args.latency_repeats,
    }
    if args.smoke:
        chosen.update(image_size=16, epochs=1, batch_size=32, max_train_items=128, max_eval_items=128,
                      widths=SMOKE_WIDTHS, base_width="x1/8", deeper=["resnet18d"], hne_depth=2,
                      budget_qs=[0.25, 1.0, 4.0], latency_batch=min(args.latency_batch, 64), latency_repeats=1)
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    return chosen


def models(chosen: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Label -> (method, ModelConfig) of every model trained, the single backbones first."""
    from ensemblekit.training.config import ModelConfig

    width = chosen["base_width"]
    base = chosen["widths"][width]
    one = {"name": "independent", "members": 1}
    out: dict[str, tuple[str, Any]] = {
        f"resnet10t {name}": (SINGLE, ModelConfig("resnet10t", backbone_options=options, topology=one))
        for name, options in chosen["widths"].items()}
    for arch in chosen["deeper"]:
        out[f"{arch} {width}"] = (SINGLE, ModelConfig(arch, backbone_options=base, topology=one))
    members = chosen["ensemble_members"]
    out[f"deep ensemble {members} {width}"] = (DEEP_ENSEMBLE, ModelConfig(
        "resnet10t", backbone_options=base, topology={"name": "independent", "members": members}))
    out[f"HNE {2 ** chosen['hne_depth']} {width}"] = (HNE, ModelConfig(
        "resnet10t", backbone_options=base, recipe="hne", recipe_options={"depth": chosen["hne_depth"]}))
    out[f"EnsembleNet {chosen['ensemblenet_branches']} {width}"] = (ENSEMBLENET, ModelConfig(
        "resnet10t", backbone_options=base, recipe="ensemblenet",
        recipe_options={"branches": chosen["ensemblenet_branches"]}))
    out[f"multi-exit {width}"] = (MULTI_EXIT, ModelConfig("resnet10t", backbone_options=base, recipe="multi_exit"))
    out[f"IRENE {chosen['irene_members']} {width}"] = (IRENE, ModelConfig(
        "resnet10t", backbone_options=base, recipe="irene", recipe_options={"members": chosen["irene_members"]}))
    return out


def _data_config(args: argparse.Namespace, chosen: dict[str, Any]) -> Any:
    from ensemblekit.training.config import DataConfig

    return DataConfig(name=args.data, root=args.root, image_size=chosen["image_size"], augment=chosen["augment"],
                      train_split=chosen["train_split"], num_workers=args.num_workers,
                      max_train_items=chosen["max_train_items"], max_eval_items=chosen["max_eval_items"])


def _describe(chosen: dict[str, Any], seeds: list[int], train_items: int, device: str) -> str:
    """The settings in one paragraph (screen, Markdown)."""
    widths = ", ".join(f"{name} (stem {o['stem_width']}, channels {'/'.join(map(str, o['channels']))})"
                       for name, o in chosen["widths"].items())
    subset = (f"a stratified subset of {train_items}" if chosen["max_train_items"] else f"all {train_items}")
    return (f"{chosen['data']} at {chosen['image_size']}x{chosen['image_size']}; single backbones: resnet10t at "
            f"{widths}, and {', '.join(chosen['deeper'])} at {chosen['base_width']}; ensembles of "
            f"{chosen['base_width']} resnet10t members: deep ensemble of {chosen['ensemble_members']}, HNE of depth "
            f"{chosen['hne_depth']} ({2 ** chosen['hne_depth']} members, L_I+L_HD), EnsembleNet of "
            f"{chosen['ensemblenet_branches']} branches at 1/1.5 width, multi-exit with an exit "
            f"per block and budgets q = {', '.join(f'{q:g}' for q in chosen['budget_qs'])} calibrated on the val "
            f"split, IRENE of {chosen['irene_members']} members; {chosen['epochs']} epoch(s) on {subset} images of "
            f"the {chosen['train_split']} split without augmentation, batch {chosen['batch_size']}, SGD lr "
            f"{chosen['lr']} cosine (IRENE: its own sequential schedule, {chosen['epochs']} epoch(s) per member); "
            f"seeds {seeds}; latency: batch {chosen['latency_batch']}, fastest of {chosen['latency_repeats']}, "
            f"device {device}")


# ------------------------------------------------------------------ measuring
def _tensors(dataset: Any) -> tuple[Any, Any]:
    """All images and labels of ``dataset`` as two tensors."""
    import torch

    from ensemblekit.training.data import make_loader

    images, labels = zip(*((x, y) for x, y in make_loader(dataset, 256, shuffle=False)))
    return torch.cat(images), torch.cat(labels).long()


def _fixed_latency(model: Any, images: Any, members: int, repeats: int) -> float:
    """Seconds per image of ``predict`` with the first ``members`` members: fastest of ``repeats``, after a warm-up."""
    from ensemblekit.components.halting import Fixed
    from ensemblekit.core.timing import timed

    policy = Fixed(members)
    model.predict(images, halting=policy)
    return min(timed(lambda: model.predict(images, halting=policy), images.device)[1]
               for _ in range(repeats)) / len(images)


def _halted_point(method: str, label: str, model: Any, test: tuple[Any, Any], batch_size: int,
                  repeats: int) -> Point:
    """The point of ``predict`` with the model's own halting policy over the whole test set."""
    import torch

    from ensemblekit.core.timing import timed

    device = next(model.parameters()).device
    images, labels = test
    batches = [images[i:i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    model.predict(batches[0])
    timings = [timed(lambda: [model.predict(x) for x in batches], device) for _ in range(repeats)]
    results = timings[0][0]
    predicted = torch.cat([r.prediction.argmax(-1).cpu() for r in results])
    return Point(method, label, float(torch.cat([r.flops.cpu() for r in results]).double().mean()),
                 min(seconds for _, seconds in timings) / len(images),
                 100 * float((predicted == labels).double().mean()),
                 float(torch.cat([r.members_used.cpu() for r in results]).double().mean()))


def measure(method: str, label: str, model: Any, report: Any, test: tuple[Any, Any], val: tuple[Any, Any],
            chosen: dict[str, Any]) -> list[Point]:
    """The points of a trained model: every prefix, each budget (multi-exit), or its learned halting (IRENE)."""
    from ensemblekit.evaluation.budget import budget_sweep

    batch, repeats = chosen["latency_batch"], chosen["latency_repeats"]
    model.eval()
    if method == MULTI_EXIT:
        sweep = budget_sweep(model, val, test, chosen["budget_qs"], batch_size=batch, repeats=repeats)
        return [Point(method, f"{label} q={p.q:g}", p.flops, p.seconds / sweep.num_samples, 100 * p.accuracy,
                      p.members) for p in sweep.points]
    if method == IRENE:
        return [_halted_point(method, label, model, test, batch, repeats)]
    images = test[0][:batch].to(next(model.parameters()).device)
    return [Point(method, label if method == SINGLE else f"{label} k={k}", flops,
                  _fixed_latency(model, images, k, repeats), 100 * accuracy, k)
            for k, (accuracy, flops) in enumerate(zip(report.prefix_accuracy, report.prefix_flops), 1)]


# ------------------------------------------------------------------ running
def run(args: argparse.Namespace) -> int:
    from ensemblekit.training.config import RunConfig, TrainConfig
    from ensemblekit.training.trainer import run as run_one

    start = time.perf_counter()
    if args.data is None:
        args.data = "digits" if args.smoke else default_dataset()
    if args.seeds < 1 or args.latency_batch < 1 or args.latency_repeats < 1:
        raise TableError("--seeds, --latency-batch and --latency-repeats must be at least 1")
    seeds = seed_range(args.seed, args.seeds)
    chosen = settings(args)
    out = args.out or Path("ensemblekit-runs") / f"pareto-{args.data}"
    device = device_name(args.device)
    data = _data_config(args, chosen)

    def configs(seed: int) -> dict[str, tuple[str, Any]]:
        """Label -> (method, RunConfig) of every model trained with ``seed``."""
        train = TrainConfig(epochs=chosen["epochs"], batch_size=chosen["batch_size"], lr=chosen["lr"], seed=seed,
                            device=args.device, progress=args.progress)
        return {label: (method, RunConfig(model, data, train)) for label, (method, model) in models(chosen).items()}

    def kept(method: str, config: Any) -> dict[str, Any]:
        """What a finished run of ``config`` must have been trained and measured with to be reused."""
        measured_with = {"latency_batch": chosen["latency_batch"], "latency_repeats": chosen["latency_repeats"],
                         "device": device, **({"budget_qs": chosen["budget_qs"]} if method == MULTI_EXIT else {})}
        return {"run": comparable(config), "measure": measured_with}

    runs_of = {seed: configs(seed) for seed in seeds}
    store = RunStore(out)
    check_settings(store, ((seed, label, kept(method, config)) for seed in seeds
                           for label, (method, config) in runs_of[seed].items()))
    splits = load_splits(data)
    test, val = _tensors(splits.test), _tensors(splits.val)
    description = _describe(chosen, seeds, len(splits.train), device)
    print(f"settings: {description}", flush=True)

    def train(method: str, label: str, config: Any, folder: Path, resume: bool) -> dict[str, Any]:
        t = time.perf_counter()
        result = run_one(config, folder, resume=resume, log=lambda _: None)
        trained = time.perf_counter() - t
        points = measure(method, label, result.model, result.report, test, val, chosen)
        params = result.report.prefix_params
        return {"points": [asdict(p) for p in points], "members": result.report.num_members,
                "params": params[-1] if params else None, "train_seconds": trained,
                "measure_seconds": time.perf_counter() - t - trained, "history": result.train.history}

    def summary(saved: dict[str, Any]) -> str:
        accuracies = [p["accuracy"] for p in saved["points"]]
        return (f"{len(accuracies)} point(s), accuracy {min(accuracies):.1f}-{max(accuracies):.1f}%; trained and "
                f"evaluated in {saved['train_seconds']:.0f} s, measured in {saved['measure_seconds']:.0f} s")

    record: dict[str, Any] = {"settings": chosen, "description": description, "seeds": seeds, "device": device,
                              "models": {}}
    runs: dict[int, list[Point]] = {}
    for seed in seeds:
        for label, (method, config) in runs_of[seed].items():
            saved = get_or_train(store, seed, label, kept(method, config), partial(train, method, label, config),
                                 summary)
            runs.setdefault(seed, []).extend(Point(**p) for p in saved["points"])
            record["models"].setdefault(label, {"method": method, "members": saved["members"],
                                                "params": saved["params"], "seconds": []})
            record["models"][label]["seconds"].append(saved["train_seconds"] + saved["measure_seconds"])
            _write_results(out, record, runs, start)
    points, _ = mean_points(list(runs.values()))
    print()
    print(table(points))
    for name, cost, show in _axes():
        print(f"\nbest method per {name} band (edges: the single backbones' {name})")
        print(bands_table(points, cost, show))
    print()
    for name, cost, show in _axes():
        print(verdict(points, cost, name, show))
    for name, cost, _ in _axes():
        path = out / f"pareto_{'flops' if name == 'FLOPs' else 'latency'}.png"
        plot(points, cost, path, _AXIS_LABELS[name], f"accuracy vs {name} on {args.data} ({device})")
    _write_results(out, record, runs, start)
    print(f"\noutputs in {out.resolve()}: {', '.join(RESULTS)}, one folder per seed and model")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


# ------------------------------------------------------------------ reporting
_AXIS_LABELS = {"FLOPs": "FLOPs per image (multiply-add = 2)", "latency": "seconds per image (measured)"}


def _axes() -> list[tuple[str, Callable[[Point], float], Callable[[float], str]]]:
    """(name, cost of a point, how a cost is shown) for FLOPs and latency."""
    from ensemblekit.evaluation.formatting import format_si

    return [("FLOPs", lambda p: p.flops, format_si), ("latency", lambda p: p.latency, lambda s: f"{s * 1e6:.1f} us")]


def _fronts(points: Sequence[Point]) -> dict[str, set[int]]:
    return {name: set(pareto_front([(cost(p), p.accuracy) for p in points])) for name, cost, _ in _axes()}


def table(points: Sequence[Point], markdown: bool = False) -> str:
    """Every point sorted by FLOPs, with the Pareto fronts it is on (F: by FLOPs, L: by latency)."""
    from ensemblekit.evaluation.formatting import format_si

    fronts = _fronts(points)
    order = sorted(range(len(points)), key=lambda i: (points[i].flops, -points[i].accuracy))
    rows = [(points[i].method, points[i].label, format_si(points[i].flops), f"{points[i].latency * 1e6:.1f}",
             f"{points[i].accuracy:.2f}", f"{points[i].members:.2f}",
             ("F" if i in fronts["FLOPs"] else "") + ("L" if i in fronts["latency"] else ""))
            for i in order]
    header = ("method", "point", "FLOPs/img", "us/img", "acc %", "members", "front")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = (-23, -28, 9, 8, 6, 7, -5)  # negative: left-aligned

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, widths)).rstrip()

    lines = ["points by FLOPs (front: F on the accuracy-vs-FLOPs Pareto front, L on the accuracy-vs-latency one)",
             line(header), "-" * len(line(header))]
    return "\n".join(lines + [line(row) for row in rows])


def bands(points: Sequence[Point], cost: Callable[[Point], float]) -> list[tuple[float, float, Point | None]]:
    """(low, high, most accurate point) per cost band, the single backbones' costs as edges."""
    pairs = [(cost(p), p.accuracy) for p in points]
    edges = band_edges([c for c, _ in pairs], [cost(p) for p in points if p.method == SINGLE])
    best = best_per_band(pairs, edges)
    return [(low, high, None if i is None else points[i]) for low, high, i in zip(edges, edges[1:], best)]


def bands_table(points: Sequence[Point], cost: Callable[[Point], float], show: Callable[[float], str],
                markdown: bool = False) -> str:
    """The best method per cost band as a text (or Markdown) table."""
    at_edge = {cost(p): p.label for p in points if p.method == SINGLE}
    rows = []
    for low, high, best in bands(points, cost):
        band = f"{show(low)} - {show(high)}" + (f" ({at_edge[high]})" if high in at_edge else "")
        rows.append((band, "-", "", "", "") if best is None else
                    (band, best.method, best.label, f"{best.accuracy:.2f}", show(cost(best))))
    if markdown:
        return "\n".join(["| band (upper edge) | best method | point | acc % | cost |", "|---|---|---|---:|---:|"]
                         + ["| " + " | ".join(row) + " |" for row in rows])
    return "\n".join(f"{band:<40}{method:<24}{label:<28}{acc:>7}  {shown}" for band, method, label, acc, shown in rows)


def plot(points: Sequence[Point], cost: Callable[[Point], float], path: Path, xlabel: str, title: str) -> Path:
    """Accuracy against ``cost`` (log axis), one marker per method, the Pareto front as a step line (PNG)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, LogLocator

    from ensemblekit.evaluation.reports import save_accuracy_figure

    fig = Figure(figsize=(7.2, 4.8), dpi=150)
    ax = fig.add_subplot()
    for method in METHODS:
        mine = sorted((p for p in points if p.method == method), key=cost)
        if mine:
            ax.plot([cost(p) for p in mine], [p.accuracy for p in mine], marker=MARKERS[method], markersize=5,
                    linestyle="none" if method in (SINGLE, IRENE) else "-", linewidth=0.8, label=method)
    for p in points:
        if p.method == SINGLE:
            ax.annotate(p.label, (cost(p), p.accuracy), textcoords="offset points", xytext=(4, -9), fontsize=6)
    front = [points[i] for i in pareto_front([(cost(p), p.accuracy) for p in points])]
    ax.step([cost(p) for p in front], [p.accuracy for p in front], where="post", color="black", linewidth=1,
            alpha=0.6, label="Pareto front")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        set_formatter(EngFormatter(unit="s" if "seconds" in xlabel else ""))
    ax.set_xlabel(xlabel)
    ax.grid(True, which="both", alpha=0.3)
    return save_accuracy_figure(fig, ax, path, title)


def _write_results(out: Path, record: dict[str, Any], runs: dict[int, list[Point]], start: float) -> None:
    """``pareto.json`` and ``pareto.md`` from the models finished so far."""
    import torch

    from ensemblekit.training.checkpoint import atomic_write

    points, spread = mean_points(list(runs.values()))
    fronts = _fronts(points)
    done = {**record, "torch": torch.__version__, "wall_seconds": time.perf_counter() - start,
            "units": {"flops": "per image, multiply-add = 2", "latency": "seconds per image", "accuracy": "%"},
            "points": [{**asdict(p), "accuracy_std": spread[p.label], "front_flops": i in fronts["FLOPs"],
                        "front_latency": i in fronts["latency"]} for i, p in enumerate(points)],
            "per_seed": {str(seed): [asdict(p) for p in seed_points] for seed, seed_points in runs.items()},
            "bands": {name: [{"low": low, "high": high, "method": best and best.method, "label": best and best.label,
                              "accuracy": best and best.accuracy} for low, high, best in bands(points, cost)]
                      for name, cost, _ in _axes()},
            "verdict": [verdict(points, cost, name, show) for name, cost, show in _axes()]}
    atomic_write(out / "pareto.json", json.dumps(done, indent=2) + "\n")
    text = [f"# When is an adaptive ensemble better than a bigger model? ({record['settings']['data']})", "",
            f"{record['description']}; torch {done['torch']}; wall time {done['wall_seconds']:.0f} s "
            f"({len(record['models'])} models finished).", "", table(points, markdown=True)]
    for name, cost, show in _axes():
        text += ["", f"Best method per {name} band (edges: the single backbones' {name}):", "",
                 bands_table(points, cost, show, markdown=True)]
    text += ["", *done["verdict"], "", "![accuracy vs FLOPs](pareto_flops.png) "
             "![accuracy vs latency](pareto_latency.png)", ""]
    atomic_write(out / "pareto.md", "\n".join(text))
