"""EnsembleNet Table 1: a backbone against its two-branch versions at equal parameters (Lee et al.).

Four rows, as in the paper's Table 1 (ImageNet, ResNet-152 and SE-ResNet-152):

* ``Baseline``: the single backbone, trained with cross-entropy;
* ``lambda=0``: the ensembling loss, Eq. 2, with lambda = 0 (the plain sum of
  the branches' cross-entropies, conventional ensembling);
* ``lambda=-1.5``: Eq. 2 with the negative lambda the paper finds best;
* ``mu=3``: the co-distillation loss, Eq. 3, with mu = 3 (EnsembleNet).

The multi-branch rows share the backbone's lower half (its first blocks up to
``layer2`` for a ResNet) and give each of two branches its own copy of the upper
half narrowed to `PAPER_WIDTH` (the paper's 176/256: bottlenecks
(256, 512) -> (176, 352)), so that the whole model has about the backbone's
parameter count, as the paper's rows have (58.2M against 60.1M). The count of
every row and its difference to the baseline are printed; they stay within
`PARAMS_TOLERANCE`. Test accuracy is that of the ensemble output (the
mean of the branches' logits), the number the paper reports; the branches'
own mean accuracy is shown beside it. The paper's "lambda = 1 or mu = 0" row
(training the ensemble output only, 77.74% top-1) is its negative control and
is not run here.

Settings (shown on screen and stored in ``ensemblenet_table1.json``):

* default: sized for a 2-core CPU: resnet10t at a quarter of its width (stem
  8, channels 16/32/64/128), 28x28 inputs, 4 epochs on the whole 54k training
  split (Fashion-MNIST) without augmentation, batch 128, SGD lr 0.1 cosine: about
  50 s per run on 2 cores, about 10 minutes for the 12 runs (4 rows x 3 seeds);
  see `DEFAULTS`.
* ``--full``: the paper's schedule (Sec. 4.1, "Implementation Details") for a
  GPU: resnet18 at full width, momentum SGD at lr 0.01 decayed by 0.2 every 60
  epochs, 180 epochs, on the whole training set (``trainval``); see `FULL`.
* ``--smoke``: a seconds-long check (128 training and 128 test images, 1 epoch).

``--seeds N`` repeats every run with seeds ``seed .. seed + N - 1`` and shows
mean ± std. The table is resumable: each finished run is kept in
``<out>/seed-<s>/<row>/run.json`` (`RunStore`)
and reused, an unfinished one continues from its last checkpoint, and a table
started with other settings in the same ``--out`` is refused (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    comparable,
    default_dataset,
    device_name,
    get_or_train,
    mean_std,
    seed_range,
    train_run,
)

__all__ = ["DEFAULTS", "FULL", "HELP", "NAME", "PAPER", "PAPER_WIDTH", "PARAMS_TOLERANCE", "ROWS", "SMOKE",
           "add_arguments", "claims", "configs", "model_sizes", "run", "settings", "summarise"]

NAME = "ensemblenet-table1"
HELP = ("EnsembleNet Table 1: a single backbone against two narrowed branches trained with lambda=0, lambda=-1.5 "
        "(Eq. 2) and mu=3 (Eq. 3) at equal parameters, next to the paper's ImageNet numbers.")

ROWS: dict[str, dict[str, Any] | None] = {
    "Baseline": None,
    "lambda=0": {"name": "ensemblenet_ensembling", "lam": 0.0},
    "lambda=-1.5": {"name": "ensemblenet_ensembling", "lam": -1.5},
    "mu=3": {"name": "ensemblenet_codistillation", "mu": 3.0},
}
"""Row label -> the multi-branch row's loss (Eq. 2 with ``lam``, Eq. 3 with ``mu``); None: the single backbone."""

PAPER = {
    "ResNet-152": {"Baseline": (78.54, 94.05, 60.1, 21.8), "lambda=0": (79.85, 94.98, 58.2, 21.0),
                   "lambda=-1.5": (80.28, 95.27, 58.2, 21.0), "mu=3": (80.58, 95.38, 58.2, 21.0)},
    "SE-ResNet-152": {"Baseline": (78.85, 94.25, 66.7, 21.9), "lambda=0": (80.76, 95.33, 64.5, 21.1),
                      "lambda=-1.5": (81.36, 95.67, 64.5, 21.1), "mu=3": (81.75, 95.82, 64.5, 21.1)},
}
"""Table 1 (a) and (b) of the paper: ImageNet (ILSVRC2012 validation, 224x224, single crop), top-1 (%),
top-5 (%), parameters (M), FLOPs (B); uncertainties about 0.06%."""
PAPER_DATASET = "ImageNet (ILSVRC2012 val, 224x224 single crop)"
PAPER_WIDTH_CONFIG = "base (64, 128), 2 branches (176, 352); baseline (64, 128, 256, 512)"

PAPER_WIDTH = 176 / 256
"""The branches' width in Table 1: the bottleneck widths of the upper two ResNet-152 blocks, 256 and 512,
become 176 and 352 ("shrinking ratio about 1.5", Sec. 3), which keeps two branches at about the backbone's size."""
FORK = -2
"""The first branched block: the upper half of a four-stage ResNet ("we leave the lower two blocks as they are")."""
BRANCHES = 2
PARAMS_TOLERANCE = 0.05
"""The multi-branch rows' parameters stay within this relative difference of the baseline's (the paper: -3.2%)."""

QUARTER = {"stem_width": 8, "channels": [16, 32, 64, 128]}
Setting = tuple[str, dict[str, Any], int, int, int, float | None, int | None]
"""Backbone, its options, image size, epochs, batch size, learning rate, training images (None: all)."""
DEFAULTS: dict[str, Setting] = {
    "digits": ("resnet10t", {"stem_width": 16, "channels": [16, 32, 64, 128]}, 16, 5, 64, 0.05, None),
    "fashion-mnist": ("resnet10t", QUARTER, 28, 4, 128, 0.1, None),
    "cifar10": ("resnet10t", QUARTER, 32, 4, 128, 0.1, None),
    "cifar100": ("resnet10t", QUARTER, 32, 4, 128, 0.1, None),
}
"""Sized for a 2-core CPU (SGD, momentum 0.9, weight decay 5e-4, cosine). Measured on Fashion-MNIST, 2 cores:
about 28 ms per step of 128 images for every row, 11-14 s per epoch of the 54k training split (422 steps),
a 4-epoch mu=3 run 52 s with its evaluation on the 10k test images (3-epoch runs: 35-39 s), so the 12 runs
take about 10 minutes. CIFAR uses the same model and schedule (not timed)."""

PAPER_EPOCHS = 180
"""The paper decays the learning rate by 0.2 every 60 epochs but does not say for how long it trains;
three decays are assumed."""
FULL: dict[str, Setting] = {
    name: ("resnet18", {}, size, PAPER_EPOCHS, 128, 0.01, None)
    for name, size in (("fashion-mnist", 28), ("cifar10", 32), ("cifar100", 32))
}
"""``--full``: the paper's schedule (Sec. 4.1): momentum SGD, lr 0.01 decayed by 0.2 every 60 epochs, "small"
l2 (1e-4 here), on the whole training set, with a full-width resnet18. Not reproduced: the paper's label
smoothing 0.1, normal(0.03) convolution init, ReLU6 bottlenecks, subsampling in each block's last unit, and
its batch of 4096 on 128 TPU cores (128 here)."""
FULL_OPTIMISATION = {"schedule": "step", "step_epochs": 60, "gamma": 0.2, "weight_decay": 1e-4}
DEFAULT_OPTIMISATION = {"schedule": "cosine", "step_epochs": 30, "gamma": 0.1, "weight_decay": 5e-4}

SMOKE: Setting = ("resnet10t", QUARTER, 16, 1, 32, None, 128)
"""``--smoke``: a seconds-long check on 128 training and 128 test images; the learning rate stays the chosen one."""

AUGMENT = {"fashion-mnist": False}
"""Datasets trained without random crops and flips by default (the others: with)."""

TITLES = {"digits": "digits", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
RESULTS = ("ensemblenet_table1.json", "ensemblenet_table1.md")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=tuple(DEFAULTS), default=None,
                        help="default: fashion-mnist where its files are on this machine, else digits")
    parser.add_argument("--root", default=None,
                        help="data folder: the CIFAR python version, or the four Fashion-MNIST files (default for "
                             "fashion-mnist: $ENSEMBLEKIT_FASHION_MNIST, then the Debian package "
                             "dataset-fashion-mnist)")
    parser.add_argument("--full", action="store_true",
                        help=f"the paper's schedule for a GPU: resnet18, momentum SGD lr 0.01 x0.2 every 60 epochs, "
                             f"{PAPER_EPOCHS} epochs, the whole training set (fashion-mnist, cifar10, cifar100)")
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long check: 128 images, 1 epoch, 16x16 inputs")
    parser.add_argument("--backbone", default=None, help="timm model name (default: per dataset)")
    parser.add_argument("--width", type=float, default=PAPER_WIDTH,
                        help=f"the branches' width multiplier (default: the paper's 176/256 = {PAPER_WIDTH:.4f})")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--train-items", type=int, default=None,
                        help="train on a stratified subset of N images of the training split, drawn per seed "
                             "(default: all)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random crops and flips on the training images (default: on, except for fashion-mnist)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of seeds (seed, seed+1, ...): mean ± std (default: 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--out", type=Path, default=None, help="default: ensemblekit-runs/ensemblenet-table1-<data>")


# ------------------------------------------------------------------ settings
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Backbone, width, image size, schedule, training split and subset that ``args`` choose."""
    if args.full and args.data not in FULL:
        raise TableError(f"--full: there is no paper schedule for {args.data}; choose --data from {', '.join(FULL)}")
    if not 0 < args.width <= 1:
        raise TableError(f"--width must be in (0, 1], got {args.width}")
    backbone, options, size, epochs, batch, lr, items = (FULL if args.full else DEFAULTS)[args.data]
    chosen = {"backbone": backbone, "backbone_options": dict(options), "width": args.width, "fork": FORK,
              "branches": BRANCHES, "image_size": size, "epochs": epochs, "batch_size": batch, "lr": lr,
              **(FULL_OPTIMISATION if args.full else DEFAULT_OPTIMISATION),
              "train_split": "trainval" if args.full else "train", "train_items": items, "eval_items": None,
              "augment": AUGMENT.get(args.data, True) if args.augment is None else args.augment}
    if args.smoke:
        backbone, options, size, epochs, batch, _, items = SMOKE
        chosen.update(backbone=backbone, backbone_options=dict(options), image_size=size, epochs=epochs,
                      batch_size=batch, train_items=items, eval_items=items)
    if args.backbone is not None:
        chosen.update(backbone=args.backbone, backbone_options={})
    for key in ("epochs", "batch_size", "lr", "train_items"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    return chosen


def configs(args: argparse.Namespace, seed: int | None = None) -> dict[str, Any]:
    """One run config per row of the table (for ``seed``, default ``args.seed``)."""
    from ensemblekit.training.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    s = settings(args)
    data = DataConfig(name=args.data, root=args.root, image_size=s["image_size"], augment=s["augment"],
                      train_split=s["train_split"], num_workers=args.num_workers,
                      max_train_items=s["train_items"], max_eval_items=s["eval_items"])
    train = TrainConfig(epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], schedule=s["schedule"],
                        step_epochs=s["step_epochs"], gamma=s["gamma"], weight_decay=s["weight_decay"],
                        seed=args.seed if seed is None else seed, device=args.device, progress=args.progress)
    runs = {}
    for label, loss in ROWS.items():
        if loss is None:
            model = ModelConfig(s["backbone"], backbone_options=s["backbone_options"],
                                topology={"name": "independent", "members": 1}, loss="independent")
        else:
            model = ModelConfig(s["backbone"], backbone_options=s["backbone_options"], recipe="ensemblenet",
                                recipe_options={"branches": s["branches"], "fork": s["fork"], "width": s["width"],
                                                "loss": loss})
        runs[label] = RunConfig(model, data, train)
    return runs


def model_sizes(runs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per row: parameters and FLOPs per image of the whole model, the parameters' relative difference to the
    first row's (the baseline), and the width of each block of the trunk and of a branch."""
    from ensemblekit.training.config import build_ensemble
    from ensemblekit.training.trainer import load_split

    first = next(iter(runs.values()))
    _, info = load_split(first.data, first.data.eval_split, limit=1)
    sizes: dict[str, dict[str, Any]] = {}
    for label, config in runs.items():
        model = build_ensemble(replace(config.model, num_classes=info.num_classes, in_chans=info.in_chans,
                                       image_size=info.image_size))
        input_size = (info.in_chans, info.image_size, info.image_size)
        cost = model.cost_table(input_size=input_size)[-1]
        sizes[label] = {"params": int(cost.params), "flops": float(cost.flops),
                        "block_widths": _block_widths(model, input_size)}
    base = next(iter(sizes.values()))["params"]
    for size in sizes.values():
        size["relative_params"] = size["params"] / base - 1
    return sizes


def _block_widths(model: Any, input_size: tuple[int, int, int]) -> list[int | None]:
    """Channels of each block's output on member 0's path (the trunk's blocks, then its branch's); None where
    the output is not a feature map."""
    import torch

    from ensemblekit.core.blocks import call_block

    state: Any = torch.zeros(1, *input_size)
    widths: list[int | None] = []
    with torch.no_grad():
        for index in model.graph.members[0].path:
            state = call_block(model.nodes[index].eval(), state)
            widths.append(int(state.shape[1]) if isinstance(state, torch.Tensor) and state.dim() == 4 else None)
    return widths


# ------------------------------------------------------------------ running
def run(args: argparse.Namespace) -> int:
    from ensemblekit.evaluation.reports import Report

    start = time.perf_counter()
    if args.data is None:
        args.data = default_dataset()
    out = args.out or Path("ensemblekit-runs") / f"ensemblenet-table1-{args.data}"
    seeds = seed_range(args.seed, args.seeds)
    chosen = settings(args)
    runs = {seed: configs(args, seed) for seed in seeds}
    store = RunStore(out)
    check_settings(store, ((seed, label, comparable(config)) for seed in seeds
                           for label, config in runs[seed].items()))
    sizes = model_sizes(runs[seeds[0]])
    out.mkdir(parents=True, exist_ok=True)
    print(f"settings: {describe(args.data, chosen, args.full, args.smoke)}, seeds {seeds}, "
          f"device {device_name(args.device)}", flush=True)
    print(sizes_text(sizes), flush=True)

    accuracy: dict[int, dict[str, dict[str, float]]] = {}
    seconds: dict[str, list[float]] = {}
    for seed in seeds:
        for label, config in runs[seed].items():
            saved = get_or_train(store, seed, label, comparable(config), partial(train_run, config))
            report = Report.from_dict(saved["report"])
            seconds.setdefault(label, []).append(saved["seconds"])
            accuracy.setdefault(seed, {})[label] = {"ensemble": 100 * report.prefix_accuracy[-1],
                                                    "branches": 100 * statistics.fmean(report.member_accuracy)}
            _write_results(out, args, chosen, seeds, sizes, accuracy, seconds, start)
    mean, std = summarise(accuracy)
    print(table(mean, std if len(seeds) > 1 else None, sizes, args.data, len(seeds)))
    judged = claims(accuracy)
    print("\nthe paper's claims, judged on this table (margins in accuracy points, paired by seed):")
    print("\n".join(claim.line() for claim in judged))
    _write_results(out, args, chosen, seeds, sizes, accuracy, seconds, start)
    print(f"\noutputs in {out.resolve()}: {', '.join(RESULTS)}, one folder per seed and row")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


# ------------------------------------------------------------------ results
def claims(accuracy: dict[int, dict[str, dict[str, float]]]) -> list[Any]:
    """Table 1's claims on the ensemble's test accuracy, paired by seed over the seeds with every row finished:
    co-distillation (mu=3) >= lambda=0 >= the single backbone, and a negative lambda (-1.5) >= lambda=0."""
    complete = [by_label for by_label in accuracy.values() if all(label in by_label for label in ROWS)]
    if not complete:
        return []

    def compare(left: str, right: str) -> Comparison:
        return Comparison(left, right, [r[left]["ensemble"] for r in complete],
                          [r[right]["ensemble"] for r in complete])

    return [Claim("co-distillation (mu=3) >= lambda=0 >= single backbone, at equal parameters", "EnsembleNet Table 1",
                  (compare("mu=3", "lambda=0"), compare("lambda=0", "Baseline"))),
            Claim("a negative lambda helps: lambda=-1.5 >= lambda=0", "EnsembleNet Table 1",
                  (compare("lambda=-1.5", "lambda=0"),))]


def summarise(accuracy: dict[int, dict[str, dict[str, float]]]) -> tuple[dict, dict]:
    """Mean and standard deviation (n - 1; 0 for one seed) over seeds, per row and measure.

    Examples:
        >>> mean, std = summarise({0: {"mu=3": {"ensemble": 90.0}}, 1: {"mu=3": {"ensemble": 92.0}}})
        >>> mean["mu=3"]["ensemble"], round(std["mu=3"]["ensemble"], 3)
        (91.0, 1.414)
    """
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for label in ROWS:
        runs = [by_label[label] for by_label in accuracy.values() if label in by_label]
        if runs:
            spreads = {measure: mean_std([r[measure] for r in runs]) for measure in runs[0]}
            mean[label] = {measure: m for measure, (m, _) in spreads.items()}
            std[label] = {measure: s for measure, (_, s) in spreads.items()}
    return mean, std


def describe(data: str, chosen: dict[str, Any], full: bool = False, smoke: bool = False) -> str:
    """The settings in one line: data, model, width, schedule and training subset."""
    items = "all" if chosen["train_items"] is None else f"a stratified subset of {chosen['train_items']}"
    schedule = ("cosine" if chosen["schedule"] == "cosine"
                else f"x{chosen['gamma']} every {chosen['step_epochs']} epochs")
    return (f"{data}{' --full' if full else ''}{' --smoke' if smoke else ''}: {chosen['backbone']}"
            f"({chosen['backbone_options']}) at {chosen['image_size']}x{chosen['image_size']}; multi-branch rows: "
            f"{chosen['branches']} branches from block {chosen['fork']} at width {chosen['width']:.4f}; "
            f"{chosen['epochs']} epoch{'s' if chosen['epochs'] != 1 else ''} on {items} images of the "
            f"{chosen['train_split']} split "
            f"{'with' if chosen['augment'] else 'without'} augmentation, batch {chosen['batch_size']}, SGD lr "
            f"{chosen['lr']} {schedule}, weight decay {chosen['weight_decay']}")


def sizes_text(sizes: dict[str, dict[str, Any]]) -> str:
    """Each row's parameters, difference to the baseline and FLOPs, one line each."""
    lines = [f"parameters (multi-branch rows within ±{100 * PARAMS_TOLERANCE:.0f}% of the baseline's):"]
    for label, size in sizes.items():
        flag = "" if abs(size["relative_params"]) <= PARAMS_TOLERANCE else "  (outside the tolerance)"
        lines.append(f"  {label:<12} {size['params']:>12,} params ({100 * size['relative_params']:+.1f}%), "
                     f"{size['flops'] / 1e6:,.1f} MFLOPs per image, block widths {size['block_widths']}{flag}")
    return "\n".join(lines)


def table(mean: dict, std: dict | None, sizes: dict[str, dict[str, Any]], data: str, seeds: int) -> str:
    """The paper's layout: a row per model, our ensemble and branch accuracy, the paper's top-1 beside it."""
    width = 8 if std is None else 12
    header = (f"{'row':<12} {'params':>10} {'vs base':>8} {'ensemble':>{width}} {'branches':>{width}}"
              + "".join(f" {'paper ' + model:>17}" for model in PAPER))
    spread = f", mean±std over {seeds} seeds" if std is not None else ""
    lines = [f"EnsembleNet Table 1 on {TITLES[data]}: test top-1 (%){spread}; paper: {PAPER_DATASET} top-1",
             header, "-" * len(header)]
    for label in ROWS:
        if label not in mean:
            continue
        cells = [(f"{mean[label][m]:.2f}" if std is None else f"{mean[label][m]:.2f}±{std[label][m]:.2f}")
                 .rjust(width) for m in ("ensemble", "branches")]
        lines.append(f"{label:<12} {sizes[label]['params']:>10,} {100 * sizes[label]['relative_params']:>+7.1f}% "
                     + " ".join(cells) + "".join(f" {rows[label][0]:>17.2f}" for rows in PAPER.values()))
    return "\n".join(lines)


def _write_results(out: Path, args: argparse.Namespace, chosen: dict[str, Any], seeds: list[int],
                   sizes: dict[str, dict[str, Any]], accuracy: dict, seconds: dict[str, list[float]],
                   start: float) -> None:
    import torch

    from ensemblekit.training.checkpoint import atomic_write

    mean, std = summarise(accuracy)
    done = sum(len(by_label) for by_label in accuracy.values())
    judged = claims(accuracy)
    record = {
        "data": args.data, "full": args.full, "smoke": args.smoke, "settings": chosen,
        "settings_text": describe(args.data, chosen, args.full, args.smoke), "seeds": seeds,
        "device": device_name(args.device), "torch": torch.__version__,
        "runs_finished": done, "runs_total": len(seeds) * len(ROWS), "complete": done == len(seeds) * len(ROWS),
        "wall_seconds": time.perf_counter() - start, "run_seconds": seconds,
        "params_tolerance": PARAMS_TOLERANCE, "sizes": sizes,
        "ours": mean, "std": std,
        "per_seed": {str(seed): by_label for seed, by_label in accuracy.items()},
        "paper_dataset": PAPER_DATASET, "paper_width_config": PAPER_WIDTH_CONFIG,
        "paper": {model: {label: dict(zip(("top1", "top5", "params_M", "flops_B"), values))
                          for label, values in rows.items()} for model, rows in PAPER.items()},
        "claims": [claim.to_dict() for claim in judged],
    }
    atomic_write(out / RESULTS[0], json.dumps(record, indent=2) + "\n")
    text = markdown(mean, std, sizes, record)
    if judged:
        text += ("\nThe paper's claims, judged on this table (margins in accuracy points, paired by seed):\n\n```\n"
                 + "\n".join(claim.line() for claim in judged) + "\n```\n")
    atomic_write(out / RESULTS[1], text)


def markdown(mean: dict, std: dict, sizes: dict[str, dict[str, Any]], record: dict[str, Any]) -> str:
    """The table as Markdown (mean ± std over seeds) with parameters, settings, device and wall time."""
    seeds = len(record["seeds"])
    lines = [f"EnsembleNet Table 1 on {TITLES[record['data']]}: test top-1 (%) of the ensemble output and the "
             f"branches' mean, {'mean ± std over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'} "
             f"({record['runs_finished']}/{record['runs_total']} runs finished); the paper's top-1 on "
             f"{PAPER_DATASET} beside it.", "",
             f"Settings: {record['settings_text']}. Device {record['device']}, torch {record['torch']}, wall time "
             f"{record['wall_seconds']:.0f} s.", "",
             "| row | params | vs baseline | MFLOPs | block widths | ensemble | branches | "
             + " | ".join(f"paper {model}" for model in PAPER) + " |",
             "|---|---:|---:|---:|---|---:|---:|" + "---:|" * len(PAPER)]
    for label in ROWS:
        size = sizes[label]
        cells = [("-" if label not in mean else f"{mean[label][m]:.2f} ± {std[label][m]:.2f}" if seeds > 1
                  else f"{mean[label][m]:.2f}") for m in ("ensemble", "branches")]
        lines.append(f"| {label} | {size['params']:,} | {100 * size['relative_params']:+.1f}% | "
                     f"{size['flops'] / 1e6:.1f} | {size['block_widths']} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{rows[label][0]:.2f}" for rows in PAPER.values()) + " |")
    lines += ["", f"The paper's rows (width config {PAPER_WIDTH_CONFIG}) have 58.2M parameters against the "
              "baseline's 60.1M (-3.2%; SE-ResNet-152: 64.5M against 66.7M). Its \"lambda = 1 or mu = 0\" row "
              "(77.74% / 78.83% top-1) is not run here."]
    return "\n".join(lines) + "\n"
