"""docs/RELIABILITY.md: every row names tests, and every test it names exists (so the table
cannot drift from the suite; the suite itself proves they pass)."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_reliability_row_names_existing_tests():
    rows = [line for line in (ROOT / "docs" / "RELIABILITY.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Fault") and not line.startswith("| ---")]  # fmt: skip
    assert len(rows) >= 40
    current = None
    for row in rows:
        cell = row.split("|")[-2]
        refs = re.findall(r"`((?:tests/\w+\.py)?::[\w*]+)`", cell)
        assert refs or cell.strip().startswith("same"), f"row names no test: {row[:80]}"
        for ref in refs:
            file, name = ref.split("::")
            current = ROOT / file if file else current
            assert current is not None and current.is_file(), ref
            assert fnmatch.filter(_test_names(current), name), f"{current.name}::{name} does not exist"
