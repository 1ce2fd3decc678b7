"""House rules a reader relies on: short module docstrings, no pointers outside the repository,
a README for users. (The import layers are checked by ``lint-imports``, run by ``make test``.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "sparsefl").rglob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT / "src")))
def test_module_docstrings_are_short(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    assert len(doc.splitlines()) <= 30, "algorithm notes go to docs/methods/<name>.md"


def test_nothing_points_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|METHODS\.md|DESIGN\.md|PERF_PROBE|FLOWER\.md")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in [*SOURCES, *DOCS]
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits


def test_readme_is_short_and_written_for_users() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    diary = re.compile(r"\b(session|previous code|mends|tried and not kept)\b", re.I)
    assert not diary.findall(text)
