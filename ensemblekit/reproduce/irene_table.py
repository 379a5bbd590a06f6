"""IRENE Tables 1-2: single model, average ensemble, WoC and IRENE, top-1 / cost / utility (Li et al., AAAI 2023).

Four methods with ``T`` members of one backbone, evaluated on the test split,
from two runs per seed:

* ``average``: ``T`` independently trained members (the paper's "average
  ensemble", probabilities averaged, Eq. 7 with all members). It gives three
  rows: the single model (its first member), the average ensemble, and WoC
  (its members as a confidence cascade, threshold searched on the validation
  split, App. A.2, [`ensemblekit.methods.irene.woc.WoC`][ensemblekit.methods.irene.woc.WoC]);
* ``IRENE``: ``T`` members and the LSTM selector trained by Algorithm 1 (the
  trainer's ``"irene"`` schedule, [`ensemblekit.methods.irene.schedule`][ensemblekit.methods.irene.schedule])
  on the paper's objective (Eq. 13), halting where ``h_t >= 0.5`` (Eq. 6).

Both runs train every member for the same epochs with IRENE's optimisers
(App. A.1: SGD with Nesterov momentum 0.9 and weight decay 5e-4, lr divided
by 5 at 30%, 60% and 80% of the epochs; Adam for the selector). Reported:
top-1 (%), cost (average members used) and utility (Eq. 14,
[`ensemblekit.methods.irene.woc.utility()`][ensemblekit.methods.irene.woc.utility], relative to the same seed's
single model and average ensemble), mean ± std over seeds, next to the
paper's numbers; the paper's claim that IRENE costs less than the average
ensemble at about its accuracy is judged on the seeds
(`Claim`).

Settings (shown on screen and stored in ``irene_table.json``):

* default: sized for a 2-core CPU. Fashion-MNIST: resnet10t at a quarter of
  its width (stem 8, channels 16/32/64/128), 28x28 inputs without
  augmentation, 3 epochs per member on the whole 54k training split, batch
  128: the average-ensemble run about 89 s, the IRENE run about 125 s, one
  seed 211-251 s, the 6 runs of 3 seeds 11-13 minutes (`DEFAULTS`).
* ``--full``: the paper's schedule for a GPU (App. A.1.2: 200 epochs per
  member, batch 128, lr 0.1) with a full-width resnet18 on the whole training
  split; the validation split stays held out for WoC's threshold.
* ``--smoke``: a seconds-long check (128 training and 128 evaluation images, 1 epoch).

``--seeds N`` repeats both runs with seeds ``seed .. seed + N - 1``. The
table is resumable: each finished run is kept in
``<out>/seed-<s>/<run>/run.json`` (`RunStore`)
with its trained ensemble (``model/``, ``ek.save``) and reused, an
unfinished one continues from its last checkpoint, and a table started with
other settings in the same ``--out`` is refused (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from ensemblekit.reproduce.runs import (
    Claim,
    Comparison,
    RunStore,
    TableError,
    check_settings,
    default_dataset,
    device_name,
    get_or_train,
    load_splits,
    mean_std,
    seed_range,
)

__all__ = ["ACCURACY_TOLERANCE", "DEFAULTS", "FULL", "HELP", "METHODS", "NAME", "PAPER", "RUNS", "SMOKE",
           "add_arguments", "claims", "describe", "markdown", "per_seed_rows", "run", "settings", "summarise",
           "table"]

NAME = "irene"
HELP = ("IRENE (AAAI 2023) Tables 1-2: single model, average ensemble, WoC and IRENE, top-1 / cost / utility over "
        "seeds, next to the paper's CIFAR numbers.")

METHODS = ("Single model", "Average ensemble", "WoC", "IRENE")
RUNS = {"average": METHODS[:3], "IRENE": METHODS[3:]}
"""The two runs of a seed and the rows of the table each gives."""

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

ACCURACY_TOLERANCE = 0.5
"""The claim's "comparable performance": IRENE's top-1 at most this many points below the average ensemble's
(the paper's largest gap is 0.18 points, CIFAR-100 ResNet-18)."""

QUARTER = {"stem_width": 8, "channels": [16, 32, 64, 128]}
Setting = tuple[str, dict[str, Any], int, int, int, float, int | None]
"""Backbone, its options, image size, epochs per member, batch size, learning rate, training images (None: all)."""
DEFAULTS: dict[str, Setting] = {
    "digits": ("resnet10t", {"stem_width": 16, "channels": [16, 32, 64, 128]}, 16, 10, 64, 0.05, None),
    "fashion-mnist": ("resnet10t", QUARTER, 28, 3, 128, 0.1, None),
    "cifar10": ("resnet10t", QUARTER, 32, 3, 128, 0.1, None),
    "cifar100": ("resnet10t", QUARTER, 32, 3, 128, 0.1, None),
}
"""Sized for a 2-core CPU (digits: its 1,293 training images). Measured on Fashion-MNIST, 2 cores: the average
ensemble 69 ms per step of 128 images (3 members), 26-31 s per epoch of the 54k training split (421 steps), its run
(3 epochs, validation and test) 89 s; IRENE's steps 1 / 2 / 3 of Algorithm 1 28 / 35 / 42 ms per step, 11.5 / 13 /
16 s per epoch, its run about 125 s with nothing else running (160 s measured with another process on the cores
in step 3); one seed 211-251 s, so the table's 3 seeds take 11-13 minutes. CIFAR uses the same model and schedule
(not timed)."""

PAPER_EPOCHS = 200
FULL: dict[str, Setting] = {
    name: ("resnet18", {}, size, PAPER_EPOCHS, 128, 0.1, None)
    for name, size in (("fashion-mnist", 28), ("cifar10", 32), ("cifar100", 32))
}
"""``--full``: the paper's schedule (App. A.1.2: 200 epochs, batch 128, lr 0.1) for a GPU with its ResNet-18
(timm's, at full width), on the whole training split."""

SMOKE: Setting = ("resnet10t", {"stem_width": 8, "channels": [8, 16, 32, 64]}, 16, 1, 32, 0.05, 128)
"""``--smoke``: a seconds-long check on 128 training and 128 evaluation images."""

AUGMENT = {"fashion-mnist": False}
"""Datasets trained without random crops and flips by default (the others: with)."""

TITLES = {"digits": "digits", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
RESULTS = ("irene_table.json", "irene_table.md")
MODEL = "model"
"""Each run's trained ensemble, in its folder (``ek.save``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=tuple(DEFAULTS), default=None,
                        help="default: fashion-mnist where its files are on this machine, else digits")
    parser.add_argument("--root", default=None,
                        help="data folder: the CIFAR python version, or the four Fashion-MNIST files")
    parser.add_argument("--full", action="store_true",
                        help=f"the paper's schedule for a GPU: resnet18, {PAPER_EPOCHS} epochs per member, batch 128, "
                             "lr 0.1, the whole training split")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check: 128 images, 1 epoch")
    parser.add_argument("--backbone", default=None,
                        help="timm model name (default: per dataset; the paper: ResNet-32, ResNet-18)")
    parser.add_argument("--members", type=int, default=3, help="T, base models per ensemble (the paper: 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per member")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="SGD learning rate of the members")
    parser.add_argument("--selector-lr", type=float, default=1e-3, help="Adam learning rate of the selector")
    parser.add_argument("--ens-weight", type=float, default=0.1, help="omega_1 (L_ens, Eq. 10)")
    parser.add_argument("--cost-weight", type=float, default=0.01, help="omega_2 (L_cost, Eq. 11)")
    parser.add_argument("--rank-weight", type=float, default=0.1, help="omega_3 (L_rank, Eq. 12)")
    parser.add_argument("--schedule", choices=("sequential", "joint"), default="sequential",
                        help="IRENE's training: Algorithm 1 (sequential) or all members at once")
    parser.add_argument("--train-items", type=int, default=None,
                        help="train on a stratified subset of N images of the training split, drawn per seed "
                             "(default: per dataset)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random crops and flips on the training images (default: on, except for fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of seeds (seed, seed+1, ...): mean ± std (default: 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: ensemblekit-runs/{NAME}-"
                        f"<data>): {', '.join(RESULTS)} and one folder per seed and run")


# ------------------------------------------------------------------ settings
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a run's result depends on (not the device): model, data subset, schedule and IRENE's weights."""
    if args.full and args.data not in FULL:
        raise TableError(f"--full: there is no paper schedule for {args.data}; choose --data from {', '.join(FULL)}")
    if args.members < 2:
        raise TableError(f"--members must be at least 2, got {args.members}")
    backbone, options, size, epochs, batch, lr, items = (FULL if args.full else DEFAULTS)[args.data]
    eval_items = None
    if args.smoke:
        backbone, options, size, epochs, batch, lr, items = SMOKE
        eval_items = items
    chosen = {"data": args.data, "backbone": backbone, "backbone_options": dict(options), "image_size": size,
              "members": args.members, "epochs": epochs, "batch_size": batch, "lr": lr, "momentum": 0.9,
              "weight_decay": 5e-4, "selector_lr": args.selector_lr, "ens_weight": args.ens_weight,
              "cost_weight": args.cost_weight, "rank_weight": args.rank_weight, "schedule": args.schedule,
              "train_split": "train", "train_items": items, "eval_items": eval_items,
              "augment": AUGMENT.get(args.data, True) if args.augment is None else args.augment}
    if args.backbone is not None:
        chosen.update(backbone=args.backbone, backbone_options={})
    for key in ("epochs", "batch_size", "lr", "train_items"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if chosen["train_items"] is not None or chosen["eval_items"] is not None:
        from ensemblekit.training.data import SUBSET_RULE

        chosen["subset"] = SUBSET_RULE  # how the splits are cut: runs cut otherwise are not reused
    return chosen


def describe(chosen: dict[str, Any], full: bool = False, smoke: bool = False) -> str:
    """The settings in one line: data, model, subset, epochs, optimiser and IRENE's loss weights."""
    items = "all" if chosen["train_items"] is None else f"a stratified subset of {chosen['train_items']:,}"
    return (f"{chosen['data']}{' --full' if full else ''}{' --smoke' if smoke else ''}: T={chosen['members']} x "
            f"{chosen['backbone']}({chosen['backbone_options']}) at {chosen['image_size']}x{chosen['image_size']}; "
            f"{chosen['epochs']} epoch(s) per member on {items} images of the {chosen['train_split']} split "
            f"{'with' if chosen['augment'] else 'without'} augmentation; batch {chosen['batch_size']}, SGD Nesterov "
            f"lr {chosen['lr']} /5 at 30%, 60%, 80%, weight decay {chosen['weight_decay']}; selector Adam lr "
            f"{chosen['selector_lr']}; IRENE {chosen['schedule']}, omega_1 {chosen['ens_weight']}, omega_2 "
            f"{chosen['cost_weight']}, omega_3 {chosen['rank_weight']}")


# ------------------------------------------------------------------ running
class _Table:
    """The data, settings and run store of one table, and how to train and evaluate each of its runs."""

    def __init__(self, args: argparse.Namespace, chosen: dict[str, Any], out: Path):
        from ensemblekit.training.config import DataConfig
        from ensemblekit.training.data import make_loader
        from ensemblekit.training.trainer import select_device

        self.args, self.chosen, self.store = args, chosen, RunStore(out)
        self.device = select_device(args.device)
        self.data = DataConfig(name=args.data, root=args.root, image_size=chosen["image_size"],
                               augment=chosen["augment"], train_split=chosen["train_split"],
                               max_train_items=chosen["train_items"], max_eval_items=chosen["eval_items"])
        splits = load_splits(self.data)
        self.info = splits.info
        self._train_sets = {None: splits.train}
        self.val_loader = make_loader(splits.val, 256, shuffle=False)
        self.test_loader = make_loader(splits.test, 256, shuffle=False)

    def train_set(self, seed: int) -> Any:
        """The training split of ``seed``'s runs: the whole split, or its stratified subset drawn with ``seed``."""
        from ensemblekit.training.trainer import load_split

        key = None if self.data.max_train_items is None else seed
        if key not in self._train_sets:
            self._train_sets[key] = load_split(self.data, self.data.train_split, augment=self.data.augment,
                                               limit=self.data.max_train_items, seed=seed)[0]
        return self._train_sets[key]

    def run_settings(self, seed: int) -> dict[str, Any]:
        """What a finished run of ``seed`` must have been made with to be reused (`RunStore`)."""
        return {**self.chosen, "seed": seed}

    def model_config(self, label: str) -> Any:
        """The average ensemble (independent members, mean of probabilities) or IRENE (its recipe)."""
        from ensemblekit.training.config import ModelConfig

        c = self.chosen
        common = {"num_classes": self.info.num_classes, "in_chans": self.info.in_chans,
                  "image_size": self.info.image_size, "backbone_options": c["backbone_options"]}
        if label == "average":
            return ModelConfig(c["backbone"], topology={"name": "independent", "members": c["members"]},
                               aggregator="mean_probs", loss="independent", **common)
        return ModelConfig(c["backbone"], recipe="irene", **common,
                           recipe_options={"members": c["members"], "ens_weight": c["ens_weight"],
                                           "cost_weight": c["cost_weight"], "rank_weight": c["rank_weight"],
                                           "schedule": c["schedule"]})

    def train_and_evaluate(self, seed: int, label: str, folder: Path, resume: bool) -> dict[str, Any]:
        """Train the run ``label`` of ``seed`` in ``folder`` and evaluate the rows it gives; its result for
        ``run.json``."""
        import ensemblekit as ek
        from ensemblekit.training.config import TrainConfig, build_ensemble
        from ensemblekit.training.trainer import seed_everything, train

        c = self.chosen
        seed_everything(seed)  # IRENE's first member starts from the single model's initial weights
        ensemble = build_ensemble(self.model_config(label))
        config = TrainConfig(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"], momentum=c["momentum"],
                             weight_decay=c["weight_decay"], seed=seed, device=self.args.device,
                             progress=self.args.progress, keep_checkpoints=1,
                             stages={"name": "irene", "selector_lr": c["selector_lr"]})
        result = train(ensemble, self.train_set(seed), config, out_dir=folder, resume=resume,
                       extra={"run": self.run_settings(seed)})
        ensemble.eval()
        rows = self.evaluate_average(ensemble) if label == "average" else self.evaluate_irene(ensemble)
        ek.save(ensemble, folder / MODEL, overwrite=True)
        return {**rows, "history": result.history}

    def evaluate_average(self, ensemble: Any) -> dict[str, Any]:
        """Single model, average ensemble and WoC (threshold searched on the validation split) on the test split."""
        from ensemblekit.evaluation.reports import collect_members
        from ensemblekit.methods.irene.woc import WoC

        val_members, val_labels = collect_members(ensemble.forward_members, self.val_loader, self.device)
        members, labels = collect_members(ensemble.forward_members, self.test_loader, self.device)
        aggregator = ensemble.aggregator.cpu()
        prefixes = aggregator.prefixes(members)
        woc = WoC.fit(val_members, val_labels, aggregator)
        woc_prediction, woc_used = woc.predict(members, aggregator)

        def top1(prediction: Any) -> float:
            return 100 * (prediction.argmax(-1) == labels).float().mean().item()

        return {"rows": {"Single model": {"top1": top1(prefixes[:, 0]), "cost": 1.0},
                         "Average ensemble": {"top1": top1(prefixes[:, -1]), "cost": float(members.shape[1])},
                         "WoC": {"top1": top1(woc_prediction), "cost": woc_used.float().mean().item()}},
                "woc_threshold": woc.threshold, "woc_stops": _stops(woc_used, members.shape[1])}

    def evaluate_irene(self, ensemble: Any) -> dict[str, Any]:
        """IRENE's top-1 and members used on the test split with its selector's halting (Eq. 6)."""
        import torch

        correct, used = [], []
        with torch.no_grad():
            for x, y in self.test_loader:
                result = ensemble.predict(x.to(self.device))
                correct.append(result.prediction.argmax(-1).cpu() == y)
                used.append(result.members_used.cpu())
        members_used = torch.cat(used)
        return {"rows": {"IRENE": {"top1": 100 * torch.cat(correct).float().mean().item(),
                                   "cost": members_used.float().mean().item()}},
                "irene_stops": _stops(members_used, ensemble.num_members)}


def _stops(members_used: Any, members: int) -> list[float]:
    """Fraction of the test images stopping after member 1, 2, ..., ``members``."""
    return [(members_used == k).float().mean().item() for k in range(1, members + 1)]


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.data is None:
        args.data = default_dataset()
    out = args.out or Path("ensemblekit-runs") / f"{NAME}-{args.data}"
    seeds = seed_range(args.seed, args.seeds)
    chosen = settings(args)
    check_settings(RunStore(out), ((seed, label, {**chosen, "seed": seed}) for seed in seeds for label in RUNS))
    out.mkdir(parents=True, exist_ok=True)
    print(f"settings: {describe(chosen, args.full, args.smoke)}; seeds {seeds}, device {device_name(args.device)}",
          flush=True)
    table_runs = _Table(args, chosen, out)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds:
        for label in RUNS:
            results.setdefault(seed, {})[label] = get_or_train(
                table_runs.store, seed, label, table_runs.run_settings(seed),
                partial(table_runs.train_and_evaluate, seed, label), keep_checkpoints=False,
                summary=lambda saved: "; ".join(f"{method} top-1 {row['top1']:.2f}, cost {row['cost']:.2f}"
                                                for method, row in saved["rows"].items()))
            _write_results(out, args, chosen, seeds, results, start)
    record = _write_results(out, args, chosen, seeds, results, start)
    print()
    print(table(record))
    print("\nthe paper's claim, judged on this table (paired by seed):")
    print("\n".join(claim.line() for claim in claims(results)))
    print(f"\noutputs in {out.resolve()}: {', '.join(RESULTS)}, one folder per seed and run (run.json, model/)")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


# ------------------------------------------------------------------ results
def per_seed_rows(results: dict[int, dict[str, dict[str, Any]]]) -> dict[int, dict[str, dict[str, Any]]]:
    """Per seed with both runs finished: each method's top-1, cost and utility (Eq. 14, None where undefined:
    an average ensemble no more accurate than its single model)."""
    from ensemblekit.methods.irene.woc import utility

    rows: dict[int, dict[str, dict[str, Any]]] = {}
    for seed, by_run in results.items():
        if not all(label in by_run for label in RUNS):
            continue
        measured = {method: row for run in by_run.values() for method, row in run["rows"].items()}
        single, full = measured["Single model"]["top1"], measured["Average ensemble"]["top1"]
        members = round(measured["Average ensemble"]["cost"])
        rows[seed] = {method: {**measured[method], "utility": utility(measured[method]["top1"],
                                                                      measured[method]["cost"], single, full, members)
                               if full > single else None} for method in METHODS}
    return rows


def claims(results: dict[int, dict[str, dict[str, Any]]]) -> list[Any]:
    """The paper's claim on the seeds with both runs finished, paired by seed: IRENE costs strictly less than the
    average ensemble, with top-1 at most `ACCURACY_TOLERANCE` points below it."""
    rows = list(per_seed_rows(results).values())
    if not rows:
        return []

    def values(method: str, measure: str) -> list[float]:
        return [by_method[method][measure] for by_method in rows]

    return [Claim(f"IRENE's cost < the average ensemble's cost, at accuracy within {ACCURACY_TOLERANCE} points",
                  "IRENE Tables 1-2",
                  (Comparison("Average ensemble cost", "IRENE cost", values("Average ensemble", "cost"),
                              values("IRENE", "cost"), strict=True, unit="members"),
                   Comparison("IRENE top-1", "Average ensemble top-1", values("IRENE", "top1"),
                              values("Average ensemble", "top1"), offset=-ACCURACY_TOLERANCE)))]


def summarise(rows: dict[int, dict[str, dict[str, Any]]]) -> tuple[dict, dict]:
    """Mean and standard deviation (n - 1; 0 for one seed) over seeds of each method's top-1, cost and utility
    (utility over the seeds where it is defined; None where it is nowhere).

    Examples:
        >>> mean, std = summarise({0: {"WoC": {"top1": 90.0, "cost": 2.0, "utility": None}},
        ...                        1: {"WoC": {"top1": 92.0, "cost": 2.0, "utility": 1.5}}})
        >>> mean["WoC"], std["WoC"]["cost"]
        ({'top1': 91.0, 'cost': 2.0, 'utility': 1.5}, 0.0)
    """
    mean: dict[str, dict[str, float | None]] = {}
    std: dict[str, dict[str, float | None]] = {}
    for method in METHODS:
        found = [by_method[method] for by_method in rows.values() if method in by_method]
        if not found:
            continue
        mean[method], std[method] = {}, {}
        for measure in ("top1", "cost", "utility"):
            values = [row[measure] for row in found if row[measure] is not None]
            mean[method][measure], std[method][measure] = mean_std(values) if values else (None, None)
    return mean, std


def _write_results(out: Path, args: argparse.Namespace, chosen: dict[str, Any], seeds: list[int],
                   results: dict[int, dict[str, dict[str, Any]]], start: float) -> dict[str, Any]:
    import torch

    from ensemblekit.training.checkpoint import atomic_write

    rows = per_seed_rows(results)
    mean, std = summarise(rows)
    done = sum(len(by_run) for by_run in results.values())
    judged = claims(results)
    record = {
        "data": args.data, "full": args.full, "smoke": args.smoke, "settings": chosen,
        "settings_text": describe(chosen, args.full, args.smoke), "seeds": seeds,
        "device": device_name(args.device), "torch": torch.__version__,
        "runs_finished": done, "runs_total": len(seeds) * len(RUNS), "complete": done == len(seeds) * len(RUNS),
        "wall_seconds": time.perf_counter() - start,
        "run_seconds": {label: [by_run[label]["seconds"] for by_run in results.values() if label in by_run]
                        for label in RUNS},
        "ours": mean, "std": std, "per_seed": {str(seed): by_method for seed, by_method in rows.items()},
        "woc_thresholds": [by_run["average"]["woc_threshold"] for by_run in results.values() if "average" in by_run],
        "stops": {str(seed): {"WoC": by_run["average"]["woc_stops"] if "average" in by_run else None,
                              "IRENE": by_run["IRENE"]["irene_stops"] if "IRENE" in by_run else None}
                  for seed, by_run in results.items()},
        "paper": PAPER.get(args.data),
        "claims": [claim.to_dict() for claim in judged],
    }
    atomic_write(out / RESULTS[0], json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    if judged:
        text += ("\nThe paper's claim, judged on this table (paired by seed):\n\n```\n"
                 + "\n".join(claim.line() for claim in judged) + "\n```\n")
    atomic_write(out / RESULTS[1], text)
    return record


def table(record: dict[str, Any]) -> str:
    """Tables 1-2's layout: a row per method with top-1, cost and utility (mean ± std), the paper's beside them."""
    seeds = len(record["seeds"])
    paper = record["paper"] or {}

    def cell(method: str, measure: str) -> str:
        value, spread = record["ours"].get(method, {}).get(measure), record["std"].get(method, {}).get(measure)
        if value is None:
            return "-"
        return f"{value:.2f} ± {spread:.2f}" if seeds > 1 else f"{value:.2f}"

    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [f"IRENE Tables 1-2 on {TITLES[record['data']]}: test top-1 (%), cost (members used) and utility "
             f"(Eq. 14), {spread} ({record['runs_finished']}/{record['runs_total']} runs finished)", ""]
    header = ["Methods", "Top-1 (%) ↑", "Cost ↓", "Utility ↑"]
    for backbone in paper:
        header += [f"paper {backbone} Top-1", "Cost", "Utility"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for method in METHODS:
        cells = [method, cell(method, "top1"), cell(method, "cost"), cell(method, "utility")]
        for numbers in paper.values():
            cells += [f"{value:.2f}" for value in numbers[method]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if record["woc_thresholds"]:
        lines.append("WoC thresholds (validation split): " + ", ".join(f"{t:.2f}" for t in record["woc_thresholds"]))
    for seed, stops in record["stops"].items():
        lines.append(f"seed {seed}, fraction of test images stopping after member 1..T: " + "; ".join(
            f"{method} " + ", ".join(f"{f:.2f}" for f in fractions) for method, fractions in stops.items()
            if fractions is not None))
    if not paper:
        lines.append(f"The paper has no {record['data']} experiment (its Tables 1-2 are CIFAR-10 and CIFAR-100).")
    if any(row["utility"] is None for by_method in record["per_seed"].values() for row in by_method.values()):
        lines.append("Utility undefined for a seed whose average ensemble is not more accurate than its single model.")
    return "\n".join(lines)


def markdown(record: dict[str, Any]) -> str:
    """The table as Markdown with its settings, device and wall time."""
    return (f"{table(record)}\n\nSettings: {record['settings_text']}. Device {record['device']}, torch "
            f"{record['torch']}, wall time {record['wall_seconds']:.0f} s.\n")
