"""README and docs/: short README, every relative link and anchor resolves, nothing points outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_docs_hold_the_pages_the_readme_promises() -> None:
    for name in ("architecture", "spec", "guarantees", "security", "deploy", "protocol", "benchmarks", "cli"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
    assert "```mermaid" in (ROOT / "docs" / "architecture.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(target)
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target} (outside the repository)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


def test_nothing_refers_outside_the_repository() -> None:
    """The contract is docs/spec.md: no file (but the CI scripts) points at the old spec beside the checkout."""
    outside = r"\.\./" + "shared"  # spelt in two parts, so that this file does not match itself
    found = subprocess.run(
        ["git", "grep", "-n", outside, "--", ".", ":!.ci", ":!scripts"], cwd=ROOT, capture_output=True, text=True
    )
    assert found.returncode == 1 and not found.stdout, found.stdout


def test_benchmark_results_are_the_ones_the_docs_quote() -> None:
    """One current result per benchmark: every file in bench/results/ is named in docs/benchmarks.md."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    files = [p.name for p in (ROOT / "bench" / "results").rglob("*") if p.is_file()]
    assert files
    assert [f for f in files if f not in text] == []
