"""01: wrap a timm model into a tree ensemble and look inside.

Shows ``ek.wrap(model, topology="tree", depth=...)`` on a timm ResNet: how the
backbone is cut into blocks, which node (parameter copy of a block) each member
runs through, the aggregated forward pass ``ens(x)``, every member's logits
``ens.forward_members(x)`` and ``ens.cost_table()`` (FLOPs and parameters of the
first k members, shared nodes counted once). Nothing is trained.

Run:
    python examples/01_wrap_and_inspect.py            # resnet18, a tree of depth 3 (8 members)
    python examples/01_wrap_and_inspect.py --smoke    # a narrow resnet10t, depth 2, seconds on a CPU

The command line shows the same for any timm model: ``ensemblekit inspect resnet18 --depth 3``.
"""

from __future__ import annotations

import argparse

import torch

import ensemblekit as ek
from ensemblekit.backbones import create_backbone
from ensemblekit.training.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18", help="any timm model name (default: resnet18)")
    parser.add_argument("--depth", type=int, default=3, help="tree depth: 2^depth members (default: 3)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the digits images (default: 32)")
    parser.add_argument("--smoke", action="store_true", help="tiny model and images: runs in seconds")
    args = parser.parse_args()

    backbone_options = {}
    if args.smoke:  # resnet10t at an eighth of its width, 16x16 digits
        args.backbone, args.depth, args.image_size = "resnet10t", 2, 16
        backbone_options = {"stem_width": 8, "channels": [8, 16, 32, 64]}

    torch.manual_seed(0)
    test, info = load_dataset("digits", "test", image_size=args.image_size)
    model = create_backbone(args.backbone, num_classes=info.num_classes, **backbone_options)

    # One call: cut into depth + 1 blocks, block b copied 2^b times, a head per leaf.
    # example_input sets the image size the blocks are balanced and the FLOPs counted at.
    example = torch.zeros(1, *info.input_shape)
    ens = ek.wrap(model, topology="tree", depth=args.depth, example_input=example)
    print(f"{args.backbone} as a tree of depth {args.depth}: {len(ens.graph.levels)} blocks, "
          f"{ens.graph.num_nodes} nodes, {ens.num_members} members")
    for b, level in enumerate(ens.graph.levels):
        print(f"  block {b} ({ens.block_names[b]}): {len(level)} cop{'y' if len(level) == 1 else 'ies'}")
    print("members in anytime (depth-first) order, as paths of nodes:")
    for member in ens.graph.members:
        print(f"  member {member.index}: nodes {member.path}")

    # Forward: a drop-in for the backbone, and every member on its own.
    x = torch.stack([test[i][0] for i in range(8)])
    ens.eval()
    with torch.no_grad():
        logits = ens(x)                      # [B, C]: the mean of the members' logits
        members = ens.forward_members(x)     # [B, M, C]
    print(f"\nens(x): {tuple(logits.shape)}   ens.forward_members(x): {tuple(members.shape)}")
    assert torch.allclose(logits, members.mean(dim=1), atol=1e-5)  # "mean" aggregator = mean of logits

    # Cost of every prefix: member k+1 only adds the nodes it does not share.
    # FLOPs depend on the image size: count them at the size evaluated here (cost_table() alone
    # uses the backbone's own input size, 176x176 for resnet10t). A multiply-add is 2 FLOPs.
    h, w = info.input_shape[1:]
    print(f"\ncost of the first k members (FLOPs per {h}x{w} image; a multiply-add is 2 FLOPs):")
    print(f"{'k':>3} {'FLOPs':>12} {'params':>10} {'new nodes':>10} {'vs k=1':>7}")
    table = ens.cost_table(input_size=info.input_shape)
    for row in table:
        new = len(ens.graph.new_nodes(row.members - 1))
        print(f"{row.members:>3} {row.flops:>12,} {row.params:>10,} {new:>10} {row.flops / table[0].flops:>6.2f}x")
    independent = len(table) * table[0].flops
    print(f"{ens.num_members} independent networks would cost {independent:,} FLOPs "
          f"({independent / table[-1].flops:.2f}x the tree)")


if __name__ == "__main__":
    main()
