"""The docs site renders anywhere: cross-references instead of raw Sphinx roles, diagrams
from the vendored Mermaid (no CDN), one nav entry per page, Returns without made-up names.

The site is built once (``mkdocs build --strict``) into a temporary folder and its HTML
read; the docstrings are also checked at the source, which needs no build.
"""

from __future__ import annotations

import ast
import html
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`")
ROLE_IN_TEXT = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):\S")
MERMAID_JS = "assets/javascripts/mermaid.min.js"
CDNS = ("unpkg.com", "jsdelivr.net", "cdnjs.cloudflare.com", "fonts.googleapis.com", "fonts.gstatic.com")
"""Hosts a page must not load from: the docs render offline (Mermaid vendored, ``theme.font: false``)."""
MERMAID_SOURCE = re.compile(r"^\s*(?:graph|flowchart)\s+(?:LR|RL|TD|TB|BT)\b", re.M)
"""The first line of a Mermaid diagram: shown as text, it is a diagram that did not render."""


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


def test_no_page_shows_raw_roles_or_diagram_source(site):
    """Every page, not only the API's: no Sphinx role, and diagram source only inside a Mermaid block."""
    pages = sorted(site.rglob("*.html"))
    raw, source = [], []
    for page in pages:
        built = page.read_text(encoding="utf-8")
        raw += [f"{page.relative_to(site)}: ...{m.group(0)}..." for m in ROLE_IN_TEXT.finditer(text_of(built))]
        outside = re.sub(r'<pre class="mermaid">.*?</pre>', " ", built, flags=re.S)
        source += [f"{page.relative_to(site)}: {m.group(0).strip()!r}"
                   for m in MERMAID_SOURCE.finditer(text_of(outside))]
    assert len(pages) >= 35
    assert not raw, "raw Sphinx roles:\n" + "\n".join(raw[:40])
    assert not source, "diagram source shown as text (a fence that is not a mermaid block):\n" + "\n".join(source)


def test_the_theme_fetches_no_web_fonts():
    assert re.search(r"^theme:\n(?:  .*\n)*  font: false$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)


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


# ------------------------------------------------------------------ in a browser (skipped without Chromium)
class Chromium:
    """Headless Chromium driven over its DevTools pipe (fd 3 in, fd 4 out; messages end with NUL)."""

    def __init__(self, executable: str, timeout: float = 60.0):
        self.timeout, self.buffer, self.last = timeout, b"", 0
        to_read, self.to_write = os.pipe()
        self.from_read, from_write = os.pipe()

        def descriptors() -> None:
            a, b = os.dup(to_read), os.dup(from_write)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen([executable, "--headless", "--no-sandbox", "--disable-gpu",
                                         "--disable-dev-shm-usage", "--remote-debugging-pipe", "about:blank"],
                                        preexec_fn=descriptors, close_fds=False, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        os.close(to_read)
        os.close(from_write)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.last += 1
        message = {"id": self.last, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.to_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self.buffer:
                if not select.select([self.from_read], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"Chromium did not answer {method}")
                chunk = os.read(self.from_read, 1 << 20)
                if not chunk:
                    raise EOFError("Chromium closed its pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.last:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, TimeoutError, AssertionError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_write)
        os.close(self.from_read)


def rendered_diagrams(node: dict, inside: int = 0, seen: dict | None = None) -> dict:
    """``{"blocks": Mermaid blocks, "svg": blocks holding an <svg>}`` of a DOM tree read with shadow roots (Material
    draws each diagram into a closed shadow root, which ``--dump-dom`` and page scripts cannot see)."""
    seen = seen if seen is not None else {"blocks": 0, "svg": set()}
    attributes = node.get("attributes", [])
    classes = dict(zip(attributes[::2], attributes[1::2])).get("class", "").split()
    name = node.get("nodeName", "").lower()
    if name in ("div", "pre") and "mermaid" in classes:
        seen["blocks"] += 1
        inside = seen["blocks"]
    if name == "svg" and inside:
        seen["svg"].add(inside)
    for child in node.get("children", []) + node.get("shadowRoots", []):
        rendered_diagrams(child, inside, seen)
    return seen


def test_diagrams_render_to_svg_in_a_headless_browser(site):
    executable = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if executable is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    pages = [page for page in sorted(site.rglob("*.html")) if '<pre class="mermaid">' in page.read_text("utf-8")]
    assert pages
    browser = Chromium(executable)
    try:
        for page in pages:
            target = browser.send("Target.createTarget", {"url": page.resolve().as_uri()})["targetId"]
            session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            deadline = time.monotonic() + 30
            while True:
                root = browser.send("DOM.getDocument", {"depth": -1, "pierce": True}, session)["root"]
                seen = rendered_diagrams(root)
                if (seen["blocks"] and len(seen["svg"]) == seen["blocks"]) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            browser.send("Target.closeTarget", {"targetId": target})
            expected = page.read_text("utf-8").count('<pre class="mermaid">')
            assert (seen["blocks"], len(seen["svg"])) == (expected, expected), \
                f"{page.relative_to(site)}: {len(seen['svg'])} of {expected} diagrams rendered to SVG"
    finally:
        browser.close()
