"""``ensemblekit plugins``: every plugin, its package, its components and any load error.

Examples:
    $ ensemblekit plugins
    ensemblekit.plugins.builtins  ensemblekit 0.1.0  built-in
      topology: cascade, chain, independent, multi_branch, tree
      ...
    poe  ensemblekit-poe 0.1.0
      aggregator: poe
      halting policy: poe_support
"""

from __future__ import annotations

import argparse
import json

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "plugins"
HELP = "List the plugins, the package each comes from, the components it registers and any load error."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per plugin")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the full traceback of failed plugins")


def run(args: argparse.Namespace) -> int:
    from ensemblekit.plugins.manager import plugin_infos

    infos = plugin_infos()
    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
        return 0
    for info in infos:
        source = f"{info.distribution} {info.version or '?'}" if info.distribution else "registered at run time"
        tags = {"loaded": "built-in" if info.builtin else "", "failed": "FAILED", "blocked": "blocked"}[info.status]
        print("  ".join(part for part in (info.name, source, tags) if part))
        for kind, names in info.components.items():
            print(f"  {kind}: {', '.join(names)}")
        if info.error:
            print(f"  {info.error}")
        if args.verbose and info.traceback:
            print("    " + info.traceback.rstrip().replace("\n", "\n    "))
    return 0
