"""``ensemblekit train CONFIG``: build, train and evaluate as a TOML or YAML file says."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "train"
HELP = "Train an ensemble described by a TOML or YAML config (model, data, train sections); resumable."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="a .toml, .yaml or .yml file (see ensemblekit.training.config)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run folder for checkpoints and reports (default: ensemblekit-runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    parser.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda, ...)")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default=None, help="override train.progress")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ensemblekit.training import distributed
    from ensemblekit.training.config import load_config
    from ensemblekit.training.trainer import run as run_training

    config = load_config(args.config)
    overrides = {k: getattr(args, k) for k in ("epochs", "device", "progress") if getattr(args, k) is not None}
    if overrides:
        config.train = replace(config.train, **overrides)
    out = args.out or Path("ensemblekit-runs") / args.config.stem
    try:
        result = run_training(config, out, resume=args.resume)
    except FileExistsError as err:
        print(f"ensemblekit train: error: {err}", file=sys.stderr)
        return 2
    if not distributed.detect().is_main:  # under torchrun, rank 0 reports
        return 0
    print(f"checkpoint: {result.train.checkpoint}")
    for key in ("report_json", "report_txt", "plot"):
        print(f"{key.replace('_', ' ')}: {result.files[key]}")
    return 0
