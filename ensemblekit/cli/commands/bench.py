"""``ensemblekit bench``: speed of the execution strategies and of adaptive inference, with targets.

Examples:
    $ ensemblekit bench --smoke --sections 4
    device: cpu (...)
    ...
    [4] eval  wrap() one member 0.41 ms vs bare model 0.40 ms (same outputs: True): overhead +1.2% ...

    $ ensemblekit bench --smoke --sections 4 --json 2>/dev/null
    {"device": "cpu (...)", ..., "sections": {"4": [{"section": 4, "text": "...", "values": {"mode": "eval",
    "wrapped_ms": 0.41, "bare_ms": 0.40, ...}, "target": {"measure": "wrapped_vs_bare", "value": 1.012, "op": "<=",
    "limit": 1.03, "met": true}, "met": true, "skipped": null}, ...]}, "summary": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ensemblekit.cli.options import add_deprecated_alias
from ensemblekit.errors import InvalidValueError

__all__ = ["HELP", "NAME", "add_arguments", "argv", "run"]

NAME = "bench"
HELP = "Benchmark execution strategies, tree vs independent networks, halting and anytime inference."


def _sections(text: str) -> list[int]:
    from ensemblekit.bench.sections import SECTIONS

    try:
        sections = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sections must be numbers separated by commas, got {text!r}") from None
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    return sections


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true",
                      help="a seconds-long check: tiny settings, every line runs (the numbers mean nothing)")
    add_deprecated_alias(size, "--quick", "--smoke")
    size.add_argument("--full", action="store_true", help="more rounds and torch.compile at every N (long on a CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    parser.add_argument("--sections", type=_sections, default=None,
                        help="comma-separated sections to run (default: all): 1 tree vs independent, "
                             "2 strategies, 3 TorchEnsemble, 4 wrap overhead, 5 halting, 6 anytime, 7 distillation, "
                             "8 memory")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (each section's numbers and targets, the summary); "
                             "the lines go to stderr as they are measured")


def argv(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces ``args``."""
    line = ["--device", args.device]
    if args.smoke or args.full:
        line.append("--smoke" if args.smoke else "--full")
    if args.threads is not None:
        line += ["--threads", str(args.threads)]
    if args.sections is not None:
        line += ["--sections", ",".join(map(str, args.sections))]
    if args.json:
        line.append("--json")
    return line


def run(args: argparse.Namespace) -> int:
    from ensemblekit.bench import sections as bench

    if bench.needs_allocator_env():
        package_root = str(Path(bench.__file__).resolve().parents[1])
        env = dict(os.environ, **bench.ALLOCATOR_ENV, **{bench.REEXEC_FLAG: "1"})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "ensemblekit", NAME, *argv(args)], env)
    import torch

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError("--device cuda asked for, but torch sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = bench.QUICK if args.smoke else bench.FULL if args.full else bench.DEFAULT
    if not args.json:
        bench.run_bench(settings, device, args.sections or bench.SECTIONS)
        return 0
    start = time.perf_counter()
    lines = bench.run_bench(settings, device, args.sections or bench.SECTIONS,
                            out=lambda text: print(text, file=sys.stderr, flush=True))
    print(json.dumps(bench.record(settings, device, lines, time.perf_counter() - start), indent=2))
    return 0
