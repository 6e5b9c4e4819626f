"""The README is the site's front page: short, its test command the one CI runs, and every relative link of it
and of the pages in docs/ leads somewhere; every page is in the site's navigation."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
#: A Markdown link or image: [text](target "title"), target without spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^( *)(```|~~~).*?^\1\2[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def prose(path: Path) -> str:
    """The text of a page without its code blocks and code spans (where brackets are code, not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t, re.I)]


def slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading: the text without markup, lowercase ASCII
    words joined by '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", page.read_text("utf-8")), re.M)}


def ci_test_command() -> str:
    """The line .ci/run runs: the README's second command."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    commands = [line for line in lines if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 1, commands
    return commands[0]


def test_the_readme_is_a_front_page_under_12000_bytes() -> None:
    size = len(README.read_bytes())
    assert size < 12_000, f"README.md is {size} bytes: move reference material into docs/"


def test_the_readme_shows_the_test_command_ci_runs_and_every_page_that_shows_one_agrees() -> None:
    command = ci_test_command()
    assert "pytest" in command
    assert command in README.read_text(encoding="utf-8").splitlines()
    shown = {
        path.relative_to(ROOT).as_posix(): line
        for path in [README, *PAGES]
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.startswith("python3 -m venv .venv") and "pytest" in line
    }
    assert set(shown) >= {"README.md", "docs/index.md", "docs/development.md"}
    assert {page: line for page, line in shown.items() if line != command} == {}


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_that_exists(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md" and linked.is_relative_to(DOCS) and fragment not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_readme_links_into_every_page_of_the_site() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    assert set(PAGES) - linked == {DOCS / "index.md"}  # the site's own front page, which the README mirrors


def test_the_link_checks_are_not_vacuous(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A title\n\n[ok](page.md#a-title) [gone](missing.md) `[code](not-a-link.md)`\n\n"
        "```\n[in a block](nor-this.md)\n```\n[web](https://example.org) [here](#a-title)\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["page.md#a-title", "missing.md"]
    assert slug("How `qbgw worker` ends") == "how-qbgw-worker-ends"
    assert slug("Pools: threads, prefork, gevent") == "pools-threads-prefork-gevent"
    assert "how-qbgw-worker-ends" in anchors(DOCS / "operations.md")


def _nav_pages(entries: object) -> list[str]:
    if isinstance(entries, str):
        return [entries]
    if isinstance(entries, list):
        return [page for entry in entries for page in _nav_pages(entry)]
    if isinstance(entries, dict):
        return [page for value in entries.values() for page in _nav_pages(value)]
    return []


def test_every_page_in_docs_is_in_the_navigation_and_every_entry_is_a_page() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    pages = [page.relative_to(DOCS).as_posix() for page in PAGES]
    assert sorted(nav) == sorted(set(nav)), "a page is in the navigation twice"
    assert set(pages) - set(nav) == set(), "pages missing from mkdocs.yml's nav"
    assert set(nav) - set(pages) == set(), "nav entries without a page"


def test_every_audit_action_is_in_the_actions_table() -> None:
    from qbgw.audit.events import Action

    table = (DOCS / "audit.md").read_text(encoding="utf-8").split("### Actions", 1)[1].split("\n## ", 1)[0]
    assert [a.value for a in Action if f"`{a.value}`" not in table] == []


def test_every_grant_of_the_application_role_is_in_the_grants_table() -> None:
    from qbgw.store.roles import FUNCTIONS, TABLES

    table = (DOCS / "audit.md").read_text(encoding="utf-8").split("What the application role gets:", 1)[1]
    table = table.split("\n\n", 2)[1]
    assert [name for name in (*TABLES, *FUNCTIONS) if f"`{name}`" not in table] == []
