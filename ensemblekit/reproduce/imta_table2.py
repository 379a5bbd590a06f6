"""IMTA Table 2: the GE / ISC / OFA ablation of a five-exit network (Li et al., ICCV 2019).

A timm backbone cut into five blocks with an exit after each (the paper: a
five-exit MSDNet on CIFAR-100) is trained in the paper's two phases
(Sec. 4, "Training Details") for each row of Table 2:

* phase I: the whole network with ``sum_k CE_k`` (Eq. 1), with Gradient
  Equilibrium (Eq. 4-5) in the GE rows. The two phase-I trainings of a seed
  (with and without GE) are runs of their own, ``phase1`` and ``phase1+GE``,
  whose trained network is kept in their folder (``model/``, ``ek.save``).
* phase II: from that network (``ek.load``), backbone and its BatchNorm
  statistics frozen, only the exit heads (and ISC modules) trained, with
  Inline Subnetwork Collaboration (Sec. 3.2) in the ISC rows and One-for-all
  KD (Eq. 7-8) in the OFA rows. The baseline and GE rows get the same phase II
  with plain cross-entropy, so that rows differ only in the techniques.

Both phases are the stages of the ``"two_phase"`` schedule
([`ensemblekit.methods.imta.schedule`][ensemblekit.methods.imta.schedule]) with the paper's optimiser: SGD,
Nesterov momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and
75% of each phase. Reported: top-1 (%) of every exit on the test split,
mean ± std over seeds, next to the paper's Table 2; the paper's claim that
the full method is at least as accurate as the baseline at every exit is
judged on the seeds (`Claim`).

Settings (shown on screen and stored in ``imta_table2.json``):

* default: sized for a 2-core CPU. Fashion-MNIST: resnet10t at a quarter of
  its width (stem 8, channels 16/32/64/128), 28x28 inputs without
  augmentation, phase I 5 epochs and phase II 2 epochs on the whole 54k
  training split, batch 64: a phase-I run about 72 s, a phase-II run about
  11 s, one seed 198 s, the 21 runs of 3 seeds about 10 minutes
  (`DEFAULTS`).
* ``--full``: the paper's schedule for a GPU (phase I 300 epochs, phase II
  180, batch 64) with a full-width resnet18 on the whole training split; the
  validation split stays held out, as the paper's 5,000 images for the
  budgeted thresholds (``--budget``).
* ``--smoke``: a seconds-long check (128 training and 128 test images, 1 + 1 epochs).

``--seeds N`` repeats every run with seeds ``seed .. seed + N - 1``. The
table is resumable: each finished run is kept in
``<out>/seed-<s>/<run>/run.json`` (`RunStore`)
and reused, an unfinished one continues from its last checkpoint, and a
table started with other settings in the same ``--out`` is refused (exit 2).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
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

__all__ = ["DEFAULTS", "FULL", "HELP", "LR_MILESTONES", "NAME", "PAPER", "PHASE1", "ROWS", "SMOKE", "add_arguments",
           "claims", "describe", "markdown", "paper_lr_schedule", "run", "settings", "summarise", "table"]

NAME = "imta-table2"
HELP = ("IMTA (ICCV 2019) Table 2: GE / ISC / OFA ablation of a 5-exit network, accuracy at every exit over seeds, "
        "next to the paper's CIFAR-100 numbers.")

ROWS: dict[str, tuple[bool, bool, bool]] = {
    "baseline": (False, False, False),
    "GE": (True, False, False),
    "ISC": (False, True, False),
    "OFA": (False, False, True),
    "GE+ISC+OFA": (True, True, True),
}
"""Table 2's rows, label -> (GE, ISC, OFA)."""

PHASE1 = {False: "phase1", True: "phase1+GE"}
"""The phase-I run each row starts from, by whether it uses GE."""

PAPER: dict[str, tuple[float, ...]] = {
    "baseline": (60.09, 63.73, 67.89, 70.48, 71.81),
    "GE": (60.35, 64.38, 68.72, 70.65, 71.94),
    "ISC": (60.19, 64.72, 68.07, 70.94, 73.28),
    "OFA": (60.39, 64.20, 68.10, 70.65, 71.85),
    "GE+ISC+OFA": (60.78, 65.54, 69.98, 72.27, 73.45),
}
"""IMTA Table 2: top-1 (%) at exits E-1..E-5 of a five-exit MSDNet on CIFAR-100."""
PAPER_DATASET = "CIFAR-100, five-exit MSDNet"

LR_MILESTONES = (0.5, 0.75)
"""The paper divides the learning rate by 10 after 150 and 225 of 300 epochs (phase I), 90 and 135 of 180 (phase II)."""

QUARTER = {"stem_width": 8, "channels": [16, 32, 64, 128]}
Setting = tuple[str, dict[str, Any], int, int, int, int, float, int | None]
"""Backbone, its options, image size, phase I epochs, phase II epochs, batch size, learning rate, training images
(None: all)."""
DEFAULTS: dict[str, Setting] = {
    "digits": ("resnet10t", {"stem_width": 16, "channels": [16, 32, 64, 128]}, 16, 30, 10, 64, 0.05, None),
    "fashion-mnist": ("resnet10t", QUARTER, 28, 5, 2, 64, 0.1, None),
    "cifar10": ("resnet10t", QUARTER, 32, 5, 2, 64, 0.1, None),
    "cifar100": ("resnet10t", QUARTER, 32, 5, 2, 64, 0.1, None),
}
"""Sized for a 2-core CPU (digits: its 1,293 training images), SGD Nesterov, weight decay 1e-4, the paper's steps.
Measured on Fashion-MNIST, 2 cores, nothing else running: phase I 15 ms per step of 64 images, 12.6-16 s per epoch
of the 54k training split (843 steps), a phase-I run (5 epochs and the 10k test images) 71-73 s; phase II 7.6 ms
per step, 4.5-5.5 s per epoch, a phase-II run (2 epochs) 10-12 s; one seed (2 phase-I and 5 phase-II runs) 198 s,
so the table's 3 seeds take about 10 minutes. CIFAR uses the same model and schedule (not timed)."""

PAPER_EPOCHS = (300, 180)
FULL: dict[str, Setting] = {
    name: ("resnet18", {}, size, *PAPER_EPOCHS, 64, 0.1, None)
    for name, size in (("fashion-mnist", 28), ("cifar10", 32), ("cifar100", 32))
}
"""``--full``: the paper's schedule (phase I 300 epochs, phase II 180, batch 64, lr 0.1) for a GPU, a full-width
resnet18 in five blocks instead of MSDNet, on the whole training split."""

SMOKE: Setting = ("resnet10t", {"stem_width": 8, "channels": [8, 16, 32, 64]}, 16, 1, 1, 32, 0.05, 128)
"""``--smoke``: a seconds-long check on 128 training and 128 test images."""

AUGMENT = {"fashion-mnist": False}
"""Datasets trained without random crops and flips by default (the others: with)."""

TITLES = {"digits": "digits", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
RESULTS = ("imta_table2.json", "imta_table2.md")
MODEL = "model"
"""Each run's trained network, in its folder (``ek.save``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=tuple(DEFAULTS), default=None,
                        help="default: fashion-mnist where its files are on this machine, else digits")
    parser.add_argument("--root", default=None,
                        help="data folder: the CIFAR python version, or the four Fashion-MNIST files")
    parser.add_argument("--full", action="store_true",
                        help=f"the paper's schedule for a GPU: resnet18, phase I {PAPER_EPOCHS[0]} and phase II "
                             f"{PAPER_EPOCHS[1]} epochs, batch 64, the whole training split")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long check: 128 images, 1 + 1 epochs")
    parser.add_argument("--backbone", default=None, help="timm model name (default: per dataset; the paper: MSDNet)")
    parser.add_argument("--num-blocks", type=int, default=5, help="blocks, one exit after each (the paper: 5)")
    parser.add_argument("--epochs", type=int, default=None, help="phase I epochs")
    parser.add_argument("--phase2-epochs", type=int, default=None, help="phase II epochs")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=0.1, help="OFA weight of the distillation term (Eq. 7)")
    parser.add_argument("--temperature", type=float, default=1.0, help="OFA temperature T")
    parser.add_argument("--train-items", type=int, default=None,
                        help="train on a stratified subset of N images of the training split, drawn per seed "
                             "(default: per dataset)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random crops and flips on the training images (default: on, except for fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of seeds (seed, seed+1, ...): mean ± std (default: 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--budget", action="store_true",
                        help="also calibrate the budgeted policy of the first seed's GE+ISC+OFA network on the "
                             "validation split and write budget.png")
    parser.add_argument("--timing-repeats", type=int, default=3, help="budget timings: fastest of this many runs")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ensemblekit-runs/"
                        f"{NAME}-<data>): {', '.join(RESULTS)} and one folder per seed and run")


# ------------------------------------------------------------------ settings
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a run's result depends on (not the device): model, data subset and both phases' schedules."""
    if args.full and args.data not in FULL:
        raise TableError(f"--full: there is no paper schedule for {args.data}; choose --data from {', '.join(FULL)}")
    backbone, options, size, epochs, phase2, batch, lr, items = (FULL if args.full else DEFAULTS)[args.data]
    eval_items = None
    if args.smoke:
        backbone, options, size, epochs, phase2, batch, lr, items = SMOKE
        eval_items = items
    chosen = {"data": args.data, "backbone": backbone, "backbone_options": dict(options), "image_size": size,
              "num_blocks": args.num_blocks, "epochs": epochs, "phase2_epochs": phase2, "batch_size": batch,
              "lr": lr, "lr_milestones": list(LR_MILESTONES), "momentum": 0.9, "nesterov": True,
              "weight_decay": args.weight_decay, "alpha": args.alpha, "temperature": args.temperature,
              "train_split": "train", "train_items": items, "eval_items": eval_items,
              "augment": AUGMENT.get(args.data, True) if args.augment is None else args.augment}
    if args.backbone is not None:
        chosen.update(backbone=args.backbone, backbone_options={})
    for key in ("epochs", "phase2_epochs", "batch_size", "lr", "train_items"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if chosen["train_items"] is not None or chosen["eval_items"] is not None:
        from ensemblekit.training.data import SUBSET_RULE

        chosen["subset"] = SUBSET_RULE  # how the splits are cut: runs cut otherwise are not reused
    return chosen


def describe(chosen: dict[str, Any], full: bool = False, smoke: bool = False) -> str:
    """The settings in one line: data, model, subset, both phases' epochs and the optimiser."""
    items = "all" if chosen["train_items"] is None else f"a stratified subset of {chosen['train_items']:,}"
    return (f"{chosen['data']}{' --full' if full else ''}{' --smoke' if smoke else ''}: {chosen['backbone']}"
            f"({chosen['backbone_options']}) in {chosen['num_blocks']} blocks at "
            f"{chosen['image_size']}x{chosen['image_size']}; phase I {chosen['epochs']} epoch(s), phase II "
            f"{chosen['phase2_epochs']} epoch(s) on {items} images of the {chosen['train_split']} split "
            f"{'with' if chosen['augment'] else 'without'} augmentation; batch {chosen['batch_size']}, SGD Nesterov "
            f"lr {chosen['lr']} /10 at {', '.join(f'{m:.0%}' for m in chosen['lr_milestones'])} of each phase, "
            f"weight decay {chosen['weight_decay']}; OFA alpha {chosen['alpha']}, T {chosen['temperature']}")


def paper_lr_schedule(epochs: int, milestones: list[float]) -> Any:
    """The learning rate divided by 10 at ``milestones`` (fractions) of a phase of ``epochs``, stepped per batch."""
    import torch

    def make(optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
        total = epochs * steps_per_epoch
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [round(m * total) for m in milestones], 0.1)

    return make


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
        self.val_set, self.test_set, self.info = splits.val, splits.test, splits.info
        self._train_sets = {None: splits.train}
        self.test_loader = make_loader(self.test_set, 256, shuffle=False)

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

    def config(self, seed: int, isc: bool = False, ofa: bool = False) -> Any:
        """Both phases' training settings; ``stages`` is the two-phase schedule with the row's phase II."""
        from ensemblekit.training.config import TrainConfig

        c = self.chosen
        schedule = {"name": "two_phase", "phase2_epochs": c["phase2_epochs"], "isc": "concat" if isc else None,
                    "ofa": ofa, "alpha": c["alpha"], "temperature": c["temperature"]}
        return TrainConfig(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"], momentum=c["momentum"],
                           nesterov=c["nesterov"], weight_decay=c["weight_decay"], seed=seed,
                           device=self.args.device, progress=self.args.progress, keep_checkpoints=1,
                           stages=schedule)

    def stages(self, net: Any, config: Any) -> list[Any]:
        """The two phases, each with the paper's step schedule over its own epochs."""
        from ensemblekit.training.trainer import resolve_stages

        return [replace(stage, lr_schedule=paper_lr_schedule(stage.epochs, self.chosen["lr_milestones"]))
                for stage in resolve_stages(net, config)]

    def phase1_network(self, ge: bool) -> Any:
        """A fresh multi-exit network, one exit after each block, with or without GE (Eq. 4-5)."""
        from ensemblekit.training.config import ModelConfig, build_ensemble

        c = self.chosen
        return build_ensemble(ModelConfig(c["backbone"], num_classes=self.info.num_classes,
                                          in_chans=self.info.in_chans, image_size=self.info.image_size,
                                          backbone_options=c["backbone_options"], recipe="multi_exit",
                                          recipe_options={"num_blocks": c["num_blocks"],
                                                          "gradient_equilibrium": ge}))

    def train_and_evaluate(self, seed: int, label: str, folder: Path, resume: bool) -> dict[str, Any]:
        """Train the run ``label`` (a phase I or a row of the table) of ``seed`` in ``folder``; its result for
        ``run.json``."""
        import ensemblekit as ek
        from ensemblekit.evaluation.reports import collect_members
        from ensemblekit.training.trainer import seed_everything, train

        seed_everything(seed)
        if label in ROWS:
            ge, isc, ofa = ROWS[label]
            net = ek.load(self.store.folder(seed, PHASE1[ge]) / MODEL, device=self.device)
            config = self.config(seed, isc, ofa)
            phase = self.stages(net, config)[1:]
        else:
            net = self.phase1_network(label == PHASE1[True])
            config = self.config(seed)
            phase = self.stages(net, config)[:1]
        result = train(net, self.train_set(seed), config, out_dir=folder, resume=resume, stages=phase,
                       extra={"run": self.run_settings(seed)})
        net.eval()
        members, labels = collect_members(net.forward_members, self.test_loader, self.device)
        input_size = (self.info.in_chans, self.info.image_size, self.info.image_size)
        ek.save(net, folder / MODEL, overwrite=True)
        return {"top1": ((members.argmax(-1) == labels[:, None]).double().mean(0) * 100).tolist(),
                "exit_flops": [float(r.flops) for r in net.cost_table(input_size=input_size)],
                "history": result.history}

    def budget(self, seed: int, out: Path) -> dict[str, Any]:
        """The budgeted curve of ``seed``'s GE+ISC+OFA network (validation split for the thresholds)."""
        import ensemblekit as ek
        from ensemblekit.evaluation.budget import budget_sweep, plot_budget
        from ensemblekit.training.data import make_loader

        net = ek.load(self.store.folder(seed, "GE+ISC+OFA") / MODEL, device=self.device)
        report = budget_sweep(net, make_loader(self.val_set, 256, shuffle=False), self.test_loader,
                              repeats=self.args.timing_repeats)
        plot_budget(report, out / "budget.png",
                    title=f"{self.chosen['backbone']} GE+ISC+OFA on {self.args.data} (test, seed {seed})")
        return {"seed": seed, **report.to_dict(), "table": report.table()}


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.data is None:
        args.data = default_dataset()
    out = args.out or Path("ensemblekit-runs") / f"{NAME}-{args.data}"
    seeds = seed_range(args.seed, args.seeds)
    chosen = settings(args)
    labels = [*PHASE1.values(), *ROWS]
    check_settings(RunStore(out), ((seed, label, {**chosen, "seed": seed}) for seed in seeds for label in labels))
    out.mkdir(parents=True, exist_ok=True)
    print(f"settings: {describe(chosen, args.full, args.smoke)}; seeds {seeds}, device {device_name(args.device)}",
          flush=True)
    table_runs = _Table(args, chosen, out)
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds:
        for label in labels:
            results.setdefault(seed, {})[label] = get_or_train(
                table_runs.store, seed, label, table_runs.run_settings(seed),
                partial(table_runs.train_and_evaluate, seed, label), keep_checkpoints=False,
                summary=lambda saved: "top-1 per exit " + ", ".join(f"{a:.2f}" for a in saved["top1"]))
            _write_results(out, args, chosen, seeds, results, None, start)
    budget = table_runs.budget(seeds[0], out) if args.budget else None
    record = _write_results(out, args, chosen, seeds, results, budget, start)
    print()
    print(table(record))
    if budget is not None:
        print(budget["table"])
    print("\nthe paper's claim, judged on this table (margins in accuracy points, paired by seed):")
    print("\n".join(claim.line() for claim in claims(results)))
    print(f"\noutputs in {out.resolve()}: {', '.join(RESULTS)}{', budget.png' if budget else ''}, one folder per "
          "seed and run (run.json, model/)")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


# ------------------------------------------------------------------ results
def claims(results: dict[int, dict[str, dict[str, Any]]]) -> list[Any]:
    """Table 2's claim on the seeds with both rows finished, paired by seed: GE+ISC+OFA >= baseline at every exit."""
    pairs = [(by_label["GE+ISC+OFA"]["top1"], by_label["baseline"]["top1"]) for by_label in results.values()
             if "GE+ISC+OFA" in by_label and "baseline" in by_label]
    if not pairs:
        return []
    comparisons = tuple(Comparison(f"GE+ISC+OFA@E-{k + 1}", f"baseline@E-{k + 1}", [full[k] for full, _ in pairs],
                                   [base[k] for _, base in pairs]) for k in range(len(pairs[0][0])))
    return [Claim("GE+ISC+OFA >= baseline at every exit", "IMTA Table 2", comparisons)]


def summarise(results: dict[int, dict[str, dict[str, Any]]]) -> tuple[dict, dict]:
    """Mean and standard deviation (n - 1; 0 for one seed) over seeds of each run's top-1 per exit.

    Examples:
        >>> mean, std = summarise({0: {"GE": {"top1": [50.0, 60.0]}}, 1: {"GE": {"top1": [52.0, 60.0]}}})
        >>> mean["GE"], std["GE"][1]
        ([51.0, 60.0], 0.0)
    """
    mean: dict[str, list[float]] = {}
    std: dict[str, list[float]] = {}
    for label in [*PHASE1.values(), *ROWS]:
        runs = [by_label[label]["top1"] for by_label in results.values() if label in by_label]
        if runs:
            spreads = [mean_std(values) for values in zip(*runs)]
            mean[label], std[label] = [m for m, _ in spreads], [s for _, s in spreads]
    return mean, std


def _write_results(out: Path, args: argparse.Namespace, chosen: dict[str, Any], seeds: list[int],
                   results: dict[int, dict[str, dict[str, Any]]], budget: dict[str, Any] | None,
                   start: float) -> dict[str, Any]:
    import torch

    from ensemblekit.training.checkpoint import atomic_write

    mean, std = summarise(results)
    done = sum(len(by_label) for by_label in results.values())
    total = len(seeds) * (len(PHASE1) + len(ROWS))
    full_row = next((by_label["GE+ISC+OFA"] for by_label in results.values() if "GE+ISC+OFA" in by_label), None)
    judged = claims(results)
    record = {
        "data": args.data, "full": args.full, "smoke": args.smoke, "settings": chosen,
        "settings_text": describe(chosen, args.full, args.smoke), "seeds": seeds,
        "device": device_name(args.device), "torch": torch.__version__,
        "runs_finished": done, "runs_total": total, "complete": done == total,
        "wall_seconds": time.perf_counter() - start,
        "run_seconds": {label: [by_label[label]["seconds"] for by_label in results.values() if label in by_label]
                        for label in [*PHASE1.values(), *ROWS]},
        "exit_flops": None if full_row is None else full_row["exit_flops"],
        "ours": mean, "std": std,
        "per_seed": {str(seed): {label: run["top1"] for label, run in by_label.items()}
                     for seed, by_label in results.items()},
        "paper_dataset": PAPER_DATASET, "paper": PAPER,
        "claims": [claim.to_dict() for claim in judged],
    }
    if budget is not None:
        record["budget"] = {k: v for k, v in budget.items() if k != "table"}
    atomic_write(out / RESULTS[0], json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    if judged:
        text += ("\nThe paper's claim, judged on this table (margins in accuracy points, paired by seed):\n\n```\n"
                 + "\n".join(claim.line() for claim in judged) + "\n```\n")
    atomic_write(out / RESULTS[1], text)
    return record


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if seeds > 1 else f"{mean:.2f}"


def table(record: dict[str, Any]) -> str:
    """Table 2's layout (a row per GE / ISC / OFA combination, a column per exit), the paper's numbers beside ours,
    the cost of each exit in MACs (the papers' "FLOPs") above it."""
    from ensemblekit.core.flops import flops_to_macs

    s = record["settings"]
    seeds = len(record["seeds"])
    exits = len(next(iter(record["ours"].values()), [])) or s["num_blocks"]
    size = s["image_size"]
    macs = ("" if record["exit_flops"] is None else
            ", ".join(f"{flops_to_macs(f) / 1e6:.2f}" for f in record["exit_flops"]))
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [f"IMTA Table 2 on {TITLES[record['data']]}: test top-1 (%) at each exit, {spread} "
             f"({record['runs_finished']}/{record['runs_total']} runs finished)",
             f"MMACs per {size}x{size} image to each exit (the papers' \"FLOPs\"; ensemblekit's FLOPs are twice "
             f"these): {macs or '-'}", "",
             "| GE | ISC | OFA | " + " | ".join(f"E-{k + 1}" for k in range(exits)) + " | "
             + " | ".join(f"paper E-{k + 1}" for k in range(len(PAPER["baseline"]))) + " |",
             "|:-:|:-:|:-:|" + "---:|" * (exits + len(PAPER["baseline"]))]
    for label, flags in ROWS.items():
        marks = ["✓" if flag else "-" for flag in flags]
        ours = ([_cell(m, sd, seeds) for m, sd in zip(record["ours"][label], record["std"][label])]
                if label in record["ours"] else ["-"] * exits)
        lines.append("| " + " | ".join(marks + ours + [f"{a:.2f}" for a in PAPER[label]]) + " |")
    lines.append("")
    for label in PHASE1.values():
        if label in record["ours"]:
            lines.append(f"after {label} only (what phase II starts from): "
                         + ", ".join(_cell(m, sd, seeds) for m, sd in zip(record["ours"][label], record["std"][label])))
    lines.append(f"paper: Table 2 of Li et al. (ICCV 2019), {PAPER_DATASET}"
                 + ("" if record["data"] == "cifar100" else f"; this table is on {record['data']}, comparable in "
                    "trend, not in value") + ".")
    return "\n".join(lines)


def markdown(record: dict[str, Any]) -> str:
    """The table as Markdown with its settings, device and wall time."""
    return (f"{table(record)}\n\nSettings: {record['settings_text']}. Device {record['device']}, torch "
            f"{record['torch']}, wall time {record['wall_seconds']:.0f} s.\n")
