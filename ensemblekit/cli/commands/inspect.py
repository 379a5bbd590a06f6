"""``ensemblekit inspect MODEL``: the block split, node tree, members and prefix costs (``--json``: as JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree as RichTree

from ensemblekit.cli.options import add_deprecated_alias

__all__ = ["HELP", "NAME", "TOPOLOGY_OPTIONS", "add_arguments", "describe", "run", "show"]

NAME = "inspect"
HELP = "Show how a timm model is split and wired into an ensemble, with the cost of every prefix."

TOPOLOGY_OPTIONS = {
    "depth": int, "branching": int, "members": int, "branches": int, "fork": int, "num_blocks": int,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a timm model name, e.g. resnet18")
    parser.add_argument("--topology", default="tree", help="tree, independent, multi_branch, chain, cascade, ...")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="SIZE",
                        help="S or H W: the image size FLOPs are counted at, also used to split the model "
                             "(default: the backbone's own input size, timm's pretrained_cfg)")
    for old in ("--img-size", "--input-size"):
        add_deprecated_alias(parser, old, "--image-size", type=int, nargs="+")
    parser.add_argument("--exits", type=int, nargs="+", default=None, help="chain: blocks followed by an exit")
    for name, kind in TOPOLOGY_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of the tables: the split, nodes, members, parameters "
                             "and the cost of every prefix")


def run(args: argparse.Namespace) -> int:
    import torch

    import ensemblekit as ek
    from ensemblekit.backbones import create_backbone
    from ensemblekit.core.cost import CostError

    options = {k: getattr(args, k) for k in TOPOLOGY_OPTIONS if getattr(args, k) is not None}
    if args.exits is not None:
        options["exits"] = args.exits
    size = args.image_size
    if size is not None and (len(size) not in (1, 2) or min(size) < 1):
        raise CostError(f"--image-size takes S or H W (positive), got {' '.join(map(str, size))}")
    size = None if size is None else (size[0], size[-1])
    model = create_backbone(args.model, num_classes=args.num_classes)
    example = None
    if size is not None:
        example = torch.zeros(1, model.pretrained_cfg.get("input_size", (3,))[0], *size)
    ens = ek.wrap(model, args.topology, example_input=example, **options)
    if args.json:
        print(json.dumps(describe(ens, args.model, input_size=size), indent=2))
    else:
        show(ens, args.model, Console(), input_size=size)
    return 0


def describe(ens, model_name: str, input_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """What [`show()`][ensemblekit.cli.commands.inspect.show] prints, as JSON-able data (``inspect --json``).

    Keys: ``model``, ``topology``, ``input_size`` (``[C, H, W]`` the FLOPs are counted at), ``flops_note``,
    ``params`` (the ensemble's parameters), ``split`` (one entry per block: name, copies, FLOPs and parameters per
    copy), ``nodes`` (index, block, parent, FLOPs, parameters, members exiting there), ``members`` (index, path of
    nodes, exit node, head FLOPs and parameters) and ``prefixes`` (the first k members: FLOPs, MACs, parameters,
    new nodes, FLOPs relative to one member).
    """
    from ensemblekit.core.flops import FLOPS_NOTE

    costs = ens.costs(input_size)
    exits: dict[int, list[int]] = {}
    for member in ens.graph.members:
        exits.setdefault(member.exit_node, []).append(member.index)
    table = costs.prefix_table()
    return {
        "model": model_name,
        "topology": repr(ens.topology),
        "input_size": [costs.in_chans, *costs.input_size],
        "flops_note": FLOPS_NOTE,
        "params": sum(p.numel() for p in ens.parameters()),
        "num_blocks": len(ens.graph.levels),
        "num_nodes": ens.graph.num_nodes,
        "num_members": ens.num_members,
        "split": [{"block": b, "name": ens.block_names[b] if b < len(ens.block_names) else f"block{b}",
                   "copies": len(level), "flops_per_copy": costs.node_flops[level[0]],
                   "params_per_copy": costs.node_params[level[0]]} for b, level in enumerate(ens.graph.levels)],
        "nodes": [{"index": n.index, "block": n.block, "parent": n.parent, "flops": costs.node_flops[n.index],
                   "params": costs.node_params[n.index], "exit_of": exits.get(n.index, [])}
                  for n in ens.graph.nodes],
        "members": [{"index": m.index, "path": list(m.path), "exit_node": m.exit_node,
                     "head_flops": costs.head_flops[m.index], "head_params": costs.head_params[m.index]}
                    for m in ens.graph.members],
        "prefixes": [{"members": row.members, "flops": row.flops, "macs": row.macs, "params": row.params,
                      "new_nodes": len(ens.graph.new_nodes(row.members - 1)),
                      "flops_vs_one_member": row.flops / table[0].flops} for row in table],
    }


def show(ens, model_name: str, console: Console, input_size: tuple[int, int] | None = None) -> None:
    """Print the split, the node tree, the members and the cost of every prefix, per image of ``input_size``.

    ``input_size`` defaults to the backbone's own (see [`cost_table()`][ensemblekit.core.ensemble.Ensemble.cost_table]).
    """
    from ensemblekit.core.flops import FLOPS_NOTE
    from ensemblekit.evaluation.formatting import format_si

    costs = ens.costs(input_size)
    h, w = costs.input_size
    console.print(f"[bold]{model_name}[/] as {ens.topology!r}: {len(ens.graph.levels)} blocks, "
                  f"{ens.graph.num_nodes} nodes, {ens.num_members} members (FLOPs per {h}x{w} image; {FLOPS_NOTE})")

    blocks = Table("block", "name", "copies", "FLOPs per copy", "params per copy", title="Block split")
    for b, level in enumerate(ens.graph.levels):
        first = level[0]
        name = ens.block_names[b] if b < len(ens.block_names) else f"block{b}"
        blocks.add_row(str(b), name, str(len(level)), format_si(costs.node_flops[first]),
                       format_si(costs.node_params[first]))
    console.print(blocks)

    if ens.graph.num_nodes <= 64:
        console.print(_node_tree(ens))

    prefixes = Table("members", "FLOPs", "MACs", "params", "new nodes", "FLOPs vs 1 member",
                     title="Cost of the first k members")
    table = costs.prefix_table()
    for row in table:
        new = len(ens.graph.new_nodes(row.members - 1))
        prefixes.add_row(str(row.members), format_si(row.flops), format_si(row.macs), format_si(row.params), str(new),
                         f"{row.flops / table[0].flops:.2f}x")
    console.print(prefixes)


def _node_tree(ens) -> RichTree:
    root = RichTree("input")
    branches = {None: root}
    exits = {}
    for member in ens.graph.members:
        exits.setdefault(member.exit_node, []).append(member.index)
    for node in ens.graph.nodes:
        label = f"node {node.index} (block {node.block})"
        if node.index in exits:
            label += " -> member " + ", ".join(map(str, exits[node.index]))
        branches[node.index] = branches[node.parent].add(label)
    return root
