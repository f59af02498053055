"""The label use case (pipeline/usecases/label.py, jobs/label_coco.py) without Ray: the ETA after a
resume, and the lease that keeps a second driver off a prefix another driver is labeling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline import lease, manifest
from pipeline.runner import RunSummary
from pipeline.storage import commit, layout
from pipeline.storage.store import Store
from pipeline.types import Failure, run_fingerprint
from pipeline.usecases import label as job
from tests.conftest import blob_image

ROOT = Path(__file__).resolve().parents[1]


def test_the_eta_after_a_resume_counts_only_images_still_to_label():
    # 1000 images; 800 were committed by an earlier run; this run labeled 100 in 50 s (2 img/s).
    s = RunSummary(shards_done=1, shards_skipped=8, images=100, images_skipped=800, seconds=50.0)
    assert job.eta_s(s, 1000) == 50.0  # 100 left at 2 img/s (not 450: the skipped ones are done)
    assert job.eta_s(RunSummary(), 1000) is None  # no rate yet


def test_the_progress_line_shows_skipped_images_apart(capsys):
    show = job.progress_printer(1000)
    show(RunSummary(shards_done=1, shards_skipped=8, images=100, images_skipped=800, seconds=50.0))
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


def test_plan_counts_shards_and_committed_ones_without_writing(tmp_path, tiny_paths):
    """``plan`` (the dry run): 5 images in shards of 2 are 3 shards; once one of them is committed
    under the run's fingerprint it is counted; a prefix holding another run is said to."""
    import dataclasses

    from pipeline.config import build_config
    from tests.conftest import tiny_overrides

    lines = []
    for i in range(5):
        Image.fromarray(blob_image(40, 50, seed=i)).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"id": f"im{i}", "uri": str(tmp_path / f"{i}.png"), "tags": [1]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "cat"}]))
    dataset = job.Dataset(manifest=str(tmp_path / "m.jsonl"), categories=str(tmp_path / "cats.json"))
    config = dataclasses.replace(build_config("voc-vit-b16", tiny_overrides(tiny_paths)), shard_size=2)
    out = str(tmp_path / "out")
    first = job.plan(dataset, out, config)
    assert (first.shards, first.committed, first.same_run) == (3, 0, True)
    assert str(first) == "plan: 3 shards, 0 committed, 3 remaining, about 6 images; same run"
    assert not (tmp_path / "out").exists()  # a plan writes nothing

    prepared = job._prepare(dataset, out, config, {})
    shard = next(iter(manifest.shards(prepared.inputs.records(), 2)))
    commit.write_shard(prepared.store, shard.shard_id, [], [Failure(r["id"], "missing", "x") for r in shard.records],
                        prepared.inputs.categories, prepared.fingerprint.digest, shard.names)  # fmt: skip
    assert job.plan(dataset, out, config).committed == 1
    other = run_fingerprint("0" * 64, {}, prepared.inputs.fingerprint)
    commit.write_run(prepared.store, other, prepared.config.to_dict(), prepared.models_fp)
    assert job.plan(dataset, out, config).same_run is False


def test_a_dataset_needs_one_kind_of_input():
    with pytest.raises(ValueError, match="give either --annotations with --images, or --manifest"):
        job.Dataset(annotations="a.json", manifest="m.jsonl")
    with pytest.raises(ValueError, match="--manifest needs --categories"):
        job.Dataset(manifest="m.jsonl")
