"""Write docs/results.md from the output folders of the commands that produced the results.

Usage: python scripts/collect_results.py RUN [RUN ...], where each RUN is
``"COMMAND LINE::OUTPUT FOLDER::WALL SECONDS"``. The reading of the results,
``scripts/results_summary.md``, is the one part written by hand; it goes first. For each run the page shows the
command line, its wall time, every Markdown table the command wrote into its
folder (which name the device, torch version and settings), what it printed
where that was saved there as a ``.txt`` file, and its figures, which
are copied into docs/results/. Nothing is typed by hand: the page is what the
commands wrote.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def section(command: str, folder: Path, seconds: float, index: int) -> str:
    lines = [f"## `{command}`", "", f"Wall time: {seconds / 60:.1f} min ({seconds:.0f} s).", ""]
    tables, printed = sorted(folder.glob("*.md")), sorted(folder.glob("*.txt"))
    if not tables and not printed:
        raise SystemExit(f"{folder}: no Markdown table or printed output found; did the command finish?")
    figures = DOCS / "results"
    figures.mkdir(exist_ok=True)
    shown = set()
    for table in tables:
        text = table.read_text().strip().replace("\n# ", "\n### ")
        for png in folder.glob("*.png"):  # a figure the table shows: linked to its copy
            if f"]({png.name})" in text:
                text = text.replace(f"]({png.name})", f"](results/{index:02d}-{png.name})")
                shown.add(png.name)
        lines += [text, ""]
    for output in printed:  # what the command printed (tee'd into the folder), shown as printed
        lines += ["```text", output.read_text().strip(), "```", ""]
    for png in sorted(folder.glob("*.png")):
        target = figures / f"{index:02d}-{png.name}"
        shutil.copyfile(png, target)
        if png.name not in shown:
            lines += [f"![{png.stem}](results/{target.name})", ""]
    return "\n".join(lines)


def main(runs: list[str]) -> None:
    parts = ["# Results", "",
             "Every table and figure below was written by the command above it, on the device it names; "
             "this page is assembled from those outputs by `scripts/collect_results.py`. Accuracies are top-1 on "
             "the test split in %; mean ± std over seeds where there are several. The papers' numbers are on "
             "CIFAR with their own networks and full schedules: compare orderings, not values.", "",
             (Path(__file__).parent / "results_summary.md").read_text().strip(), ""]
    for index, run in enumerate(runs):
        command, folder, seconds = run.split("::")
        parts.append(section(command, Path(folder), float(seconds), index))
    (DOCS / "results.md").write_text("\n".join(parts).rstrip() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
