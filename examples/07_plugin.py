"""07: write a plugin: a geometric-mean aggregator, used by name in ``wrap()``.

Shows the plugin API. A plugin is any object (usually a module) with functions
marked ``@ensemblekit.hookimpl`` and named like the hooks
(``register_aggregators``, ``register_losses``, ``register_halting_policies``,
``register_topologies``, ``register_backbone_splitters``); each receives
``register(name, factory)``. An installed package declares its plugin as an
entry point of the ``ensemblekit`` group (see docs/plugins.md); here the plugin
is an inline object registered at run time with
``ensemblekit.plugins.manager.register_plugin``. After that the name works wherever a
built-in does: ``ek.wrap(model, aggregator="geomean")``, or with options
``aggregator={"name": "geomean", "temperature": 2.0}``, config files, the CLI.

The aggregator: the normalised geometric mean of the members' softmax
probabilities at a temperature, written in the incremental form
(``update``/``value``) that anytime inference and halting use.
``ensemblekit.testing.check_component`` checks it obeys the Aggregator contract.
A small tree is then trained and evaluated with it, next to the built-in
``mean_probs`` (arithmetic mean of probabilities). At temperature 1 the
geometric mean of softmaxes predicts exactly what the mean of logits (the
built-in ``mean``) predicts: the script checks that too.

Run:
    python examples/07_plugin.py            # depth 3, 3 epochs
    python examples/07_plugin.py --smoke    # depth 2, 15 steps: seconds
"""

from __future__ import annotations

import argparse

import torch

import ensemblekit
import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.components.aggregators import MeanLogits, MeanProbs
from ensemblekit.core.interfaces import Aggregator, AggregatorState
from ensemblekit.evaluation.reports import anytime_report, collect_members
from ensemblekit.plugins.manager import register_plugin
from ensemblekit.testing import check_component
from ensemblekit.training.data import load_dataset, make_loader


class GeometricMean(Aggregator):
    """Normalised geometric mean of the members' probabilities at ``temperature``.

    The prediction is the mean of the members' log-probabilities, so its
    softmax is ``prod_n p_n^(1/k)`` renormalised: a class any member finds
    very unlikely stays unlikely (unlike the arithmetic mean of probabilities).

    Args:
        temperature: members' logits are divided by it before the softmax.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def update(self, state: AggregatorState | None, logits: torch.Tensor, index: int) -> AggregatorState:
        log_p = (logits / self.temperature).log_softmax(dim=-1)
        if state is None:  # every tensor of the state is batch-first (halting drops samples from it)
            return {"sum": log_p, "count": logits.new_ones(())}
        return {"sum": state["sum"] + log_p, "count": state["count"] + 1}

    def value(self, state: AggregatorState) -> torch.Tensor:
        return state["sum"] / state["count"]


class GeometricMeanPlugin:
    """The plugin: one hook implementation, registering one aggregator under one name."""

    @ensemblekit.hookimpl
    def register_aggregators(self, register):
        register("geomean", GeometricMean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=3, help="tree depth: 2^depth members (default: 3)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0, help="option of the geomean aggregator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="depth 2, a narrower backbone, 15 steps")
    args = parser.parse_args()
    width = {"stem_width": 16, "channels": [16, 32, 64, 128]}
    max_steps = None
    if args.smoke:
        args.depth, args.epochs, max_steps = 2, 1, 15
        width = {"stem_width": 8, "channels": [8, 16, 32, 64]}

    info = register_plugin(GeometricMeanPlugin(), "geomean-example")
    print(f"registered plugin {info.name!r}: {info.components}")
    check_component("aggregator", "geomean")  # raises ConformanceError if the contract is broken
    print("geomean passes the aggregator conformance checks")

    torch.manual_seed(args.seed)
    train_set, data = load_dataset("digits", "train", image_size=16)
    test_set, _ = load_dataset("digits", "test", image_size=16)
    backbone = create_backbone("resnet10t", num_classes=data.num_classes, **width)
    ens = ek.wrap(backbone, "tree", depth=args.depth, loss="independent",
                  aggregator={"name": "geomean", "temperature": args.temperature},
                  example_input=torch.zeros(1, *data.input_shape))
    print(f"ek.wrap(..., aggregator={{'name': 'geomean', ...}}): {ens.aggregator!r}, {ens.num_members} members")

    opt = torch.optim.SGD(ens.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(train_set, 64, shuffle=True, seed=args.seed, drop_last=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_steps or args.epochs * len(loader))
    step = 0
    for _ in range(args.epochs):
        ens.train()
        for x, y in loader:
            result = ens.loss(ens.forward_output(x), y)
            opt.zero_grad()
            result.total.backward()
            opt.step()
            sched.step()
            step += 1
            if step == max_steps:
                break
    print(f"trained {step} steps (independent loss: the aggregator only combines members)")

    ens.eval()
    members, labels = collect_members(ens.forward_members, make_loader(test_set, 256, shuffle=False))
    costs = ens.cost_table(input_size=data.input_shape)
    geo = anytime_report(members, labels, ens.aggregator, costs=costs)
    arithmetic = anytime_report(members, labels, MeanProbs(), costs=costs)
    print(f"\nsame members, two aggregators (digits test, {len(labels)} images):")
    print(f"{'k':>3} {'MFLOPs':>8} {'geomean acc %':>13} {'NLL':>7} {'mean_probs acc %':>16} {'NLL':>7}")
    for k in range(ens.num_members):
        print(f"{k + 1:>3} {costs[k].flops / 1e6:8.3f} {100 * geo.prefix_accuracy[k]:13.2f} {geo.prefix_nll[k]:7.3f} "
              f"{100 * arithmetic.prefix_accuracy[k]:16.2f} {arithmetic.prefix_nll[k]:7.3f}")
    if args.temperature == 1.0:  # softmax(mean_n log_softmax(z_n)) == softmax(mean_n z_n)
        same = GeometricMean().prefixes(members).softmax(-1) - MeanLogits().prefixes(members).softmax(-1)
        assert same.abs().max() < 1e-4
        print("(at temperature 1 geomean predicts exactly what the built-in mean of logits does)")

    # Anytime inference uses the plugin's incremental form.
    x = torch.stack([test_set[i][0] for i in range(4)])
    steps = list(ens.anytime(x))
    assert torch.allclose(steps[-1].prediction, ens(x), atol=1e-5)
    print(f"\nens.anytime(x) with geomean: {len(steps)} steps, the last equals ens(x)")


if __name__ == "__main__":
    main()
