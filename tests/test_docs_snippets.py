"""The README and the docs run as pasted.

Every ```python block of README.md and docs/**/*.md runs. The blocks of one page run in
order in one namespace, as a reader pastes them into one session, in an empty working
folder. A block that cannot run here says why in an HTML comment on the line before it:

    <!-- not run: starts a process group; run it under torchrun -->
    ```python
    ...

and shows up as a skipped test with that reason. Blocks warn nothing of ensemblekit's own
(an `InitWarning` in the docs would teach a reader the wrong call).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from ensemblekit.errors import EnsembleKitWarning

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<info>[^`\n]*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    reason: str | None  # why it is not run; None: it runs

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    """The page's ```python blocks, in order, each with the reason it is not run (if marked)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks = len(opening["indent"]), opening["ticks"]
        end = i + 1
        while end < len(lines) and not re.match(rf"^ {{0,{indent + 3}}}{ticks}`*\s*$", lines[end]):
            end += 1
        if opening["info"].strip().split(" ")[0] in ("python", "py"):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = NOT_RUN.match(before)
            code = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
            blocks.append(Block(page, i + 1, code, marker["reason"] if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]
RUN_PAGES = [page for page in PAGES if any(b.reason is None for b in python_blocks(page))]
NOT_RUN_BLOCKS = [block for block in BLOCKS if block.reason is not None]


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs_as_pasted(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes (ek.save) lands here
    namespace: dict = {"__name__": "__main__"}
    for block in python_blocks(page):
        if block.reason is not None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                exec(compile(block.code, block.where, "exec"), namespace)
            except Exception as err:
                pytest.fail(f"{block.where} fails as pasted: {type(err).__name__}: {err}\n\n{block.code}")
        own = [w for w in caught if issubclass(w.category, EnsembleKitWarning)]
        assert not own, f"{block.where} warns: " + "; ".join(f"{w.category.__name__}: {w.message}" for w in own)


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS, ids=lambda b: b.where)
def test_block_not_run(block: Block):
    pytest.skip(f"{block.where} not run: {block.reason}")


def test_every_block_runs_or_says_why():
    assert len(BLOCKS) >= 15, "the docs lost their Python blocks, or the parser missed them"
    for block in NOT_RUN_BLOCKS:
        assert len(block.reason) >= 10, f"{block.where}: 'not run' needs a reason a reader understands"
    for page in PAGES:  # a marker stands right before a Python block, or it marks nothing
        lines = page.read_text(encoding="utf-8").splitlines()
        marked = {b.line for b in python_blocks(page) if b.reason is not None}
        for i, line in enumerate(lines):
            if NOT_RUN.match(line):
                after = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
                assert after is not None and after + 1 in marked, (
                    f"{page.relative_to(ROOT)}:{i + 1}: a 'not run' marker must stand right before a ```python block")


def test_the_parser_reads_blocks_markers_and_other_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n```bash\nls\n```\n\n<!-- not run: needs a GPU -->\n\n"
                    "```python\nb = a + 1\n```\n\n  ```py\n  c = 2\n  ```\n````md\n```python\nx\n```\n````\n")
    blocks = python_blocks(page)
    assert [(b.line, b.code, b.reason) for b in blocks] == [
        (3, "a = 1\n", None), (13, "b = a + 1\n", "needs a GPU"), (17, "c = 2\n", None)]
