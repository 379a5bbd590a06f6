"""``ensemblekit reproduce irene``: IRENE's Tables 1-2 (Li et al., AAAI 2023) on our data.

Four methods with ``T`` members of one backbone, evaluated on the test split:

* single model: the first member of the average ensemble (trained alone);
* average ensemble: ``T`` independently trained members, probabilities averaged;
* WoC: the average ensemble's members as a confidence cascade, threshold
  searched on the validation split (:class:`ensemblekit.methods.irene.woc.WoC`);
* IRENE: ``T`` members and the selector trained sequentially (Algorithm 1,
  the trainer's ``"irene"`` schedule, :mod:`ensemblekit.methods.irene.schedule`),
  deterministic halting (:func:`ensemblekit.methods.irene.recipe`).

Reported: top-1 (%), cost (average members used) and utility (Eq. 14,
:func:`ensemblekit.methods.irene.woc.utility`, relative to this run's single model and
average ensemble), next to the paper's numbers for ResNet-32 and ResNet-18.
Every member gets the same epochs, optimiser and schedule in both ensembles:
both train with :func:`ensemblekit.training.trainer.train` and IRENE's
optimisers (App. A.1), the average ensemble's members all at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

NAME = "irene"
HELP = "IRENE (AAAI 2023) Tables 1-2: single model, average ensemble, WoC and IRENE, top-1 / cost / utility."

PAPER: dict[str, dict[str, dict[str, tuple[float, float, float]]]] = {
    "cifar10": {  # Table 1: top-1 (%), cost (members), utility
        "ResNet-32": {"Single model": (93.10, 1.00, 1.00), "Average ensemble": (94.46, 3.00, 1.00),
                      "WoC": (94.29, 2.48, 1.05), "IRENE": (94.46, 2.21, 1.37)},
        "ResNet-18": {"Single model": (94.94, 1.00, 1.00), "Average ensemble": (95.62, 3.00, 1.00),
                      "WoC": (95.48, 1.15, 2.10), "IRENE": (95.81, 1.32, 3.10)},
    },
    "cifar100": {  # Table 2
        "ResNet-32": {"Single model": (69.58, 1.00, 1.00), "Average ensemble": (74.94, 3.00, 1.00),
                      "WoC": (73.90, 2.31, 1.05), "IRENE": (74.84, 2.53, 1.16)},
        "ResNet-18": {"Single model": (77.18, 1.00, 1.00), "Average ensemble": (80.28, 3.00, 1.00),
                      "WoC": (79.86, 1.93, 1.35), "IRENE": (80.10, 1.88, 1.50)},
    },
}
"""IRENE's Tables 1-2 (T = 3), the rows of the methods reproduced here."""

DEFAULTS = {
    "digits": ("resnet10t", {"stem_width": 16, "channels": [16, 32, 64, 128]}, 16, 10, 64, 0.05),
    "cifar10": ("resnet18", {}, 32, 200, 128, 0.1),
    "cifar100": ("resnet18", {}, 32, 200, 128, 0.1),
}
"""Per dataset: backbone, its options, image size, epochs per member, batch size, learning rate. CIFAR
follows the paper (App. A.1.2: 200 epochs, batch 128, lr 0.1); digits is sized to run on a CPU."""
TINY = ("resnet10t", {"stem_width": 8, "channels": [8, 16, 32, 64]}, 16, 1, 32, 0.05)
"""``--tiny``: a seconds-long check on at most 128 training and 128 evaluation images."""
TINY_IMAGES = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=("digits", "cifar10", "cifar100"), default="digits")
    parser.add_argument("--root", default=None, help="CIFAR folder (cifar-10-batches-py/ or cifar-100-python/)")
    parser.add_argument("--backbone", default=None,
                        help="timm model name (default: per dataset; the paper: ResNet-32, ResNet-18)")
    parser.add_argument("--members", type=int, default=3, help="T, base models per ensemble (the paper: 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per member (default: per dataset)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate of the members")
    parser.add_argument("--selector-lr", type=float, default=1e-3, help="Adam learning rate of the selector")
    parser.add_argument("--ens-weight", type=float, default=0.1, help="omega_1 (L_ens)")
    parser.add_argument("--cost-weight", type=float, default=0.01, help="omega_2 (L_cost)")
    parser.add_argument("--rank-weight", type=float, default=0.1, help="omega_3 (L_rank)")
    parser.add_argument("--schedule", choices=("sequential", "joint"), default="sequential")
    parser.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--limit-eval", type=int, default=None, help="use only the first N val and test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--tiny", action="store_true",
                        help=f"a seconds-long check: {TINY_IMAGES} images, 1 epoch, a narrower backbone")


def run(args: argparse.Namespace) -> int:
    backbone, options, size, epochs, batch, lr = TINY if args.tiny else DEFAULTS[args.data]
    limit_train, limit_eval = args.limit_train, args.limit_eval
    if args.tiny:
        limit_train, limit_eval = min(limit_train or TINY_IMAGES, TINY_IMAGES), min(limit_eval or TINY_IMAGES,
                                                                                     TINY_IMAGES)
    if args.backbone is not None:
        backbone, options = args.backbone, {}
    results = reproduce(
        data=args.data, root=args.root, backbone=backbone, backbone_options=options, image_size=size,
        members=args.members, epochs=args.epochs or epochs, batch_size=args.batch_size or batch, lr=args.lr or lr,
        selector_lr=args.selector_lr, ens_weight=args.ens_weight, cost_weight=args.cost_weight,
        rank_weight=args.rank_weight, schedule=args.schedule, limit_train=limit_train, limit_eval=limit_eval,
        seed=args.seed, device=args.device, log=_log)
    print(table(results))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _log(record: dict[str, Any]) -> None:
    skip = ("model", "stage", "epoch", "stage_epoch", "seconds")
    parts = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in skip)
    print(f"{record['model']} {record['stage']} epoch {record['stage_epoch']}: {parts}", file=sys.stderr)


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))


def reproduce(data: str = "digits", root: str | None = None, backbone: str = "resnet18",
              backbone_options: dict[str, Any] | None = None, image_size: int = 32, members: int = 3,
              epochs: int = 200, batch_size: int = 128, lr: float = 0.1, selector_lr: float = 1e-3,
              ens_weight: float = 0.1, cost_weight: float = 0.01, rank_weight: float = 0.1,
              schedule: str = "sequential", limit_train: int | None = None, limit_eval: int | None = None,
              seed: int = 0, device: str = "auto",
              log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and evaluate the four methods; returns settings, rows and the WoC threshold.

    ``log`` receives every epoch's history entry (:func:`ensemblekit.training.trainer.train`) with a
    ``model`` key.
    """
    import ensemblekit as ek
    from ensemblekit.backbones import create_backbone
    from ensemblekit.evaluation.reports import collect_members
    from ensemblekit.methods.irene.woc import WoC, utility
    from ensemblekit.training.config import TrainConfig
    from ensemblekit.training.data import load_dataset, make_loader
    from ensemblekit.training.trainer import seed_everything, select_device, train

    dev = select_device(device)
    train_set, info = load_dataset(data, "train", root=root, image_size=image_size)
    val_set = _limit(load_dataset(data, "val", root=root, image_size=image_size)[0], limit_eval)
    test_set = _limit(load_dataset(data, "test", root=root, image_size=image_size)[0], limit_eval)
    train_set = _limit(train_set, limit_train)
    # IRENE's optimisers and step decay (App. A.1) for both ensembles: Algorithm 1 for IRENE's loss
    # (or all members at once with schedule="joint"), all members at once for the average ensemble
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=5e-4, seed=seed,
                         device=str(dev), progress="none", stages={"name": "irene", "selector_lr": selector_lr})

    def backbone_model() -> torch.nn.Module:
        return create_backbone(backbone, num_classes=info.num_classes, **(backbone_options or {}))

    def logger(model: str) -> Callable[[dict[str, Any]], None] | None:
        return None if log is None else (lambda record: log({"model": model, **record}))

    seed_everything(seed)
    average = ek.wrap(backbone_model(), "independent", members=members, aggregator="mean_probs", loss="independent")
    train(average, train_set, config, on_epoch=logger("average"))
    seed_everything(seed)  # IRENE's first member starts from the single model's initial weights
    irene = ek.recipes.irene(backbone_model(), members=members, ens_weight=ens_weight, cost_weight=cost_weight,
                             rank_weight=rank_weight, schedule=schedule)
    train(irene, train_set, config, on_epoch=logger("irene"))

    def eval_loader(dataset: Dataset):
        return make_loader(dataset, 256, shuffle=False)

    val_members, val_labels = collect_members(average.forward_members, eval_loader(val_set), dev)
    test_members, labels = collect_members(average.forward_members, eval_loader(test_set), dev)
    aggregator = average.aggregator.cpu()
    prefixes = aggregator.prefixes(test_members)
    woc = WoC.fit(val_members, val_labels, aggregator)
    woc_prediction, woc_used = woc.predict(test_members, aggregator)
    irene_correct, irene_used = _predict(irene, eval_loader(test_set), dev)

    def accuracy(prediction: torch.Tensor) -> float:
        return 100 * (prediction.argmax(-1) == labels).float().mean().item()

    measured = {
        "Single model": (accuracy(test_members[:, 0]), 1.0),
        "Average ensemble": (accuracy(prefixes[:, -1]), float(members)),
        "WoC": (accuracy(woc_prediction), woc_used.float().mean().item()),
        "IRENE": (100 * irene_correct.float().mean().item(), irene_used.float().mean().item()),
    }
    single, full = measured["Single model"][0], measured["Average ensemble"][0]
    rows = []
    for method, (top1, cost) in measured.items():
        value = utility(top1, cost, single, full, members) if full > single else None
        rows.append({"method": method, "top1": top1, "cost": cost, "utility": value})
    return {
        "settings": {"data": data, "backbone": backbone, "backbone_options": backbone_options or {},
                     "image_size": image_size, "members": members, "epochs_per_member": epochs,
                     "batch_size": batch_size, "lr": lr, "selector_lr": selector_lr, "ens_weight": ens_weight,
                     "cost_weight": cost_weight, "rank_weight": rank_weight, "schedule": schedule, "seed": seed,
                     "train_images": len(train_set), "val_images": len(val_set), "test_images": len(labels),
                     "device": str(dev)},
        "woc_threshold": woc.threshold,
        "rows": rows,
        "paper": PAPER.get(data),
    }


@torch.no_grad()
def _predict(ensemble, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and members used per test image with the ensemble's halting policy."""
    ensemble.to(device).eval()
    correct, used = [], []
    for x, y in loader:
        result = ensemble.predict(x.to(device))
        correct.append(result.prediction.argmax(-1).cpu() == y)
        used.append(result.members_used.cpu())
    return torch.cat(correct), torch.cat(used)


def table(results: dict[str, Any]) -> str:
    """The results in the layout of IRENE's Tables 1-2, the paper's numbers beside ours."""
    s = results["settings"]
    paper = results["paper"] or {}
    lines = [
        f"IRENE on {s['data']} (test: {s['test_images']} images): {s['backbone']}, T={s['members']}, "
        f"{s['epochs_per_member']} epoch(s) per member, {s['schedule']} schedule, "
        f"WoC threshold {results['woc_threshold']:.2f} (from {s['val_images']} val images)",
        "",
    ]
    header = ["Methods", "Top-1 (%) ↑", "Cost ↓", "Utility ↑"]
    for backbone in paper:
        header += [f"paper {backbone} Top-1", "Cost", "Utility"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in results["rows"]:
        cells = [row["method"], f"{row['top1']:.2f}", f"{row['cost']:.2f}",
                 "-" if row["utility"] is None else f"{row['utility']:.2f}"]
        for numbers in paper.values():
            cells += [f"{numbers[row['method']][0]:.2f}", f"{numbers[row['method']][1]:.2f}",
                      f"{numbers[row['method']][2]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if not paper:
        lines.append("")
        lines.append(f"The paper has no {s['data']} experiment (its Tables 1-2 are CIFAR-10 and CIFAR-100).")
    if any(row["utility"] is None for row in results["rows"]):
        lines.append("Utility undefined: the average ensemble is not more accurate than the single model.")
    return "\n".join(lines)
