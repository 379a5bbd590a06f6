"""06: anytime inference under a wall-clock deadline.

Shows ``ens.anytime(x, deadline=seconds)``: the prediction of the first 1, 2, ...
members of an HNE tree, each step computing only the nodes the next member adds.
Before starting member k+1 the iterator predicts its time (seconds per FLOP
measured so far times the FLOPs member k+1 adds) and stops if it would finish
after the deadline, so the last step it yields is the best prediction that was
ready in time. The same rule as a halting policy: ``ens.predict(x,
halting=ek.halting.Deadline(seconds))``; a FLOPs budget: ``anytime(x, max_flops=...)``.

The tree is trained first with the ready-made loop ``ensemblekit.training.trainer.train``
(the loop of example 02 packaged, with checkpoints, resume and DDP).

Run:
    python examples/06_anytime_deadline.py            # 8 members, 4 epochs
    python examples/06_anytime_deadline.py --smoke    # 4 members, 1 epoch: seconds
"""

from __future__ import annotations

import argparse

import torch

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.training.config import TrainConfig
from ensemblekit.training.data import load_dataset
from ensemblekit.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3, help="tree depth: 2^depth members (default: 3)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                        help="deadlines as fractions of the time all members take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="depth 2, a narrower backbone, 1 epoch")
    args = parser.parse_args()
    width = {"stem_width": 16, "channels": [16, 32, 64, 128]}

    torch.manual_seed(args.seed)
    train_set, info = load_dataset("digits", "train", image_size=16)
    test_set, _ = load_dataset("digits", "test", image_size=16)
    if args.smoke:
        args.depth, args.epochs = 2, 1
        width = {"stem_width": 8, "channels": [8, 16, 32, 64]}
    backbone = create_backbone("resnet10t", num_classes=info.num_classes, **width)
    ens = ek.recipes.hne(backbone, depth=args.depth, example_input=torch.zeros(1, *info.input_shape))
    train(ens, train_set, TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, seed=args.seed, device="cpu",
                                      progress="none"))
    ens.eval()

    x = torch.stack([img for img, _ in test_set])
    y = torch.tensor([label for _, label in test_set])

    def accuracy(prediction: torch.Tensor) -> float:
        return 100 * (prediction.argmax(-1) == y).double().mean().item()

    # No deadline: every member, with the time at which each prediction was ready.
    list(ens.anytime(x[:8]))  # warm-up (first calls allocate memory)
    steps = list(ens.anytime(x))
    print(f"anytime over {len(y)} test images, one batch ({ens.num_members} members):")
    print(f"{'members':>7} {'MFLOPs/img':>10} {'ready at s':>10} {'acc %':>6}")
    for step in steps:
        print(f"{step.members:>7} {step.flops / 1e6:10.3f} {step.seconds:10.4f} {accuracy(step.prediction):6.2f}")
    full = steps[-1].seconds

    # With a deadline: stop before a member that would finish late; keep the last prediction.
    print(f"\ndeadlines (all members took {full:.4f} s):")
    print(f"{'deadline s':>10} {'anytime: members':>16} {'ready at s':>10} {'acc %':>6}   "
          f"{'predict(Deadline): members':>26} {'acc %':>6}")
    for fraction in args.fractions:
        deadline = fraction * full
        last = None
        for step in ens.anytime(x, deadline=deadline):
            last = step  # a real caller could serve last.prediction as soon as it exists
        halted = ens.predict(x, halting=ek.halting.Deadline(deadline))
        print(f"{deadline:10.4f} {last.members:>16} {last.seconds:10.4f} {accuracy(last.prediction):6.2f}   "
              f"{halted.members_used.double().mean().item():>26.0f} {accuracy(halted.prediction):6.2f}")
    print("(the first member always runs, so a deadline shorter than it is overrun)")

    # A FLOPs budget instead of a clock: deterministic.
    budget = ens.cost_table(input_size=info.input_shape)[ens.num_members // 2 - 1].flops
    last = list(ens.anytime(x, max_flops=budget))[-1]
    print(f"\nmax_flops={budget / 1e6:.3f}M per image: {last.members} members, {accuracy(last.prediction):.2f}%")


if __name__ == "__main__":
    main()
