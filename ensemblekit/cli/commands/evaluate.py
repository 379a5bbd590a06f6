"""``ensemblekit evaluate CHECKPOINT``: the anytime report of a saved ensemble."""

from __future__ import annotations

import argparse
from pathlib import Path

from ensemblekit.errors import InvalidValueError

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "evaluate"
HELP = ("Evaluate a checkpoint: accuracy of every prefix of members, member accuracies, diversity, ECE, "
        "FLOPs and parameters; printed, and written as JSON and a PNG plot with --out.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run folder (its newest checkpoint)")
    parser.add_argument("--data", default=None, help="dataset (default: the one the checkpoint was trained on)")
    parser.add_argument("--root", default=None, help="data folder for cifar10, cifar100, imagefolder")
    parser.add_argument("--split", default="test", choices=("train", "val", "trainval", "test"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-items", type=int, default=None,
                        help="evaluate a stratified subset of N items (every class in proportion; the same items "
                             "as a run's report with data.max_eval_items = N)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", choices=("tqdm", "rich", "none"), default="tqdm",
                        help="progress bar of the batches evaluated, on stderr (default: tqdm)")
    parser.add_argument("--out", type=Path, default=None, help="write report.json, report.txt and the plot here")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ensemblekit.training import checkpoint
    from ensemblekit.training.config import DataConfig, section_from_dict
    from ensemblekit.training.trainer import evaluate, load_split, provenance, select_device, write_report

    directory, manifest = checkpoint.read_manifest(args.checkpoint)
    model = checkpoint.load(directory, device=select_device(args.device))
    stored = manifest.get("data")
    if stored and args.data in (None, stored.get("name")):
        stored = {k: v for k, v in stored.items() if k != "subset"}  # how the run cut its splits: a record
        data = section_from_dict(DataConfig, stored, "data", str(directory))
        data = data if args.root is None else replace(data, root=args.root)
    else:  # a model-only checkpoint, or another dataset: images of the size the model was built for
        config = getattr(model, "build_config", None)
        size = config.image_size if config is not None else (model.input_size or model.example_size)[0]
        data = DataConfig(name=args.data or "digits", root=args.root, image_size=size)
    images = None
    if data.name == "imagefolder":  # the transforms of the backbone's data config (timm's)
        from ensemblekit.backbones.transforms import data_config

        images = data_config(model)
    dataset, info = load_split(data, args.split, limit=args.max_items, data_config=images)
    if info.num_classes != model.num_classes:
        raise InvalidValueError(f"{data.name} has {info.num_classes} classes but the checkpoint {directory} "
                                f"predicts {model.num_classes}")
    report = evaluate(model, dataset, args.batch_size, args.device, progress=args.progress)
    title = (f"{checkpoint.backbone_name(manifest)} on {data.name} ({args.split}): {report.num_samples} samples, "
             f"{report.num_members} members")
    print(f"checkpoint: {directory}")
    if args.out is None:
        print(report.table(title))
        return 0
    origin = provenance(data, args.split, info.source, len(dataset), directory, select_device(args.device),
                        max_items=args.max_items)
    files = write_report(report, args.out, title, provenance=origin)
    for key, path in files.items():
        print(f"{key.replace('_', ' ')}: {path}")
    return 0
