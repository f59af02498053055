"""The import graph: reading manifests, writing and auditing outputs never loads the model stack,
and the manifest (the first stage) imports no output or model module."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).parent

TORCH_FREE = (
    "pipeline.types", "pipeline.manifest", "pipeline.config", "pipeline.stats", "pipeline.coco",
    "pipeline.audit", "pipeline.compare", "pipeline.consensus", "pipeline.report",
    "pipeline.storage.layout", "pipeline.storage.store", "pipeline.storage.outputs",
    "pipeline.storage.commit", "pipeline.storage.merge", "pipeline.review.run", "pipeline.review.app",
    "pipeline.export", "pipeline.discovery", "pipeline.usecases.audit", "pipeline.malloc",
)  # fmt: skip
MODEL_STACK = ("torch", "open_clip", "diffusers", "transformers")

# What manifest.py may import from the package: records, schemas and prompt data, nothing that
# writes outputs or holds a model.
OUTPUT_OR_MODEL = (
    "pipeline.storage", "pipeline.labeler", "pipeline.labels", "pipeline.models", "pipeline.methods",
    "pipeline.cliper", "pipeline.clip_es", "pipeline.compensation", "pipeline.stats", "pipeline.coco",
    "pipeline.pngs", "pipeline.shards", "pipeline.runner", "pipeline.weights",
)  # fmt: skip


def test_readers_and_writers_of_outputs_import_without_the_model_stack():
    """All in one fresh interpreter, one after another: the first module that brings in torch
    (or open_clip, diffusers, transformers), directly or through another pipeline module, is
    named; once one is loaded, later modules cannot be told apart, so the first is enough. Last,
    fingerprinting a config (what ``consensus`` and ``storage.commit.write_run`` do) loads none
    either: ``config.identity_of`` once imported the methods for ``batch_invariant``."""
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        f"for name in {list(TORCH_FREE)!r}:\n"
        "    importlib.import_module(name)\n"
        f"    out[name] = sorted(m for m in {list(MODEL_STACK)!r} if m in sys.modules)\n"
        "from pipeline.config import Config\n"
        "Config().fingerprint()\n"
        f"out['Config().fingerprint()'] = sorted(m for m in {list(MODEL_STACK)!r} if m in sys.modules)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(loaded) == [*TORCH_FREE, "Config().fingerprint()"]
    first = next(((name, mods) for name, mods in loaded.items() if mods), None)
    assert first is None, f"importing {first[0]} loads {first[1]}"


def _pipeline_imports(path: Path) -> set[str]:
    """Every ``pipeline.*`` module that ``path`` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            if node.module == "pipeline":
                found.update(f"pipeline.{a.name}" for a in node.names)
    return found


def test_manifest_imports_no_output_or_model_module():
    imported = _pipeline_imports(PACKAGE / "manifest.py")
    bad = sorted(m for m in imported if any(m == o or m.startswith(o + ".") for o in OUTPUT_OR_MODEL))
    assert imported, "the AST walk found no pipeline import at all; the check would pass vacuously"
    assert bad == []


def test_pipeline_imports_sees_both_import_forms(tmp_path):
    """The AST walk this file relies on catches ``from pipeline import x`` and nested imports."""
    src = tmp_path / "m.py"
    src.write_text("from pipeline import storage, schemas\ndef f():\n    import pipeline.labeler\n")
    assert _pipeline_imports(src) == {"pipeline", "pipeline.storage", "pipeline.schemas", "pipeline.labeler"}


def test_the_class_id_range_is_written_once():
    """Category ids are checked by ``types.check_class_id`` alone: no other module of the package
    spells out 254 (the largest foreground id) as a number."""
    spelled = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 254
    )
    assert spelled == ["types.py"]
