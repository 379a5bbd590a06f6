"""HNE Table 1: the training-objective ablation (Ruiz & Verbeek).

Trains the same tree ensemble (same backbone, seed and schedule) with four
objectives, L_I, L_S (L_H in the arXiv version), L_I + L_S and
L_I + L_HD, and prints the test accuracy of the nested ensembles of
1, 2, 4, ... members next to the paper's numbers for that dataset. The paper
reports CIFAR-10 and CIFAR-100 with its own depth-wise ResNets (HNE and the
half-width HNE_small); here the tree is built from a timm backbone, so the
numbers are comparable in trend, not in value.

Settings (shown on screen and stored in ``hne_table1.json``):

* default: sized for a CPU. Fashion-MNIST: resnet10t at a quarter of its width
  (stem 8, channels 16/32/64/128), 16 members, 2 epochs on the 54k training
  split without augmentation, batch 128, lr 0.1: about 2 minutes per run on
  2 cores, 12 runs over 3 seeds. Random crops and flips are off by default
  there (``--augment`` turns them on): on a schedule this short they cost
  accuracy (one epoch of L_I, seed 0: 83.0% at 1 member with them, 88.4%
  without).
* ``--full``: the paper's schedule for a GPU (appendix: SGD, lr 0.1, momentum
  0.9, weight decay 5e-4, cosine, batch 128, 16 members, T = 2, alpha = 0.5,
  training on the whole training set) with a resnet-18 tree at full width.
  CIFAR keeps the paper's 200 epochs; Fashion-MNIST uses
  `FASHION_MNIST_FULL_EPOCHS`, so that the four runs fit in about 4
  minutes on one H200, and ``--time-budget`` fits the epochs to the seconds
  available after timing a few training steps on the machine.

``--seeds N`` repeats every run with seeds ``seed .. seed + N - 1`` and shows
mean ± std. The table is resumable: each finished run is kept in
``<out>/seed-<s>/<loss>/run.json`` and reused, an unfinished one continues
from its last checkpoint, and ``hne_table1.json`` / ``hne_table1.md`` are
rewritten after every finished run.
"""

from __future__ import annotations

import argparse
import json
import math
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
    seed_range,
    train_run,
)

__all__ = [
    "AUGMENT", "DEFAULTS", "FASHION_MNIST_FULL_EPOCHS", "FULL", "HELP", "LOSSES", "NAME", "PAPER", "PAPER_COLUMNS",
    "PAPER_EPOCHS", "RESULTS", "SMOKE", "TITLES", "add_arguments", "calibrate", "claims", "configs", "fit_epochs",
    "markdown", "run", "settings", "summarise", "table"
]

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

TITLES = {"digits": "digits", "fashion-mnist": "Fashion-MNIST", "cifar10": "C10", "cifar100": "C100"}

PAPER_EPOCHS = 200
"""The paper's CIFAR schedule (the most any budget-fitted run trains)."""

FASHION_MNIST_FULL_EPOCHS = 5
"""``--full`` epochs on Fashion-MNIST without ``--time-budget``: the paper's 200-epoch cosine schedule
compressed so that the four runs take about 4 minutes on one H200. Why 5: a resnet-18 tree of 16 members
(31 nodes, 154M parameters) at 28x28 is 0.5 GFLOPs per image forward, 1.5 with the backward pass, so
an epoch of 60k images is 90 TFLOPs, a few seconds of TF32 convolutions; what bounds it is the ~2,000
kernel launches of each of the 469 steps (batch 128). With the levels batched (execution "auto" or
"grouped") that is roughly 5 s per epoch, plus 1-2 s for the epoch-end checkpoint (1.2 GB: weights and
momentum) and a few seconds per run to build and evaluate: 4 runs x 5 epochs x ~7 s + ~20 s = ~160-240 s.
With the unbatched loop it is launch-bound at several times that. An estimate, not a measurement: the
GPU run (``benchmarks/gpu_run.sh``) passes ``--time-budget``, which fits the epochs to the step time
measured on the machine."""

# Per dataset: backbone, its options, image size, tree depth, epochs, batch size, learning rate.
DEFAULTS = {
    "digits": ("resnet10t", {"stem_width": 16, "channels": [16, 32, 64, 128]}, 16, 4, 5, 64, 0.05),
    "fashion-mnist": ("resnet10t", {"stem_width": 8, "channels": [16, 32, 64, 128]}, 28, 4, 2, 128, 0.1),
    "cifar10": ("resnet18", {}, 32, 4, PAPER_EPOCHS, 128, 0.1),
    "cifar100": ("resnet18", {}, 32, 4, PAPER_EPOCHS, 128, 0.1),
}
"""CIFAR settings follow the paper's appendix (SGD, lr 0.1, momentum 0.9, weight decay 5e-4, cosine,
200 epochs, batch 128, 16 members); digits and Fashion-MNIST are sized to run in minutes on a CPU."""

FULL = {
    "fashion-mnist": ("resnet18", {}, 28, 4, FASHION_MNIST_FULL_EPOCHS, 128, 0.1),
    "cifar10": DEFAULTS["cifar10"],
    "cifar100": DEFAULTS["cifar100"],
}
"""``--full``: the paper's schedule on a GPU, trained on the whole training set (``trainval``)."""

SMOKE = ("resnet10t", {"stem_width": 8, "channels": [8, 16, 32, 64]}, 16, 2, 1, 32, None)
"""``--smoke``: a seconds-long check (128 training and 128 test images); the learning rate stays the chosen one."""

AUGMENT = {"fashion-mnist": False}
"""Datasets trained without random crops and flips by default (the others: with)."""

RESULTS = ("hne_table1.json", "hne_table1.md")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", choices=tuple(DEFAULTS), default=None,
                        help="default: fashion-mnist where its files are on this machine, else digits")
    parser.add_argument("--root", default=None,
                        help="data folder: the CIFAR python version, or the four Fashion-MNIST files (default for "
                             "fashion-mnist: $ENSEMBLEKIT_FASHION_MNIST, then the Debian package "
                             "dataset-fashion-mnist)")
    parser.add_argument("--full", action="store_true",
                        help="the paper's schedule for a GPU: resnet18 tree of 16 members, SGD lr 0.1, batch 128, "
                             "cosine, the whole training set (CIFAR: 200 epochs; Fashion-MNIST: "
                             f"{FASHION_MNIST_FULL_EPOCHS}, or what --time-budget allows)")
    parser.add_argument("--backbone", default=None, help="timm model name (default: per dataset)")
    parser.add_argument("--depth", type=int, default=None, help="tree depth B: 2^B members (default: 4)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random crops and flips on the training images (default: on, except for fashion-mnist)")
    parser.add_argument("--alpha", type=float, default=0.5, help="distillation weight of L_I+L_HD (paper: 0.5)")
    parser.add_argument("--T", type=float, default=2.0, help="distillation temperature (paper: 2)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...): mean ± std "
                        "(default: 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--execution", default="loop",
                        help="how the nodes of a level run: loop, loop_nhwc, vmap, grouped, grouped_nhwc, auto")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="fit the epochs (when --epochs is not given) to this many seconds for the whole table, "
                             "after timing a few training steps here")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm")
    parser.add_argument("--out", type=Path, default=None, help="default: ensemblekit-runs/hne-table1-<data>")
    parser.add_argument("--smoke", action="store_true",
                        help="a seconds-long check: 128 images, 1 epoch, depth 2, a narrower backbone")


# ------------------------------------------------------------------ settings
def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Backbone, options, image size, depth, epochs, batch size, lr and training split that ``args`` choose."""
    if args.full and args.data not in FULL:
        raise TableError(f"--full: the paper has no schedule for {args.data}; choose --data from {', '.join(FULL)}")
    backbone, options, size, depth, epochs, batch, lr = (FULL if args.full else DEFAULTS)[args.data]
    chosen = {"backbone": backbone, "backbone_options": dict(options), "image_size": size, "depth": depth,
              "epochs": epochs, "batch_size": batch, "lr": lr, "train_split": "trainval" if args.full else "train",
              "max_items": None, "max_epochs": PAPER_EPOCHS if args.full else epochs,
              "augment": AUGMENT.get(args.data, True) if args.augment is None else args.augment}
    if args.smoke:
        backbone, options, size, depth, epochs, batch, _ = SMOKE
        chosen.update(backbone=backbone, backbone_options=dict(options), image_size=size, depth=depth, epochs=epochs,
                      batch_size=batch, max_items=128, max_epochs=epochs)
    if args.backbone is not None:
        chosen.update(backbone=args.backbone, backbone_options={})
    for key in ("depth", "epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    return chosen


def configs(args: argparse.Namespace, seed: int | None = None, epochs: int | None = None) -> dict:
    """One run config per row of the table (for ``seed``, default ``args.seed``)."""
    from ensemblekit.training.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    s = settings(args)
    data = DataConfig(name=args.data, root=args.root, image_size=s["image_size"], augment=s["augment"],
                      train_split=s["train_split"],
                      num_workers=args.num_workers, max_train_items=s["max_items"], max_eval_items=s["max_items"])
    train = TrainConfig(epochs=epochs or s["epochs"], batch_size=s["batch_size"], lr=s["lr"],
                        seed=args.seed if seed is None else seed, device=args.device, progress=args.progress)
    runs = {}
    for label, loss in LOSSES.items():
        spec = ({"name": loss, "alpha": args.alpha, "temperature": args.T} if loss == "hierarchical_distillation"
                else loss)
        options: dict[str, Any] = {"depth": s["depth"], "loss": spec}
        if args.execution != "loop":
            options["execution"] = args.execution
        model = ModelConfig(s["backbone"], backbone_options=s["backbone_options"], recipe="hne",
                            recipe_options=options)
        runs[label] = RunConfig(model, data, train)
    return runs


# ------------------------------------------------------------------ time budget
def calibrate(config: Any, out: Path, steps: int = 10, warmup: int = 3) -> dict[str, float]:
    """Time what one run of ``config`` costs here: building, a training step, a checkpoint, evaluation.

    Builds the model, trains ``warmup`` + ``steps`` steps on the real data
    (the loader's time included; its weights are thrown away), writes one
    checkpoint of weights and momentum into ``out`` (then deletes it) and
    estimates evaluation from the step time.
    """
    import shutil

    import torch

    from ensemblekit.training import checkpoint as ckpt
    from ensemblekit.training.config import build_ensemble
    from ensemblekit.training.data import make_loader
    from ensemblekit.training.trainer import load_split, make_optimizer, seed_everything, select_device

    data, train = config.data, config.train
    train_set, info = load_split(data, data.train_split, augment=data.augment, limit=data.max_train_items,
                                 seed=train.seed)
    eval_set, _ = load_split(data, data.eval_split, limit=data.max_eval_items)
    seed_everything(train.seed)
    start = time.perf_counter()
    model = build_ensemble(replace(config.model, num_classes=info.num_classes, in_chans=info.in_chans,
                                   image_size=info.image_size))
    build = time.perf_counter() - start
    device = select_device(train.device)
    model.to(device).train()
    optimizer = make_optimizer(model.parameters(), train)
    batch = min(train.batch_size, len(train_set))
    loader = make_loader(train_set, batch, shuffle=True, num_workers=data.num_workers, seed=train.seed,
                         drop_last=True)
    times: list[float] = []
    batches = iter(loader)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup + steps):
        sync()
        t = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = model.loss(model.forward_output(x), y).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.detach().item()  # the trainer reads the loss every step: a synchronisation
        times.append(time.perf_counter() - t)
    step = statistics.median(times[warmup:])
    momentum = {f"m{i}": s["momentum_buffer"] for i, s in enumerate(optimizer.state.values())
                if isinstance(s.get("momentum_buffer"), torch.Tensor)}
    target = out / ".calibration-checkpoint"
    t = time.perf_counter()
    ckpt.write_checkpoint(target, model, model.build_config, trainer_tensors=momentum, trainer_state={},
                          overwrite=True)
    checkpoint = time.perf_counter() - t
    shutil.rmtree(target, ignore_errors=True)
    steps_per_epoch = max(1, len(train_set) // batch)
    # evaluation: the forward pass only (about a third of a step), at twice the batch, plus fixed costs
    evaluate = len(eval_set) / batch * step / 3 + 1.0
    # the first step also pays for one-time work (cuDNN's set-up, execution "auto" timing its strategies), which
    # every run does again for training and for evaluation
    first = max(0.0, times[0] - step)
    return {"build_s": build, "step_s": step, "first_step_extra_s": first, "steps_per_epoch": steps_per_epoch,
            "epoch_s": steps_per_epoch * step, "checkpoint_s": checkpoint, "eval_s": evaluate + first,
            "calibration_s": time.perf_counter() - start}


def fit_epochs(budget: float, runs: int, timing: dict[str, float], cap: int, margin: float = 0.85) -> int:
    """The most epochs (1..cap) such that ``runs`` runs take at most ``margin`` of ``budget`` seconds.

    Examples:
        >>> fit_epochs(100, 4, {"build_s": 1, "epoch_s": 2, "checkpoint_s": 0.5, "eval_s": 1}, cap=200)
        6
    """
    fixed = runs * (timing["build_s"] + timing.get("first_step_extra_s", 0.0) + timing["eval_s"] + 2.0)  # + files
    per_epoch = runs * (timing["epoch_s"] + timing["checkpoint_s"])
    return max(1, min(cap, math.floor((margin * budget - fixed) / per_epoch)))


def _budget_epochs(args: argparse.Namespace, out: Path, chosen: dict, seeds: int, start: float
                   ) -> tuple[int, dict | None]:
    """Epochs fitted to ``--time-budget``; a table resumed in ``out`` keeps the epochs fitted first
    (``budget.json``), so that its finished runs stay valid."""
    from ensemblekit.training.checkpoint import atomic_write

    saved = out / "budget.json"
    key = {k: v for k, v in chosen.items() if k != "epochs"} | {"data": args.data, "execution": args.execution}
    if saved.is_file():
        earlier = json.loads(saved.read_text())
        if earlier.get("settings") == json.loads(json.dumps(key)):
            print(f"time budget: {earlier['epochs']} epochs per run, as fitted when this table started "
                  f"({saved})", flush=True)
            return earlier["epochs"], earlier.get("timing")
    timing = calibrate(configs(args)["L_I+L_HD"], out)
    left = args.time_budget - (time.perf_counter() - start)
    epochs = fit_epochs(left, len(LOSSES) * seeds, timing, chosen["max_epochs"])
    print(f"time budget {args.time_budget:.0f} s, {left:.0f} s left after timing: {timing['step_s'] * 1e3:.1f} ms "
          f"per step, {timing['steps_per_epoch']} steps per epoch ({timing['epoch_s']:.1f} s), checkpoint "
          f"{timing['checkpoint_s']:.1f} s, build {timing['build_s']:.1f} s, evaluation ~{timing['eval_s']:.1f} s "
          f"-> {epochs} epochs per run (at most {chosen['max_epochs']})", flush=True)
    atomic_write(saved, json.dumps({"settings": key, "epochs": epochs, "timing": timing}, indent=2) + "\n")
    return epochs, timing


# ------------------------------------------------------------------ running
def run(args: argparse.Namespace) -> int:
    from ensemblekit.evaluation.reports import Report
    from ensemblekit.training.trainer import write_plot

    start = time.perf_counter()
    if args.data is None:
        args.data = default_dataset()
    out = args.out or Path("ensemblekit-runs") / f"hne-table1-{args.data}"
    seeds = seed_range(args.seed, args.seeds)
    chosen = settings(args)
    out.mkdir(parents=True, exist_ok=True)
    epochs, timing = chosen["epochs"], None
    if args.time_budget is not None and args.epochs is None:
        epochs, timing = _budget_epochs(args, out, chosen, len(seeds), start)
    runs = {seed: configs(args, seed, epochs) for seed in seeds}
    store = RunStore(out)
    check_settings(store, ((seed, label, comparable(config)) for seed in seeds
                           for label, config in runs[seed].items()))
    first = runs[seeds[0]]["L_I"]
    print(f"settings: {args.data}{' --full' if args.full else ''}{' --smoke' if args.smoke else ''}: "
          f"{chosen['backbone']}({chosen['backbone_options']}) tree of {2 ** chosen['depth']} members at "
          f"{chosen['image_size']}x{chosen['image_size']}, {epochs} epochs on the {chosen['train_split']} split "
          f"{'with' if chosen['augment'] else 'without'} augmentation, "
          f"batch {chosen['batch_size']}, SGD lr {chosen['lr']} cosine, execution {args.execution}, "
          f"seeds {seeds}, device {device_name(args.device)}", flush=True)

    accuracy: dict[int, dict[str, dict[int, float]]] = {}
    reports: dict[str, Report] = {}
    info: dict[str, Any] = {}
    for seed in seeds:
        for label, config in runs[seed].items():
            saved = get_or_train(store, seed, label, comparable(config), partial(train_run, config))
            report = Report.from_dict(saved["report"])
            info.setdefault("seconds", {}).setdefault(label, []).append(saved.get("seconds"))
            if seed == seeds[0]:
                info.setdefault("history", {})[label] = saved.get("history")
                reports[label] = report
            accuracy.setdefault(seed, {})[label] = {k + 1: 100 * a for k, a in enumerate(report.prefix_accuracy)}
            _write_results(out, args, chosen, first, epochs, seeds, accuracy, info, timing, start)
    mean, std = summarise(accuracy)
    print(table(mean, args.data, std if len(seeds) > 1 else None, seeds=len(seeds)))
    print("\nthe paper's claims, judged on this table (margins in accuracy points, paired by seed):")
    print("\n".join(claim.line() for claim in claims(accuracy)))
    write_plot(reports, out / "accuracy_vs_flops.png", f"HNE Table 1 ablation on {args.data} (seed {seeds[0]})")
    _write_results(out, args, chosen, first, epochs, seeds, accuracy, info, timing, start)
    print(f"\noutputs in {out.resolve()}: {', '.join(RESULTS)}, accuracy_vs_flops.png, one folder per seed and loss")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def claims(accuracy: dict[int, dict[str, dict[int, float]]]) -> list[Any]:
    """Table 1's claims on the runs finished so far, paired by seed: L_I+L_HD >= L_I with 1 and with 2
    members (distillation helps the small ensembles most), and L_S the worst objective with 1 member."""
    def values(label: str, k: int) -> list[float]:
        return [by_label[label][k] for by_label in accuracy.values()
                if all(lab in by_label for lab in LOSSES)]

    if not any(all(lab in by_label for lab in LOSSES) for by_label in accuracy.values()):
        return []
    first = [Comparison(f"L_I+L_HD@{k}", f"L_I@{k}", values("L_I+L_HD", k), values("L_I", k)) for k in (1, 2)]
    worst = [Comparison(f"{other}@1", "L_S@1", values(other, 1), values("L_S", 1))
             for other in LOSSES if other != "L_S"]
    return [Claim("hierarchical distillation improves the first members: L_I+L_HD >= L_I at 1 and 2 members",
                  "HNE Table 1", tuple(first)),
            Claim("L_S is the worst objective for the first member", "HNE Table 1", tuple(worst))]


def summarise(accuracy: dict[int, dict[str, dict[int, float]]]) -> tuple[dict, dict]:
    """Mean and standard deviation (n - 1; 0 for one seed) over seeds, per loss and number of members.

    Examples:
        >>> mean, std = summarise({0: {"L_I": {1: 90.0}}, 1: {"L_I": {1: 92.0}}})
        >>> mean["L_I"][1], round(std["L_I"][1], 3)
        (91.0, 1.414)
    """
    mean: dict[str, dict[int, float]] = {}
    std: dict[str, dict[int, float]] = {}
    for label in LOSSES:
        runs = [by_label[label] for by_label in accuracy.values() if label in by_label]
        if not runs:
            continue
        mean[label] = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        std[label] = {k: statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0 for k in runs[0]}
    return mean, std


def _write_results(out: Path, args: argparse.Namespace, chosen: dict, first: Any, epochs: int, seeds: list[int],
                   accuracy: dict, info: dict, timing: dict | None, start: float) -> None:
    import torch

    from ensemblekit.training.checkpoint import atomic_write

    mean, std = summarise(accuracy)
    done = sum(len(by_label) for by_label in accuracy.values())
    record = {
        "data": args.data, "full": args.full, "smoke": args.smoke,
        "backbone": first.model.backbone, "backbone_options": first.model.backbone_options,
        "depth": first.model.recipe_options["depth"], "image_size": chosen["image_size"], "epochs": epochs,
        "batch_size": chosen["batch_size"], "lr": chosen["lr"], "train_split": chosen["train_split"],
        "augment": chosen["augment"],
        "execution": args.execution, "seeds": seeds, "device": device_name(args.device),
        "torch": torch.__version__, "runs_finished": done, "runs_total": len(seeds) * len(LOSSES),
        "complete": done == len(seeds) * len(LOSSES), "wall_seconds": time.perf_counter() - start,
        "run_seconds": info.get("seconds", {}), "calibration": timing,
        "history": info.get("history", {}),  # per epoch of the first seed's runs: loss, accuracy, lr, seconds
        "ours": {label: {str(k): v for k, v in accs.items()} for label, accs in mean.items()},
        "std": {label: {str(k): v for k, v in accs.items()} for label, accs in std.items()},
        "per_seed": {str(s): {label: {str(k): v for k, v in accs.items()} for label, accs in by_label.items()}
                     for s, by_label in accuracy.items()},
        "paper": {model: {label: dict(zip(map(str, PAPER_COLUMNS), row)) for label, row in rows.items()}
                  for model, rows in PAPER.get(args.data, {}).items()},
        "claims": [claim.to_dict() for claim in claims(accuracy)],
    }
    atomic_write(out / "hne_table1.json", json.dumps(record, indent=2) + "\n")
    judged = claims(accuracy)
    text = markdown(mean, std, args.data, record)
    if judged:
        text += ("\nThe paper's claims, judged on this table (margins in accuracy points, paired by seed):\n\n```\n"
                 + "\n".join(claim.line() for claim in judged) + "\n```\n")
    atomic_write(out / "hne_table1.md", text)


def markdown(mean: dict[str, dict[int, float]], std: dict[str, dict[int, float]], data: str,
             record: dict[str, Any]) -> str:
    """The table as Markdown (mean ± std over seeds), with its settings, device and wall time."""
    columns = sorted({k for accs in mean.values() for k in accs} | (set(PAPER_COLUMNS) if data in PAPER else set()))
    columns = [c for c in columns if c & (c - 1) == 0]  # 1, 2, 4, ...
    seeds = len(record["seeds"])
    lines = [f"HNE Table 1 ablation on {TITLES[data]}: test accuracy (%) by number of members, "
             f"{'mean ± std over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'} "
             f"({record['runs_finished']}/{record['runs_total']} runs finished)", "",
             f"{record['backbone']} {record['backbone_options'] or ''} tree of {2 ** record['depth']} members at "
             f"{record['image_size']}x{record['image_size']}, {record['epochs']} epochs on {record['train_split']} "
             f"{'with' if record.get('augment', True) else 'without'} augmentation, "
             f"batch {record['batch_size']}, lr {record['lr']}, execution {record['execution']}; "
             f"device {record['device']}, torch {record['torch']}, wall time {record['wall_seconds']:.0f} s", "",
             "| loss | model | " + " | ".join(map(str, columns)) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for label in LOSSES:
        if label in mean:
            cells = [(f"{mean[label][c]:.1f} ± {std[label][c]:.1f}" if seeds > 1 else f"{mean[label][c]:.1f}")
                     if c in mean[label] else "-" for c in columns]
            lines.append(f"| {label} | this run | " + " | ".join(cells) + " |")
        for model, rows in PAPER.get(data, {}).items():
            values = dict(zip(PAPER_COLUMNS, rows[label]))
            lines.append(f"| {label} | paper {model} | "
                         + " | ".join(f"{values[c]:.1f}" if c in values else "-" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def table(ours: dict[str, dict[int, float]], data: str, std: dict[str, dict[int, float]] | None = None,
          seeds: int = 1) -> str:
    """The paper's layout: a row per loss, a column per number of members, paper rows below ours.

    With ``std`` (several seeds) each cell of ours is ``mean±std``.
    """
    members = max(max(accs) for accs in ours.values())
    paper = PAPER.get(data, {})
    columns = [1]
    while columns[-1] * 2 <= max(members, PAPER_COLUMNS[-1] if paper else 1):
        columns.append(columns[-1] * 2)
    width = 7 if std is None else 12
    header = f"{'loss':<9} {'model':<18}" + "".join(f"{c:>{width}}" for c in columns)
    spread = f", mean±std over {seeds} seeds" if std is not None else ""
    lines = [f"HNE Table 1 ablation, accuracy (%) by number of models evaluated ({TITLES[data]}{spread})", header,
             "-" * len(header)]
    for label in LOSSES:
        if label not in ours:
            continue
        row = ours[label]
        if std is None:
            cells = [f"{row[c]:>7.1f}" if c in row else f"{'-':>7}" for c in columns]
        else:
            cells = [f"{row[c]:.1f}±{std[label][c]:.1f}".rjust(width) if c in row else f"{'-':>{width}}"
                     for c in columns]
        lines.append(f"{label:<9} {'this run':<18}" + "".join(cells))
        for model, rows in paper.items():
            values = dict(zip(PAPER_COLUMNS, rows[label]))
            lines.append(f"{'':<9} {'paper ' + model:<18}" + "".join(
                f"{values[c]:>{width}.1f}" if c in values else f"{'-':>{width}}" for c in columns))
    if not paper:
        lines.append(f"(the paper reports CIFAR-10 and CIFAR-100 only; there are no paper numbers for {data})")
    return "\n".join(lines)
