"""jobs/label_coco.py's own logic, without Ray: the ETA after a resume, and the lease that keeps a
second driver off a prefix another driver is labeling."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from pipeline import lease
from pipeline.runner import RunSummary
from pipeline.storage import layout
from pipeline.storage.store import Store
from tests.conftest import blob_image

ROOT = Path(__file__).resolve().parents[1]


def _job_module():
    spec = importlib.util.spec_from_file_location("label_coco_job", ROOT / "jobs" / "label_coco.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_the_eta_after_a_resume_counts_only_images_still_to_label():
    job = _job_module()
    # 1000 images; 800 were committed by an earlier run; this run labeled 100 in 50 s (2 img/s).
    s = RunSummary(shards_done=1, shards_skipped=8, images=100, images_skipped=800, seconds=50.0)
    assert job.eta_s(s, 1000) == 50.0  # 100 left at 2 img/s (not 450: the skipped ones are done)
    assert job.eta_s(RunSummary(), 1000) is None  # no rate yet


def test_the_progress_line_shows_skipped_images_apart(capsys):
    job = _job_module()
    job._progress(1000)(RunSummary(shards_done=1, shards_skipped=8, images=100, images_skipped=800, seconds=50.0))
    line = capsys.readouterr().out
    assert "skipped 8 (800 images)" in line and "2.00 img/s, ETA 50 s" in line


def test_a_second_driver_on_a_prefix_is_refused_naming_the_holder(tmp_path, tiny_paths):
    Image.fromarray(blob_image(40, 50)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "uri": str(tmp_path / "a.png"), "tags": [1]}) + "\n")
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "cat"}]))
    out = Store.open(str(tmp_path / "out"))
    holder = {"owner": "0123456789abcdef", "host": "gpu-node-7", "pid": 4242, "expires": 4_000_000_000.0}
    out.write_many({lease.LEASE_FILE: json.dumps(holder).encode()})
    cmd = [sys.executable, "jobs/label_coco.py", "--output", str(tmp_path / "out"),
           "--manifest", str(tmp_path / "m.jsonl"), "--categories", str(tmp_path / "cats.json"),
           "--clip-model", str(tiny_paths["clip_config"]), "--clip-checkpoint", str(tiny_paths["clip_checkpoint"]),
           "--sd-checkpoint", str(tiny_paths["sd_dir"]), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is in use by another driver 0123456789ab on host gpu-node-7, pid 4242" in proc.stderr
    assert "its lease expires at 2096-10-02 07:06:40 UTC" in proc.stderr
    assert out.read(layout.RUN_FILE) is None and not (tmp_path / "out" / "shards").exists()
