"""The shape of the entry points: thin jobs without sys.path edits, and one `tag2mask` command whose
subcommands are the jobs' own parsers."""

from __future__ import annotations

import ast
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.py"))
REQUIRED = ("label", "plan", "explain", "audit", "compare", "consensus", "benchmark", "stage-weights", "demo")


def _lines(paths: list[Path]) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def test_jobs_hold_under_15_percent_of_the_code():
    jobs = _lines(JOBS)
    library = _lines(sorted((ROOT / "pipeline").rglob("*.py")))
    assert jobs / (jobs + library) < 0.15, f"jobs/ {jobs} lines of {jobs + library}"


def test_no_job_edits_sys_path():
    offenders = [p.name for p in JOBS if "sys.path" in p.read_text()]
    assert offenders == []


def test_the_project_installs_the_tag2mask_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tag2mask": "pipeline.cli:main"}


def test_tag2mask_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("commands:")[1]
    for name in REQUIRED:
        assert f"\n  {name} " in listed, name
    assert set(cli.COMMANDS) >= set(REQUIRED)


def _job_module(path: Path) -> str:
    """The module a thin job calls: ``from pipeline.X import Y`` then ``Y.main(...)``."""
    tree = ast.parse(path.read_text())
    imports = {a.asname or a.name: f"{n.module}.{a.name}" for n in tree.body if isinstance(n, ast.ImportFrom)
               for a in n.names if n.module and n.module.startswith("pipeline")}  # fmt: skip
    calls = [n.func.value.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "main" and isinstance(n.func.value, ast.Name)]  # fmt: skip
    assert len(calls) == 1, f"{path.name} should make one library call"
    return imports[calls[0]]


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "plan"])
def test_each_subcommand_runs_its_jobs_module(name):
    job = ROOT / cli.COMMANDS[name].job.split()[0]
    assert _job_module(job) == cli.COMMANDS[name].module


def _help(run, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", ["label", "audit", "explain"])
def test_a_subcommands_help_is_its_jobs_help(name, capsys, monkeypatch):
    """`tag2mask NAME --help` and `python jobs/JOB --help` print the same options and text (the
    same parser; only the program name and the usage line's wrapping differ)."""
    job = ROOT / cli.COMMANDS[name].job
    ours = _help(lambda: cli.main([name, "--help"]), capsys)
    monkeypatch.setattr(sys, "argv", [str(job), "--help"])
    theirs = _help(lambda: runpy.run_path(str(job), run_name="__main__"), capsys)
    assert "--help" in ours and f"tag2mask {name}" in ours
    assert " ".join(ours.replace(f"usage: tag2mask {name}", "usage: PROG", 1).split()) == " ".join(
        theirs.replace(f"usage: {job.name}", "usage: PROG", 1).split()
    )


def test_plan_is_label_dry_run(capsys):
    text = _help(lambda: cli.main(["plan", "--help"]), capsys)
    assert cli.COMMANDS["plan"].prefix == ("--dry-run",) and "--manifest" in text


def test_an_unknown_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["relabel"])
    assert exit_.value.code == 2 and "invalid choice: 'relabel'" in capsys.readouterr().err
