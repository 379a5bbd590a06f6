"""``ensemblekit demo``: HNE with hierarchical distillation next to the independent loss, on digits."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

NAME = "demo"
HELP = ("Train a tree ensemble (16 members) from a small timm ResNet on the bundled digits data, once with "
        "hierarchical distillation (HNE) and once with the independent loss; print both anytime tables "
        "and plot accuracy against FLOPs.")

BACKBONE = "resnet10t"
BACKBONE_OPTIONS = {"stem_width": 16, "channels": [16, 32, 64, 128]}
"""resnet10t at a quarter of its width, cut at its five stages: 16 members train in seconds per epoch on a CPU."""
IMAGE_SIZE = 16
"""The digits are 8x8 images; 16x16 keeps every pixel and a 1x1 map after the last stage."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: ensemblekit-runs/demo-<date>-<time>)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per model (default: 10)")
    parser.add_argument("--depth", type=int, default=4, help="tree depth: 2^depth members (default: 4, as in HNE)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long check: 1 epoch on 128 images, a tree of depth 2, a narrower backbone")


def configs(args: argparse.Namespace) -> dict:
    """The two runs of the demo: the same tree and seed, two losses."""
    from ensemblekit.training.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    options, depth, epochs = dict(BACKBONE_OPTIONS), args.depth, args.epochs
    data = DataConfig(name="digits", image_size=IMAGE_SIZE)
    if args.smoke:
        options = {"stem_width": 8, "channels": [8, 16, 32, 64]}
        depth, epochs = 2, 1
        data = DataConfig(name="digits", image_size=IMAGE_SIZE, max_train_items=128, max_eval_items=128)
    train = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                        progress=args.progress)
    runs = {}
    for label, loss in (("independent (L_I)", "independent"), ("hierarchical distillation (L_HD)", None)):
        recipe_options = {"depth": depth} if loss is None else {"depth": depth, "loss": loss}
        model = ModelConfig(BACKBONE, backbone_options=options, recipe="hne", recipe_options=recipe_options)
        runs[label] = RunConfig(model, data, train)
    return runs


def run(args: argparse.Namespace) -> int:
    from ensemblekit.training.trainer import run_many, slug

    start = time.perf_counter()
    out = args.out or Path("ensemblekit-runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    runs = configs(args)
    first = next(iter(runs.values()))
    print(f"ensemblekit demo: {BACKBONE} {first.model.backbone_options} as an HNE tree of "
          f"{2 ** first.model.recipe_options['depth']} members on digits ({first.data.image_size}x"
          f"{first.data.image_size}), {first.train.epochs} epochs per loss")
    try:
        results = run_many(runs, out, title="digits: HNE tree, hierarchical distillation vs independent")
    except FileExistsError as err:
        print(f"ensemblekit demo: error: {err}", file=sys.stderr)
        return 2
    print(comparison(results))
    print(f"\noutputs in {out.resolve()}:")
    for label, result in results.items():
        print(f"  {label}: {out / slug(label)} (checkpoints/, report.json, report.txt, accuracy_vs_flops.png)")
    print(f"  both curves: {out / 'accuracy_vs_flops.png'}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def comparison(results: dict) -> str:
    """Test accuracy of every prefix under both losses, side by side."""
    labels = list(results)
    reports = [results[label].report for label in labels]
    lines = ["\nmembers | FLOPs | " + " | ".join(f"{label} acc %" for label in labels)]
    lines.append("|".join(["---"] * (2 + len(labels))))
    for k in range(reports[0].num_members):
        flops = reports[0].prefix_flops[k] / 1e6
        lines.append(f"{k + 1} | {flops:.2f}M | " + " | ".join(f"{100 * r.prefix_accuracy[k]:.2f}" for r in reports))
    return "\n".join(lines)
