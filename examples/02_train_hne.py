"""02: train a Hierarchical Neural Ensemble (HNE) in a plain PyTorch loop.

Shows ``ek.recipes.hne``: the tree of example 01 with the paper's settings (mean
of logits, hierarchical distillation ``(1 - alpha) L_I + alpha L_HD``), trained on
the bundled digits data in your own loop. Two lines differ from training the
plain backbone: ``out = ens.forward_output(x)`` (every member's logits plus what
the loss needs) and ``ens.loss(out, y).total``. Afterwards the anytime table
(``ensemblekit.evaluation.reports.anytime_report``) gives the test accuracy, diversity,
calibration and FLOPs of the first k members for every k.

Run:
    python examples/02_train_hne.py            # 16 members (depth 4), 10 epochs: about a minute on a CPU
    python examples/02_train_hne.py --smoke    # depth 2, a few steps: seconds
"""

from __future__ import annotations

import argparse
import time

import torch

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.evaluation.reports import anytime_report, collect_members
from ensemblekit.training.data import load_dataset, make_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="tree depth: 2^depth members (default: 4, as in HNE)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of hierarchical distillation (HNE: 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="depth 2, a narrower backbone, 30 steps: seconds")
    args = parser.parse_args()

    width = {"stem_width": 16, "channels": [16, 32, 64, 128]}  # resnet10t at a quarter of its width
    max_steps = None
    if args.smoke:
        args.depth, args.epochs, max_steps = 2, 2, 30
        width = {"stem_width": 8, "channels": [8, 16, 32, 64]}

    torch.manual_seed(args.seed)
    train_set, info = load_dataset("digits", "train", image_size=16)  # 8x8 digits upsampled: every pixel kept
    test_set, _ = load_dataset("digits", "test", image_size=16)
    backbone = create_backbone("resnet10t", num_classes=info.num_classes, **width)

    # example_input: FLOPs are counted (and blocks balanced) at the real image size.
    ens = ek.recipes.hne(backbone, depth=args.depth, alpha=args.alpha,
                         example_input=torch.zeros(1, *info.input_shape))
    print(f"HNE: {ens.num_members} members, loss {type(ens.loss_strategy).__name__}")

    # The training loop is yours; only the two marked lines are ensemblekit's.
    opt = torch.optim.SGD(ens.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    steps = args.epochs * len(loader) if max_steps is None else max_steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        ens.train()
        for x, y in loader:
            out = ens.forward_output(x)       # ensemblekit: members [B, M, C] + extras
            result = ens.loss(out, y)          # ensemblekit: total and named parts
            opt.zero_grad()
            result.total.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 10 == 0 or step == steps:
                parts = "  ".join(f"{k} {float(v):.3f}" for k, v in result.parts.items())
                print(f"epoch {epoch + 1} step {step}: loss {result.total.item():.3f}  ({parts})")
            if step == steps:
                break
    print(f"trained {step} steps in {time.perf_counter() - start:.1f} s")

    # Anytime evaluation: member logits once, then every prefix of members.
    ens.eval()
    members, labels = collect_members(ens.forward_members, make_loader(test_set, 256, shuffle=False))
    report = anytime_report(members, labels, ens.aggregator, costs=ens.cost_table(input_size=info.input_shape))
    print(report.table(f"HNE on digits (test): {report.num_samples} samples, {report.num_members} members"))


if __name__ == "__main__":
    main()
