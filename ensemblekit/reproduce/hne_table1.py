"""HNE Table 1: the training-objective ablation (Ruiz & Verbeek).

Trains the same tree ensemble (same backbone, seed and schedule) with four
objectives, L_I, L_S (L_H in the arXiv version), L_I + L_S and
L_I + L_HD, and prints the test accuracy of the nested ensembles of
1, 2, 4, ... members next to the paper's numbers for that dataset. The paper
reports CIFAR-10 and CIFAR-100 with its own depth-wise ResNets (HNE and the
half-width HNE_small); here the tree is built from a timm backbone, so the
numbers are comparable in trend, not in value.
"""

from __future__ import annotations

import argparse
import sys
import json
import time
from pathlib import Path

NAME = "hne-table1"
HELP = ("HNE Table 1: a tree ensemble trained with L_I, L_S, L_I+L_S and L_I+L_HD; accuracy of 1, 2, 4, ... "
        "members next to the paper's numbers.")

LOSSES = {
    "L_I": "independent",
    "L_S": "nested",
    "L_I+L_S": "independent+nested",
    "L_I+L_HD": "hierarchical_distillation",
}
"""Row label -> loss name, in the paper's row order."""

PAPER_COLUMNS = (1, 2, 4, 8, 16)
PAPER = {
    "cifar10": {
        "HNE_small": {
            "L_I": (91.7, 92.4, 93.2, 93.7, 94.0),
            "L_S": (91.6, 92.1, 92.7, 92.9, 93.3),
            "L_I+L_S": (90.7, 91.4, 92.4, 93.4, 93.6),
            "L_I+L_HD": (92.7, 93.1, 93.4, 94.1, 94.3),
        },
        "HNE": {
            "L_I": (93.6, 94.2, 94.8, 95.0, 95.2),
            "L_S": (92.9, 93.6, 93.5, 94.1, 94.4),
            "L_I+L_S": (92.8, 93.6, 94.3, 94.9, 95.2),
            "L_I+L_HD": (94.6, 94.9, 95.1, 95.5, 95.6),
        },
    },
    "cifar100": {
        "HNE_small": {
            "L_I": (67.7, 70.0, 71.9, 73.4, 74.8),
            "L_S": (65.0, 66.3, 68.3, 69.6, 72.6),
            "L_I+L_S": (67.9, 70.4, 73.1, 74.3, 75.0),
            "L_I+L_HD": (71.1, 71.7, 73.4, 74.5, 75.3),
        },
        "HNE": {
            "L_I": (73.5, 75.4, 77.5, 79.0, 79.7),
            "L_S": (70.7, 73.3, 74.0, 75.7, 76.8),
            "L_I+L_S": (71.7, 73.8, 76.7, 78.7, 79.5),
            "L_I+L_HD": (76.1, 77.2, 78.0, 79.0, 79.8),
        },
    },
}
"""Table 1 of arXiv "Distilled Hierarchical Neural Ensembles with Adaptive Inference Cost" (N = 16),
test accuracy in %; the AAAI version's Table 1 repeats the L_I, L_S and L_HD rows."""

# Per dataset: backbone, its options, image size, tree depth, epochs, batch size, learning rate.
DEFAULTS = {
    "digits": ("resnet10t", {"stem_width": 16, "channels": [16, 32, 64, 128]}, 16, 4, 5, 64, 0.05),
    "cifar10": ("resnet18", {}, 32, 4, 200, 128, 0.1),
    "cifar100": ("resnet18", {}, 32, 4, 200, 128, 0.1),
}
"""CIFAR settings follow the paper's appendix (SGD, lr 0.1, momentum 0.9, weight decay 5e-4, cosine,
200 epochs, batch 128, 16 members); digits is sized to run in minutes on a CPU."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=tuple(DEFAULTS), default="digits")
    parser.add_argument("--root", default=None, help="folder holding the CIFAR python version")
    parser.add_argument("--backbone", default=None, help="timm model name (default: per dataset)")
    parser.add_argument("--depth", type=int, default=None, help="tree depth B: 2^B members (default: 4)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation weight of L_I+L_HD (paper: 0.5)")
    parser.add_argument("--T", type=float, default=2.0, help="distillation temperature (paper: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--out", type=Path, default=None, help="default: ensemblekit-runs/hne-table1-<data>")
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long check: 128 images, 1 epoch, depth 2, a narrower backbone")


def configs(args: argparse.Namespace) -> dict:
    """One run config per row of the table."""
    from ensemblekit.training.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    backbone, options, size, depth, epochs, batch, lr = DEFAULTS[args.data]
    data = DataConfig(name=args.data, root=args.root, image_size=size)
    if args.tiny:
        options, depth, epochs = {"stem_width": 8, "channels": [8, 16, 32, 64]}, 2, 1
        backbone, batch, size = "resnet10t", 32, 16
        data = DataConfig(name=args.data, root=args.root, image_size=size, max_train_items=128, max_eval_items=128)
    if args.backbone is not None:
        backbone, options = args.backbone, {}
    train = TrainConfig(epochs=args.epochs or epochs, batch_size=args.batch_size or batch, lr=args.lr or lr,
                        seed=args.seed, device=args.device, progress=args.progress)
    runs = {}
    for label, loss in LOSSES.items():
        spec = {"name": loss, "alpha": args.alpha, "T": args.T} if loss == "hierarchical_distillation" else loss
        model = ModelConfig(backbone, backbone_options=options, recipe="hne",
                            recipe_options={"depth": args.depth or depth, "loss": spec})
        runs[label] = RunConfig(model, data, train)
    return runs


def run(args: argparse.Namespace) -> int:
    from ensemblekit.training.trainer import run_many

    start = time.perf_counter()
    out = args.out or Path("ensemblekit-runs") / f"hne-table1-{args.data}"
    runs = configs(args)
    try:
        results = run_many(runs, out, title=f"HNE Table 1 ablation on {args.data}")
    except FileExistsError as err:
        print(f"ensemblekit reproduce {NAME}: error: {err}", file=sys.stderr)
        return 2
    ours = {label: {k + 1: 100 * a for k, a in enumerate(r.report.prefix_accuracy)} for label, r in results.items()}
    print(table(ours, args.data))
    first = next(iter(runs.values()))
    record = {"data": args.data, "backbone": first.model.backbone, "backbone_options": first.model.backbone_options,
              "depth": first.model.recipe_options["depth"], "epochs": first.train.epochs,
              "ours": {label: {str(k): v for k, v in accs.items()} for label, accs in ours.items()},
              "paper": {model: {label: dict(zip(map(str, PAPER_COLUMNS), row)) for label, row in rows.items()}
                        for model, rows in PAPER.get(args.data, {}).items()}}
    from ensemblekit.training.checkpoint import atomic_write

    atomic_write(out / "hne_table1.json", json.dumps(record, indent=2) + "\n")
    print(f"\noutputs in {out.resolve()}: hne_table1.json, accuracy_vs_flops.png, one folder per loss")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def table(ours: dict[str, dict[int, float]], data: str) -> str:
    """The paper's layout: a row per loss, a column per number of members, paper rows below ours."""
    members = max(max(accs) for accs in ours.values())
    paper = PAPER.get(data, {})
    columns = [1]
    while columns[-1] * 2 <= max(members, PAPER_COLUMNS[-1] if paper else 1):
        columns.append(columns[-1] * 2)
    name = {"digits": "digits", "cifar10": "C10", "cifar100": "C100"}[data]
    header = f"{'loss':<9} {'model':<18}" + "".join(f"{c:>7}" for c in columns)
    lines = [f"HNE Table 1 ablation, accuracy (%) by number of models evaluated ({name})", header,
             "-" * len(header)]
    for label in LOSSES:
        row = ours[label]
        lines.append(f"{label:<9} {'this run':<18}" + "".join(
            f"{row[c]:>7.1f}" if c in row else f"{'-':>7}" for c in columns))
        for model, rows in paper.items():
            values = dict(zip(PAPER_COLUMNS, rows[label]))
            lines.append(f"{'':<9} {'paper ' + model:<18}" + "".join(
                f"{values[c]:>7.1f}" if c in values else f"{'-':>7}" for c in columns))
    if not paper:
        lines.append("(the paper reports CIFAR-10 and CIFAR-100 only; there are no paper numbers for digits)")
    return "\n".join(lines)
