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


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_reading_the_stats_runs_on_a_merged_run(tmp_path, capsys):
    """The README's Parquet snippet runs as printed (with <prefix> filled in) on a real merged run,
    so it names only installed modules and existing columns."""
    from pipeline.storage import commit
    from pipeline.storage.merge import merge
    from pipeline.storage.store import Store
    from tests.test_storage import CATEGORIES, FP, shard_inputs

    store = Store.open(str(tmp_path / "run"))
    commit.write_shard(store, "00000-a", shard_inputs(3), [], CATEGORIES, FP)
    merge(store, ["00000-a"], FP)
    blocks = [b for b in _python_blocks((ROOT / "README.md").read_text()) if "<prefix>/merged/stats" in b]
    assert blocks, "README lost its stats-reading snippet"
    for block in blocks:
        exec(compile(block.replace("<prefix>", str(tmp_path / "run")), "README.md", "exec"), {})
    assert "ok" in capsys.readouterr().out
