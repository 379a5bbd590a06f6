"""``ensemblekit demo``: HNE with hierarchical distillation next to the independent loss, on Fashion-MNIST.

The main job. On Fashion-MNIST (when its files are on this machine; digits
otherwise) a 16-member tree of a quarter-width resnet10t is trained twice, with
hierarchical distillation (HNE's L_I + L_HD) and with the independent loss
(L_I), and next to them the ensemble a user would otherwise build: four
independent copies of the same network. Every prefix is evaluated on the test
set with a 95% bootstrap interval of its accuracy and of its gain over the
first member (paired on the same images), so the output says whether more
members really help or whether the gain is within the spread.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["BACKBONE", "DEEP_ENSEMBLE", "SETTINGS", "add_arguments", "comparison", "configs", "run", "verdict"]

NAME = "demo"
HELP = ("Train a 16-member tree ensemble of a small timm ResNet on Fashion-MNIST (digits where it is absent), "
        "with hierarchical distillation (HNE) and with the independent loss, and a deep ensemble of 4 beside them; "
        "print the anytime tables with bootstrap intervals and plot accuracy against FLOPs.")

BACKBONE = "resnet10t"
SETTINGS: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"backbone_options": {"stem_width": 8, "channels": [16, 32, 64, 128]}, "image_size": 28,
                      "epochs": 1, "batch_size": 128, "lr": 0.1, "augment": False},
    "digits": {"backbone_options": {"stem_width": 16, "channels": [16, 32, 64, 128]}, "image_size": 16,
               "epochs": 10, "batch_size": 64, "lr": 0.05, "augment": True},
}
"""Per dataset: resnet10t at a quarter of its width, cut at its five stages. Fashion-MNIST: one epoch on the
54k training images without augmentation (on one epoch random crops and flips cost 5 points), about a minute
per tree on 2 CPU cores; digits (8x8 images shown at 16x16): 10 epochs on 1.3k images."""
DEEP_ENSEMBLE = 4
"""Members of the independent ensemble shown for comparison (each a whole network)."""
SMOKE = {"backbone_options": {"stem_width": 8, "channels": [8, 16, 32, 64]}, "epochs": 1, "depth": 2,
         "max_items": 128}
"""``--smoke``: a seconds-long check (128 images, 1 epoch, a tree of depth 2, a narrower backbone)."""
LOSSES = {"HNE tree, L_I+L_HD": None, "HNE tree, L_I": "independent"}
"""Label -> loss of the tree (None: the HNE recipe's default, L_I + L_HD)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=tuple(SETTINGS), default=None,
                        help="default: fashion-mnist where its files are on this machine, else digits")
    parser.add_argument("--root", default=None, help="folder holding the four Fashion-MNIST files (default: "
                        "$ENSEMBLEKIT_FASHION_MNIST, then the Debian package dataset-fashion-mnist)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: ensemblekit-runs/demo-<date>-<time>)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per model (default: per dataset)")
    parser.add_argument("--depth", type=int, default=4, help="tree depth: 2^depth members (default: 4, as in HNE)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long check: 1 epoch on 128 images, a tree of depth 2, a narrower backbone")


def configs(args: argparse.Namespace) -> dict:
    """The runs of the demo: the same tree, data and seed with two losses, and an independent ensemble."""
    from ensemblekit.training.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    chosen = dict(SETTINGS[args.data])
    depth, limit = args.depth, None
    if args.smoke:
        chosen.update(backbone_options=SMOKE["backbone_options"], epochs=SMOKE["epochs"])
        depth, limit = SMOKE["depth"], SMOKE["max_items"]
    data = DataConfig(name=args.data, root=args.root, image_size=chosen["image_size"], augment=chosen["augment"],
                      max_train_items=limit, max_eval_items=limit)
    train = TrainConfig(epochs=args.epochs or chosen["epochs"], batch_size=args.batch_size or chosen["batch_size"],
                        lr=args.lr or chosen["lr"], seed=args.seed, device=args.device, progress=args.progress)
    runs = {}
    for label, loss in LOSSES.items():
        recipe_options = {"depth": depth} if loss is None else {"depth": depth, "loss": loss}
        model = ModelConfig(BACKBONE, backbone_options=chosen["backbone_options"], recipe="hne",
                            recipe_options=recipe_options)
        runs[label] = RunConfig(model, data, train)
    members = 2 if args.smoke else DEEP_ENSEMBLE
    independent = ModelConfig(BACKBONE, backbone_options=chosen["backbone_options"],
                              topology={"name": "independent", "members": members}, loss="independent")
    runs[f"deep ensemble of {members}, L_I"] = RunConfig(independent, data, train)
    return runs


def run(args: argparse.Namespace) -> int:
    from ensemblekit.errors import EnsembleKitError
    from ensemblekit.reproduce.runs import default_dataset
    from ensemblekit.training.trainer import load_split, run_many, slug

    start = time.perf_counter()
    if args.data is None:
        args.data = default_dataset()
    out = args.out or Path("ensemblekit-runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    runs = configs(args)
    first = next(iter(runs.values()))
    try:
        train_set, info = load_split(first.data, first.data.train_split, limit=first.data.max_train_items,
                                     seed=first.train.seed)
        test_set, _ = load_split(first.data, first.data.eval_split, limit=first.data.max_eval_items)
    except EnsembleKitError as err:
        print(f"ensemblekit demo: error: {err}", file=sys.stderr)
        return 2
    source = info.source or "the copy bundled with scikit-learn (no download)"
    print(f"data: {args.data}, {len(train_set)} training and {len(test_set)} test images "
          f"({first.data.image_size}x{first.data.image_size}), from {source}")
    print(f"models: {BACKBONE} {first.model.backbone_options} as an HNE tree of "
          f"{2 ** first.model.recipe_options['depth']} members (two losses) and as a {list(runs)[-1].split(',')[0]}; "
          f"{first.train.epochs} epoch(s) each {'with' if first.data.augment else 'without'} augmentation, "
          f"batch {first.train.batch_size}, SGD lr {first.train.lr} cosine, seed {first.train.seed}", flush=True)
    try:
        results = run_many(runs, out, title=f"{args.data}: HNE trees and a deep ensemble (bands: 95% bootstrap)")
    except FileExistsError as err:
        print(f"ensemblekit demo: error: {err}", file=sys.stderr)
        return 2
    reports = {label: result.report for label, result in results.items()}
    print(comparison(reports))
    print()
    for label, report in reports.items():
        print(f"{label}: {verdict(report)}")
    print(f"\noutputs in {out.resolve()}:")
    for label in results:
        print(f"  {label}: {out / slug(label)} (checkpoints/, report.json, report.txt, accuracy_vs_flops.png)")
    print(f"  all curves: {out / 'accuracy_vs_flops.png'}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def comparison(reports: dict) -> str:
    """Test accuracy of every prefix of every model, with its FLOPs, its 95% bootstrap interval and its gain
    over the first member (95% interval, paired on the same images), sorted by FLOPs."""
    rows = sorted(((r.prefix_flops[k] if r.prefix_flops else k, label, k) for label, r in reports.items()
                   for k in range(r.num_members)))
    first = next(iter(reports.values()))
    lines = [f"\ntest accuracy of the first k members of each model by FLOPs ({first.num_samples} images; in "
             "brackets: 95% bootstrap intervals)", "",
             "| model | k | FLOPs | acc % | gain vs k=1 |", "|---|---:|---:|---:|---:|"]
    for _, label, k in rows:
        r = reports[label]
        flops = "-" if r.prefix_flops is None else f"{r.prefix_flops[k] / 1e6:.1f}M"
        acc = f"{100 * r.prefix_accuracy[k]:.2f}"
        gain = f"{100 * (r.prefix_accuracy[k] - r.prefix_accuracy[0]):+.2f}"
        if r.prefix_accuracy_low is not None and r.prefix_gain_low is not None:
            acc += f" [{100 * r.prefix_accuracy_low[k]:.2f}, {100 * r.prefix_accuracy_high[k]:.2f}]"
            gain += f" [{100 * r.prefix_gain_low[k]:+.2f}, {100 * r.prefix_gain_high[k]:+.2f}]"
        lines.append(f"| {label} | {k + 1} | {flops} | {acc} | {gain} |")
    return "\n".join(lines)


def verdict(report: Any) -> str:
    """Whether the gain of all members over the first is larger than its bootstrap spread, in words.

    Examples:
        >>> from ensemblekit.evaluation.reports import Report
        >>> r = Report(100, 2, [0.80, 0.83], [0.8, 0.79], [float("nan"), 0.1], [0.1, 0.1], [0.5, 0.4],
        ...            prefix_gain_low=[0.0, 0.01], prefix_gain_high=[0.0, 0.05])
        >>> verdict(r)
        '2 members 83.00% vs member 1 80.00%: gain +3.00 points, 95% interval [+1.00, +5.00]: larger than the spread'
    """
    m = report.num_members
    gain = 100 * (report.prefix_accuracy[-1] - report.prefix_accuracy[0])
    head = (f"{m} members {100 * report.prefix_accuracy[-1]:.2f}% vs member 1 {100 * report.prefix_accuracy[0]:.2f}%"
            f": gain {gain:+.2f} points")
    if report.prefix_gain_low is None or report.prefix_gain_high is None:
        return head + " (no interval: evaluated without bootstrap)"
    low, high = 100 * report.prefix_gain_low[-1], 100 * report.prefix_gain_high[-1]
    if low > 0:
        judged = "larger than the spread"
    elif high < 0:
        judged = "a loss larger than the spread"
    else:
        judged = "NOT larger than the spread: on this data and schedule the ensemble is not shown to help"
    return f"{head}, 95% interval [{low:+.2f}, {high:+.2f}]: {judged}"
