"""09: train a wrapped ensemble inside a Lightning ``LightningModule``.

ensemblekit stays out of the training loop, so any trainer can run it: here
Lightning's. ``ek.wrap(timm.create_model(...), topology="tree", depth=2)`` is
an ordinary ``nn.Module``; the ``LightningModule``'s ``training_step`` holds
the two lines of "Training in your own loop" (README): ``out =
ens.forward_output(x)`` and ``ens.loss(out, y)``, whose ``.total`` it returns
and whose ``.parts`` it logs. Lightning brings its own mixed precision
(``precision="bf16-mixed"``), gradient accumulation
(``accumulate_grad_batches``), loggers and checkpoints. Afterwards the
anytime table gives the test accuracy of the first k members for every k.

Lightning is not a dependency of ensemblekit: ``pip install lightning`` (or
``pytorch-lightning``). Without it this example says so and exits with 2.
``ensemblekit train`` has the same options in its config (``train.precision``,
``train.accumulate``, ``train.ema_decay``, ``train.logger``).

Run:
    python examples/09_lightning.py            # resnet10t, 3 epochs on the bundled digits: minutes on a CPU
    python examples/09_lightning.py --smoke    # timm's tiny test_resnet, 4 optimizer steps: seconds
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile

import timm
import torch

import ensemblekit as ek
from ensemblekit.evaluation.reports import anytime_report, collect_members
from ensemblekit.training.data import load_dataset, make_loader


def import_lightning():
    """The ``lightning`` package, else ``pytorch_lightning`` (the same API), else None."""
    for name in ("lightning", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet10t", help="a timm model name (default: resnet10t)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=2, help="Lightning's accumulate_grad_batches")
    parser.add_argument("--precision", default="bf16-mixed", help="Lightning's precision (32-true, bf16-mixed, ...)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="timm's tiny test_resnet, 4 optimizer steps: seconds")
    args = parser.parse_args()

    L = import_lightning()
    if L is None:
        print("this example needs Lightning, which ensemblekit does not install: pip install lightning",
              file=sys.stderr)
        return 2

    max_steps = -1
    if args.smoke:
        args.backbone, args.epochs, max_steps = "test_resnet", 1, 4

    L.seed_everything(args.seed, verbose=False)
    train_set, info = load_dataset("digits", "train", image_size=16)  # 8x8 digits upsampled: every pixel kept
    test_set, _ = load_dataset("digits", "test", image_size=16)
    # A timm model as timm makes it (its default width: wrap draws the members with timm's own initialisation).
    ens = ek.wrap(timm.create_model(args.backbone, num_classes=info.num_classes), topology="tree", depth=2,
                  loss="hierarchical_distillation", example_input=torch.zeros(1, *info.input_shape))
    print(f"{args.backbone} as a tree of depth 2: {ens.num_members} members, loss "
          f"{type(ens.loss_strategy).__name__}, Lightning {L.__version__}")

    class EnsembleModule(L.LightningModule):
        """The ensemble, its loss and its optimizer, as Lightning wants them."""

        def __init__(self, ensemble: torch.nn.Module, lr: float, steps: int):
            super().__init__()
            self.ensemble, self.lr, self.steps = ensemble, lr, steps

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.ensemble.forward_output(x)   # ensemblekit: members [B, M, C] + what the loss needs
            result = self.ensemble.loss(out, y)     # ensemblekit: total and named parts
            self.log("train/loss", result.total, prog_bar=True)
            for name, value in result.parts.items():
                self.log(f"train/{name}", value)
            self.log("train/accuracy", (out.ensemble().argmax(-1) == y).float().mean())
            return result.total

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    loader = make_loader(train_set, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    steps = args.epochs * (len(loader) // args.accumulate) if max_steps < 0 else max_steps  # optimizer steps
    with tempfile.TemporaryDirectory() as root:  # nothing of Lightning's is left behind
        trainer = L.Trainer(max_epochs=args.epochs, max_steps=max_steps, accelerator="cpu", devices=1,
                            precision=args.precision, accumulate_grad_batches=args.accumulate,
                            default_root_dir=root, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=not args.smoke, log_every_n_steps=1)
        trainer.fit(EnsembleModule(ens, args.lr, steps), loader)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
    print(f"trained {trainer.global_step} optimizer steps ({args.accumulate} batches of {args.batch_size} each, "
          f"precision {args.precision}); last logged: {metrics}")

    # Anytime evaluation of the trained ensemble, in float32: member logits once, then every prefix of members.
    ens.eval()
    members, labels = collect_members(ens.forward_members, make_loader(test_set, 256, shuffle=False))
    report = anytime_report(members, labels, ens.aggregator, costs=ens.cost_table(input_size=info.input_shape))
    print(report.table(f"{args.backbone} tree trained with Lightning on digits (test): {report.num_samples} samples"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
