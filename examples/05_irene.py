"""05: IRENE: a sequential ensemble that learns, per sample, when to stop.

Shows ``ek.recipes.irene`` (Li et al., AAAI 2023): ``members`` networks evaluated
one after the other (a ``cascade``), averaged in probability, with a small
recurrent selector that reads each member's output and predicts the halting
probability ``h_t``. The trainer (``ensemblekit.training.trainer.train``) trains it
with the paper's sequential schedule, which IRENE's loss asks for (Algorithm 1: one
stage per member, member t with the earlier ones frozen, the selector alongside).
``ens.predict(x)`` then halts per sample where ``h_t >= threshold``, dropping halted
samples from the batch.

Printed: accuracy and average members used by IRENE at a few thresholds (0.5 and
the quartiles of ``h_t`` on the val split), next to
"every sample uses the first k members" and the WoC confidence cascade
(threshold fit on the val split), with IRENE's utility metric.

Run:
    python examples/05_irene.py            # 3 members, 4 epochs per member
    python examples/05_irene.py --smoke    # 640 training images, 1 epoch per member: seconds
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Subset

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.evaluation.reports import collect_members
from ensemblekit.methods.irene.woc import WoC, utility
from ensemblekit.training.config import TrainConfig
from ensemblekit.training.data import load_dataset, make_loader
from ensemblekit.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3, help="T, networks in the cascade (IRENE: 3)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per member (sequential schedule)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--cost-weight", type=float, default=0.01, help="omega_2: price of each extra member")
    parser.add_argument("--thresholds", type=float, nargs="+", default=None,
                        help="halt where h_t >= threshold (default: 0.5, as trained, and the quartiles "
                             "of h_t on the val split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="640 training images, 1 epoch per member")
    args = parser.parse_args()
    width = {"stem_width": 16, "channels": [16, 32, 64, 128]}

    torch.manual_seed(args.seed)
    train_set, info = load_dataset("digits", "train", image_size=16)
    val_set, _ = load_dataset("digits", "val", image_size=16)
    test_set, _ = load_dataset("digits", "test", image_size=16)
    if args.smoke:
        args.epochs = 1
        train_set = Subset(train_set, range(640))
        width = {"stem_width": 8, "channels": [8, 16, 32, 64]}
    backbone = create_backbone("resnet10t", num_classes=info.num_classes, **width)

    ens = ek.recipes.irene(backbone, members=args.members, cost_weight=args.cost_weight,
                           example_input=torch.zeros(1, *info.input_shape))
    print(f"IRENE: {ens.num_members} members ({ens.topology!r}), halting {type(ens.halting).__name__}, "
          f"loss {type(ens.loss_strategy).__name__}")

    def log(record: dict) -> None:
        print(f"Algorithm 1 {record['stage']} epoch {record['stage_epoch']}: loss {record['loss']:.3f}")

    # Algorithm 1: the "sequential" schedule, epochs per member, IRENE's optimisers (SGD + Adam, lr / 5 at 30/60/80%)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device="cpu",
                         progress="none")
    train(ens, train_set, config, on_epoch=log)
    ens.eval()

    # Baselines from the members' logits: the first k members for everyone, and WoC.
    test_loader = make_loader(test_set, 256, shuffle=False)
    members, labels = collect_members(ens.forward_members, test_loader)
    val_members, val_labels = collect_members(ens.forward_members, make_loader(val_set, 256, shuffle=False))
    prefixes = ens.aggregator.prefixes(members)

    def accuracy(prediction: torch.Tensor) -> float:
        return 100 * (prediction.argmax(-1) == labels).double().mean().item()

    single, full = accuracy(prefixes[:, 0]), accuracy(prefixes[:, -1])
    rows = [(f"first {k + 1} member{'s' * (k > 0)}", accuracy(prefixes[:, k]), float(k + 1))
            for k in range(ens.num_members)]
    woc = WoC.fit(val_members, val_labels, ens.aggregator)
    woc_prediction, woc_used = woc.predict(members, ens.aggregator)
    rows.append((f"WoC (threshold {woc.threshold:.2f})", accuracy(woc_prediction), woc_used.double().mean().item()))

    # The selector's h_t on val (forward_output carries them as extras); a short training
    # leaves them in a narrow band, so thresholds at their quartiles show the trade-off.
    with torch.no_grad():
        x_val = torch.stack([img for img, _ in val_set])
        h = torch.sigmoid(ens.forward_output(x_val).extras["halting_logits"][:, :-1])
    quartiles = h.flatten().quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()
    print(f"h_t on val (members 1..{ens.num_members - 1}): {h.min():.3f} .. {h.max():.3f}, "
          f"quartiles {', '.join(f'{q:.3f}' for q in quartiles)}")
    thresholds = args.thresholds or [0.5, *quartiles]

    # IRENE: per-sample halting by the learned selector, through predict().
    for threshold in thresholds:
        ens.halting.threshold = threshold
        correct, used = [], []
        with torch.no_grad():
            for x, y in test_loader:
                result = ens.predict(x)
                correct.append(result.prediction.argmax(-1) == y)
                used.append(result.members_used)
        rows.append((f"IRENE (h_t >= {threshold:.4f})", 100 * torch.cat(correct).double().mean().item(),
                     torch.cat(used).double().mean().item()))

    print(f"\ndigits test set, {len(labels)} images:")
    print(f"{'method':<26} {'top-1 %':>8} {'members':>8} {'utility':>8}")
    for name, top1, cost in rows:
        value = f"{utility(top1, cost, single, full, ens.num_members):8.2f}" if full > single else "       -"
        print(f"{name:<26} {top1:8.2f} {cost:8.2f} {value}")
    if not full > single:
        print("(utility is undefined while the full ensemble is no more accurate than its first member)")


if __name__ == "__main__":
    main()
