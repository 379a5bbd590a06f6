"""03: EnsembleNet: a shared trunk, narrower branches, trained with co-distillation.

Shows ``ek.recipes.ensemblenet`` (Lee et al.): the blocks before ``fork`` are
shared, each of the ``branches`` members gets its own copy of the later blocks
narrowed to 1/1.5 of the width (with two branches the whole ensemble has about
as many parameters as the backbone). The same loop as example 02 trains it with
EnsembleNet's co-distillation loss (members distilled from the ensemble, the
ensemble from the labels; ``--loss ensemblenet_ensembling`` for Eq. 2 instead),
then prints the anytime table.

Run:
    python examples/03_ensemblenet.py            # resnet10t, 3 branches, 5 epochs
    python examples/03_ensemblenet.py --smoke    # 2 branches, a few steps: seconds
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import ensemblekit as ek
from ensemblekit.evaluation.reports import anytime_report, collect_members
from ensemblekit.training.data import load_dataset, make_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--branches", type=int, default=3, help="members (default: 3)")
    parser.add_argument("--fork", type=int, default=-2,
                        help="first branched block, negative from the end (default: -2, the upper half)")
    parser.add_argument("--loss", default="ensemblenet_codistillation",
                        choices=("ensemblenet_codistillation", "ensemblenet_ensembling"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="2 branches, 15 steps: seconds")
    args = parser.parse_args()
    max_steps = None
    if args.smoke:
        args.branches, args.epochs, max_steps = 2, 1, 15

    torch.manual_seed(args.seed)
    train_set, info = load_dataset("digits", "train", image_size=16)
    test_set, _ = load_dataset("digits", "test", image_size=16)
    # The branches are the same architecture at a smaller width, made by timm from
    # the model's name: so the backbone must have its default width.
    backbone = timm.create_model("resnet10t", pretrained=False, num_classes=info.num_classes)

    ens = ek.recipes.ensemblenet(backbone, branches=args.branches, fork=args.fork, loss=args.loss,
                                 example_input=torch.zeros(1, *info.input_shape))
    trunk = [ens.block_names[b] for b, level in enumerate(ens.graph.levels) if len(level) == 1]
    params = sum(p.numel() for p in ens.parameters())
    base = sum(p.numel() for p in backbone.parameters())
    print(f"EnsembleNet: {ens.num_members} branches, shared trunk {'+'.join(trunk)}, "
          f"{params:,} parameters ({params / base:.2f}x the backbone's {base:,}), "
          f"loss {type(ens.loss_strategy).__name__}")

    opt = torch.optim.SGD(ens.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    steps = args.epochs * len(loader) if max_steps is None else max_steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        ens.train()
        for x, y in loader:
            result = ens.loss(ens.forward_output(x), y)
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

    ens.eval()
    members, labels = collect_members(ens.forward_members, make_loader(test_set, 256, shuffle=False))
    report = anytime_report(members, labels, ens.aggregator, costs=ens.cost_table(input_size=info.input_shape))
    print(report.table(f"EnsembleNet on digits (test): {report.num_samples} samples, {report.num_members} branches"))


if __name__ == "__main__":
    main()
