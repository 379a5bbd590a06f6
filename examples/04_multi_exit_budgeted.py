"""04: a multi-exit network (IMTA: GE, ISC, OFA) and budgeted inference.

Shows ``ek.recipes.multi_exit``: one backbone, an exit head after each block (a
``chain`` topology), trained in IMTA's two phases, the trainer's ``"two_phase"``
schedule: phase I the whole network with Gradient Equilibrium (GE); phase II only
the exits (blocks frozen, ``start_phase2``), with Inline Subnetwork Collaboration
(ISC: each exit also reads the previous exit's logits) and One-for-all knowledge
distillation from the last exit (OFA).

Then budgeted batch classification (MSDNet): ``ek.halting.Budgeted`` picks
per-exit confidence thresholds on the *val* split for a budget parameter ``q``
(or a target average FLOPs), and ``net.predict(x, halting=policy)`` runs the test
set with real batch compaction: samples that exit leave the batch, so later
blocks run only on the rest. Printed: accuracy against average FLOPs per image,
next to the fixed "first k exits for everyone" curve.

Run:
    python examples/04_multi_exit_budgeted.py            # 6 + 3 epochs
    python examples/04_multi_exit_budgeted.py --smoke    # 15 steps per phase: seconds
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import Subset

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.training.config import TrainConfig
from ensemblekit.training.data import load_dataset, make_loader
from ensemblekit.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="phase I epochs (whole network, GE)")
    parser.add_argument("--phase2-epochs", type=int, default=3, help="phase II epochs (exits only, ISC + OFA)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--qs", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0, 4.0],
                        help="budget parameters: exit k takes a share ~ q^k of the samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a narrower backbone, 15 + 15 steps: seconds")
    args = parser.parse_args()
    width = {"stem_width": 16, "channels": [16, 32, 64, 128]}

    torch.manual_seed(args.seed)
    train_set, info = load_dataset("digits", "train", image_size=16)
    val_set, _ = load_dataset("digits", "val", image_size=16)    # for calibration: never the test set
    test_set, _ = load_dataset("digits", "test", image_size=16)
    if args.smoke:
        args.epochs, args.phase2_epochs = 1, 1
        train_set = Subset(train_set, range(15 * args.batch_size))
        width = {"stem_width": 8, "channels": [8, 16, 32, 64]}
    backbone = create_backbone("resnet10t", num_classes=info.num_classes, **width)

    # An exit after each of the backbone's stages; GE on the whole network in phase I.
    net = ek.recipes.multi_exit(backbone, gradient_equilibrium=True, example_input=torch.zeros(1, *info.input_shape))
    print(f"multi-exit {net.block_names}: {net.num_members} exits, "
          f"MFLOPs to each exit {[round(r.flops / 1e6, 3) for r in net.cost_table(input_size=info.input_shape)]}")

    # Both phases in one call: the "two_phase" schedule's phase II freezes the backbone, adds ISC, switches OFA on.
    # SGD with Nesterov momentum and a cosine schedule in each phase.
    schedule = {"name": "two_phase", "phase2_epochs": args.phase2_epochs, "isc": "concat", "ofa": True}
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, nesterov=True,
                         weight_decay=1e-4, seed=args.seed, device="cpu", progress="none", stages=schedule)
    train(net, train_set, config, on_epoch=lambda r: print(f"{r['stage']} epoch {r['stage_epoch']}: "
                                                             f"loss {r['loss']:.3f}"))

    net.eval()
    x_test = torch.stack([x for x, _ in test_set])
    y_test = torch.tensor([y for _, y in test_set])
    cum_flops = [r.flops for r in net.cost_table(input_size=info.input_shape)]
    with torch.no_grad():
        exits = net.forward_members(x_test)          # [N, exits, C]
    print("\nevery sample takes the first k exits (the last one's answer):")
    for k, flops in enumerate(cum_flops):
        acc = (exits[:, k].argmax(-1) == y_test).double().mean()
        print(f"  exit {k + 1}: {100 * acc:6.2f}% at {flops / 1e6:.3f} MFLOPs")

    # Budgeted: thresholds fit on val, then predict() with samples leaving the batch as they exit.
    val_loader = make_loader(val_set, 256, shuffle=False)
    print(f"\nbudgeted (calibrated on val, {len(val_set)} images; test {len(test_set)} images, one batch):")
    print(f"{'budget':>14} {'val acc %':>9} {'test acc %':>10} {'MFLOPs':>8} {'exits':>6}  share per exit")
    policies = [(f"q={q:g}", ek.halting.Budgeted(q=q)) for q in args.qs]
    policies.append((f"<= {cum_flops[-1] / 2e6:.3f}M", ek.halting.Budgeted(flops=cum_flops[-1] / 2)))
    for label, policy in policies:
        policy.calibrate(net, val_loader)
        start = time.perf_counter()
        result = net.predict(x_test, halting=policy)
        seconds = time.perf_counter() - start
        acc = (result.prediction.argmax(-1) == y_test).double().mean()
        share = torch.bincount(result.members_used - 1, minlength=net.num_members) / len(y_test)
        print(f"{label:>14} {100 * policy.held_out_accuracy:9.2f} {100 * acc:10.2f} "
              f"{result.flops.mean() / 1e6:8.3f} {result.members_used.double().mean():6.2f}  "
              f"{' '.join(f'{s:.2f}' for s in share.tolist())}  ({1000 * seconds:.0f} ms)")
    print("\nensemblekit.budget_eval.budget_sweep(net, val, test) runs a whole sweep with timings and a plot.")


if __name__ == "__main__":
    main()
