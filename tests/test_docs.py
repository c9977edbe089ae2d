"""The markdown pages hold: every relative link and anchor resolves, and every python block runs.

README.md's blocks each run on their own (a reader copies one); a docs page's blocks run in
order in one namespace, as a reader follows the page. A block preceded by
``<!-- not-run: reason -->`` is skipped (data sets, a GPU, long runs), with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
         *sorted((REPO_ROOT / "docs" / "results").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
BLOCK = re.compile(r"(?:<!--\s*not-run:(?P<reason>[^>]*?)-->[ \t]*\n)?^```python\n(?P<code>.*?)^```[ \t]*$",
                   re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def slug(heading: str) -> str:
    """GitHub's (and MyST's) anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def links(page: Path) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_the_pages_are_found():
    assert {"README.md", "core.md", "solvers.md"} <= {p.name for p in PAGES}
    assert {"docs/results/imaml.md", "docs/getting_started.md"} <= {str(p.relative_to(REPO_ROOT)) for p in PAGES}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_slugs_follow_github():
    assert slug("The `--device` option: CPU & CUDA") == "the---device-option-cpu--cuda"
    assert anchors(REPO_ROOT / "README.md") >= {"install", "citing"}


def blocks(page: Path) -> list[tuple[int, str | None, str]]:
    """``(line, not-run reason or None, code)`` of every python block of ``page``."""
    text = page.read_text()
    return [(text[:m.start("code")].count("\n"), m.group("reason"), m.group("code")) for m in BLOCK.finditer(text)]


def run_blocks(page: Path, together: bool) -> None:
    namespace: dict = {"__name__": "__docs__"}
    for line, reason, code in blocks(page):
        if reason is not None:
            assert reason.strip(), f"{page.name}:{line}: a not-run marker needs a reason"
            continue
        exec(compile(code, f"{page.name}:{line}", "exec"), namespace if together else {"__name__": "__docs__"})


def test_readme_blocks_each_run_on_their_own():
    assert len(blocks(REPO_ROOT / "README.md")) >= 2
    run_blocks(REPO_ROOT / "README.md", together=False)


@pytest.mark.parametrize("page", [p for p in PAGES if p.name != "README.md" and blocks(p)],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_docs_blocks_run_in_order(page, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    run_blocks(page, together=True)


def test_not_run_markers_are_few():
    skipped = [f"{p.name}:{line}" for p in PAGES for line, reason, _ in blocks(p) if reason is not None]
    assert len(skipped) <= 3, f"blocks that no test runs: {skipped}"
