"""The docs site renders anywhere: cross-references instead of raw Sphinx roles, diagrams
from the vendored Mermaid (no CDN), one nav entry per page, Returns without made-up names.

The site is built once (``mkdocs build --strict``) into a temporary folder and its HTML
read; the docstrings are also checked at the source, which needs no build.
"""

from __future__ import annotations

import ast
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`")
ROLE_IN_TEXT = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):\S")
MERMAID_JS = "assets/javascripts/mermaid.min.js"
CDNS = ("unpkg.com", "jsdelivr.net", "cdnjs.cloudflare.com")


def docstrings(path: Path):
    """``(line, text)`` of every string statement of a module (docstrings and attribute docstrings)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.lineno, node.value.value


def test_docstrings_use_markdown_cross_references_not_sphinx_roles():
    found = [f"{path.relative_to(ROOT)}:{line}: {ROLE.search(text).group(0)}"
             for path in sorted((ROOT / "ensemblekit").rglob("*.py"))
             for line, text in docstrings(path) if ROLE.search(text)]
    assert not found, "Sphinx roles render raw on the API pages; write [`Name`][ensemblekit.path.Name]:\n" + \
        "\n".join(found)


def nav_entries(nav: list, section: str = "") -> list[tuple[str, str, str]]:
    """``(section, title, page)`` of every page in the nav, sections flattened."""
    entries = []
    for item in nav:
        for title, target in (item.items() if isinstance(item, dict) else [(item, item)]):
            if isinstance(target, list):
                entries += nav_entries(target, f"{section}/{title}")
            else:
                entries.append((section, title, target))
    return entries


def test_the_nav_lists_every_page_once():
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)
    entries = nav_entries(config["nav"])
    pages = [page for _, _, page in entries]
    assert len(pages) == len(set(pages)), f"a page appears twice in the nav: {pages}"
    titles = [(section, title) for section, title, _ in entries]
    assert len(titles) == len(set(titles)), f"a section lists a title twice: {titles}"
    assert [title for _, title, _ in entries].count("Distributed training") == 1
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), f"the nav names {page}, which docs/ does not hold"
    listed = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert listed == set(pages), f"pages missing from the nav: {sorted(listed - set(pages))}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


def text_of(page_html: str) -> str:
    page_html = re.sub(r"<(script|style)\b.*?</\1>", " ", page_html, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", "", page_html))


def test_api_pages_show_cross_references_not_raw_roles(site):
    pages = sorted((site / "api").rglob("*.html"))
    assert len(pages) >= 20
    raw = [f"{p.relative_to(site)}: ...{m.group(0)}..." for p in pages
           for m in ROLE_IN_TEXT.finditer(text_of(p.read_text(encoding="utf-8")))]
    assert not raw, "raw Sphinx roles on the API pages:\n" + "\n".join(raw[:40])
    wrap = (site / "api" / "wrap" / "index.html").read_text(encoding="utf-8")
    assert 'class="autorefs autorefs-internal"' in wrap  # cross-references became links


def test_returns_sections_name_no_value(site):
    for page in sorted((site / "api").rglob("*.html")):
        for table in re.findall(r'doc-section-title">Returns:</span></p>\s*<table>(.*?)</table>',
                                page.read_text(encoding="utf-8"), flags=re.S):
            header = re.findall(r"<th>(.*?)</th>", table)
            assert header == ["Type", "Description"], (
                f"{page.relative_to(site)}: a Returns table with columns {header} (a first word read as a name?)")


def test_diagrams_render_from_the_vendored_mermaid_without_a_cdn(site):
    vendored = site / MERMAID_JS
    assert vendored.is_file() and vendored.stat().st_size > 1_000_000
    assert (ROOT / "docs" / "assets" / "javascripts" / "mermaid.NOTICE.txt").is_file()
    diagrams = 0
    for source in sorted((ROOT / "docs").rglob("*.md")):
        fences = len(re.findall(r"^```mermaid\s*$", source.read_text(encoding="utf-8"), flags=re.M))
        if not fences:
            continue
        built = site / source.relative_to(ROOT / "docs").with_suffix("") / "index.html"
        if source.stem == "index":
            built = site / source.relative_to(ROOT / "docs").parent / "index.html"
        page = built.read_text(encoding="utf-8")
        assert page.count('<pre class="mermaid">') == fences, f"{source.name}: a diagram is not a mermaid block"
        assert "language-mermaid" not in page, f"{source.name}: a diagram renders as code"
        assert re.search(r'<script src="[./]*' + re.escape(MERMAID_JS) + '"', page), \
            f"{source.name} does not load the vendored Mermaid"
        diagrams += fences
    assert diagrams >= 4
    for page in sorted(site.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        assert not [cdn for cdn in CDNS if cdn in text], f"{page.relative_to(site)} loads from a CDN"
