"""The full benchmark run: ``ensemblekit bench --full`` on the CPU and on every CUDA device present.

Each device runs in its own process (the bench sets the allocator by
re-executing itself); the output is printed as it comes and saved, one file
per device, under ``--out``.

Usage:
    python benchmarks/run_all.py [--out benchmarks/results] [--sections 1,2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch


def devices() -> list[str]:
    """``cpu`` and ``cuda:i`` for every visible GPU."""
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for the outputs")
    parser.add_argument("--sections", default=None, help="comma-separated sections (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for device in devices():
        command = [sys.executable, "-m", "ensemblekit", "bench", "--full", "--device", device]
        if args.sections:
            command += ["--sections", args.sections]
        path = args.out / f"bench-{device.replace(':', '')}.txt"
        print(f"$ {' '.join(command[1:])}  (saved to {path})", flush=True)
        with open(path, "w") as saved, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                        text=True, cwd=Path(__file__).parents[1]) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                saved.write(line)
        failed += proc.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
