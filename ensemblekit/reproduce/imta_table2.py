"""``ensemblekit reproduce imta-table2``: IMTA's GE / ISC / OFA ablation (Li et al., ICCV 2019, Table 2).

A timm backbone cut into five blocks with an exit after each (the paper: a
five-exit MSDNet on CIFAR-100) is trained in the paper's two phases for each
row of Table 2:

* phase I: the whole network, ``sum_k CE_k`` (Eq. 1), with Gradient
  Equilibrium (Eq. 4-5) in the GE rows;
* phase II: backbone and its BatchNorm statistics frozen, only the exit heads
  (and ISC modules) trained, with Inline Subnetwork Collaboration in the ISC
  rows and One-for-all KD (Eq. 7-8) in the OFA rows; rows without ISC and OFA
  get the same phase II with plain cross-entropy, so rows differ only in the
  techniques.

Both phases are the stages of the ``"two_phase"`` training schedule
(:mod:`ensemblekit.methods.imta.schedule`), run by
:func:`ensemblekit.training.trainer.train`; rows with the same phase I (with
or without GE) share one phase-I training, and each row runs its own phase II
stage from a copy of it.
Reported: top-1 accuracy (%) of every exit on the test split, next to the
paper's Table 2. Optimiser as the paper's (SGD, Nesterov momentum 0.9,
weight decay 1e-4, lr 0.1, batch 64) with a cosine schedule instead of the
paper's steps at 50% and 75% of each phase (the shared trainer has no
multi-step schedule). ``--budget-plot`` also calibrates the budgeted policy
of the full IMTA row on the validation split and plots the budgeted curve
next to the anytime curve (:mod:`ensemblekit.evaluation.budget`).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ensemblekit.core.flops import flops_to_macs

NAME = "imta-table2"
HELP = "IMTA (ICCV 2019) Table 2: GE / ISC / OFA ablation of a 5-exit network, accuracy at every exit."

ROWS: tuple[tuple[bool, bool, bool], ...] = (
    (False, False, False),
    (True, False, False),
    (False, True, False),
    (False, False, True),
    (True, True, True),
)
"""Table 2's rows as (GE, ISC, OFA)."""

PAPER: dict[tuple[bool, bool, bool], tuple[float, ...]] = {
    (False, False, False): (60.09, 63.73, 67.89, 70.48, 71.81),
    (True, False, False): (60.35, 64.38, 68.72, 70.65, 71.94),
    (False, True, False): (60.19, 64.72, 68.07, 70.94, 73.28),
    (False, False, True): (60.39, 64.20, 68.10, 70.65, 71.85),
    (True, True, True): (60.78, 65.54, 69.98, 72.27, 73.45),
}
"""IMTA Table 2: top-1 (%) at exits E-1..E-5 of a five-exit MSDNet on CIFAR-100."""

DEFAULT_EPOCHS = {"digits": (30, 10), "cifar100": (300, 180)}
"""(phase I, phase II) epochs: the paper's 300 and 180 on CIFAR; fewer on the small digits set."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=("digits", "cifar100"), default="digits")
    parser.add_argument("--root", default=None, help="CIFAR-100 folder (holding cifar-100-python/)")
    parser.add_argument("--backbone", default="resnet18", help="timm model name (the paper: MSDNet)")
    parser.add_argument("--num-blocks", type=int, default=5, help="blocks, one exit after each (the paper: 5)")
    parser.add_argument("--epochs", type=int, default=None, help=f"phase I epochs (default {DEFAULT_EPOCHS})")
    parser.add_argument("--phase2-epochs", type=int, default=None, help="phase II epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.1, help="OFA weight of the distillation term (Eq. 7)")
    parser.add_argument("--temperature", type=float, default=1.0, help="OFA temperature T")
    parser.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--limit-eval", type=int, default=None, help="use only the first N val and test images")
    parser.add_argument("--image-size", type=int, default=None, help="resize the images (default: the dataset's 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--budget-plot", default=None,
                        help="also run the budgeted evaluation of the GE+ISC+OFA row and write this PNG")
    parser.add_argument("--timing-repeats", type=int, default=3, help="budget timings: fastest of this many runs")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    results = reproduce(**{k: getattr(args, k) for k in (
        "data", "root", "backbone", "num_blocks", "epochs", "phase2_epochs", "batch_size", "lr", "weight_decay",
        "alpha", "temperature", "limit_train", "limit_eval", "image_size", "seed", "device", "budget_plot",
        "timing_repeats")})
    print(table(results))
    if "budget" in results:
        print(results["budget_table"])
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v for k, v in results.items() if k != "budget_table"}, indent=2) + "\n")
    return 0


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))


def reproduce(data: str = "digits", root: str | None = None, backbone: str = "resnet18", num_blocks: int = 5,
              epochs: int | None = None, phase2_epochs: int | None = None, batch_size: int = 64, lr: float = 0.1,
              weight_decay: float = 1e-4, alpha: float = 0.1, temperature: float = 1.0,
              limit_train: int | None = None, limit_eval: int | None = None, image_size: int | None = None,
              seed: int = 0, device: str = "auto", budget_plot: str | None = None,
              timing_repeats: int = 3) -> dict[str, Any]:
    """Train and evaluate the five rows of Table 2; returns settings, rows and the paper's numbers."""
    from ensemblekit.backbones import create_backbone
    from ensemblekit.evaluation.reports import collect_members
    from ensemblekit.methods.imta.recipe import multi_exit
    from ensemblekit.training.config import TrainConfig
    from ensemblekit.training.data import load_dataset, make_loader
    from ensemblekit.training.trainer import resolve_stages, seed_everything, select_device, train

    default_1, default_2 = DEFAULT_EPOCHS[data]
    epochs = default_1 if epochs is None else epochs
    phase2_epochs = default_2 if phase2_epochs is None else phase2_epochs
    dev = select_device(device)
    train_set, info = load_dataset(data, "train", root=root, image_size=image_size)
    train_set = _limit(train_set, limit_train)
    val_set = _limit(load_dataset(data, "val", root=root, image_size=image_size)[0], limit_eval)
    test_set = _limit(load_dataset(data, "test", root=root, image_size=image_size)[0], limit_eval)
    example = torch.zeros(1, info.in_chans, info.image_size, info.image_size)

    def config(isc: bool = False, ofa: bool = False) -> TrainConfig:
        """The settings of both phases; ``stages`` is the two-phase schedule with the row's phase II."""
        schedule = {"name": "two_phase", "phase2_epochs": phase2_epochs, "isc": "concat" if isc else None,
                    "ofa": ofa, "alpha": alpha, "temperature": temperature}
        return TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="sgd", lr=lr, momentum=0.9,
                           nesterov=True, weight_decay=weight_decay, schedule="cosine", seed=seed, device=str(dev),
                           progress="none", stages=schedule)

    phase1: dict[bool, Any] = {}
    for ge in sorted({row[0] for row in ROWS}):
        seed_everything(seed)  # every row starts from the same weights
        model = create_backbone(backbone, num_classes=info.num_classes)
        net = multi_exit(model, num_blocks=num_blocks, gradient_equilibrium=ge, example_input=example)
        train(net, train_set, config(), stages=resolve_stages(net, config())[:1])  # phase I
        phase1[ge] = net

    test_loader = make_loader(test_set, 256, shuffle=False)
    rows, nets = [], {}
    for ge, isc, ofa in ROWS:
        net = copy.deepcopy(phase1[ge])
        seed_everything(seed + 1)
        row_config = config(isc, ofa)
        train(net, train_set, row_config, stages=resolve_stages(net, row_config)[1:])  # phase II: ISC, OFA, frozen
        net.eval()
        members, labels = collect_members(net.forward_members, test_loader, dev)
        accuracy = (members.argmax(-1) == labels[:, None]).double().mean(0) * 100
        rows.append({"ge": ge, "isc": isc, "ofa": ofa, "top1": accuracy.tolist(),
                     "paper": list(PAPER[(ge, isc, ofa)])})
        nets[(ge, isc, ofa)] = net
    full = nets[ROWS[-1]]
    results: dict[str, Any] = {
        "settings": {"data": data, "backbone": backbone, "num_blocks": num_blocks, "exits": full.num_members,
                     "epochs": epochs, "phase2_epochs": phase2_epochs, "batch_size": batch_size, "lr": lr,
                     "weight_decay": weight_decay, "alpha": alpha, "temperature": temperature, "seed": seed,
                     "image_size": info.image_size, "train_images": len(train_set), "val_images": len(val_set),
                     "test_images": len(test_set),
                     "device": str(dev)},
        "exit_flops": [float(r.flops) for r in full.cost_table(input_size=tuple(example.shape[1:]))],
        "rows": rows,
    }
    if budget_plot:
        from ensemblekit.evaluation.budget import budget_sweep, plot_budget

        report = budget_sweep(full, make_loader(val_set, 256, shuffle=False), test_loader, repeats=timing_repeats)
        plot_budget(report, budget_plot, title=f"{backbone} GE+ISC+OFA on {data} (test)")
        results["budget"] = report.to_dict()
        results["budget_table"] = report.table()
    return results


def table(results: dict[str, Any]) -> str:
    """The results in the layout of IMTA's Table 2, the paper's numbers (CIFAR-100, MSDNet) beside ours."""
    s = results["settings"]
    n = s["exits"]
    macs = ", ".join(f"{flops_to_macs(f) / 1e6:.2f}" for f in results["exit_flops"])
    size = s["image_size"]
    lines = [
        f"IMTA Table 2 on {s['data']} (test: {s['test_images']} images): {s['backbone']}, {n} exits "
        f"(MMACs per {size}x{size} image to each exit, the papers' \"FLOPs\": {macs}; "
        f"ensemblekit's FLOPs are twice these), phase I {s['epochs']} epoch(s), "
        f"phase II {s['phase2_epochs']} epoch(s), OFA alpha={s['alpha']} T={s['temperature']}",
        "",
    ]
    header = ["GE", "ISC", "OFA"] + [f"E-{k + 1}" for k in range(n)] + [f"paper E-{k + 1}" for k in range(5)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":-:"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    for row in results["rows"]:
        marks = ["✓" if row[key] else "-" for key in ("ge", "isc", "ofa")]
        cells = marks + [f"{a:.2f}" for a in row["top1"]] + [f"{a:.2f}" for a in row["paper"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("paper: Table 2 of Li et al. (ICCV 2019), a five-exit MSDNet on CIFAR-100"
                 + ("" if s["data"] == "cifar100" else f"; this run is on {s['data']}, not comparable in value")
                 + ".")
    return "\n".join(lines)
