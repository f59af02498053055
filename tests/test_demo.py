"""`python jobs/demo.py OUT`: the whole job on tiny random-weight models, on a local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from pycocotools.coco import COCO

from pipeline import demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_dataset_truth_is_what_it_claims(tmp_path):
    from skimage import data

    images, annotations = demo.write_dataset(tmp_path)
    gt = COCO(str(annotations))
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{name}.jpg" for name, _, _ in demo.PHOTOS)
    horse = next(i for i in gt.dataset["images"] if i["file_name"] == "horse.jpg")
    (ann,) = gt.loadAnns(gt.getAnnIds(imgIds=horse["id"]))
    assert np.array_equal(gt.annToMask(ann).astype(bool), ~data.horse())  # the silhouette, pixel for pixel
    coffee = next(i for i in gt.dataset["images"] if i["file_name"] == "coffee.jpg")
    (ann,) = gt.loadAnns(gt.getAnnIds(imgIds=coffee["id"]))
    assert ann["bbox"] == [150.0, 20.0, 350.0, 320.0] and ann["category_id"] == 47
    first = (images / "astronaut.jpg").read_bytes()
    demo.write_dataset(tmp_path)
    assert (images / "astronaut.jpg").read_bytes() == first


@pytest.mark.slow
def test_demo_labels_resumes_and_audits(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "demo.py"), str(out)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "RANDOM weights" in proc.stdout and "skipped (already committed) 3" in proc.stdout
    assert sorted(p.suffix for p in (out / "run" / "labels").iterdir()) == [".png"] * 5
    merged = COCO(str(out / "run" / "merged" / "annotations.json"))
    assert len(merged.dataset["images"]) == 5
    rows = ds.dataset(out / "run" / "merged" / "stats_images", format="parquet").to_table().to_pylist()
    assert sorted(r["status"] for r in rows) == ["ok"] * 5
    summary = json.loads((out / "audit" / "summary.json").read_text())
    assert summary["images_scored"] == 5 and summary["images_missing_pred"] == 0
    assert (out / "audit" / "report.html").stat().st_size > 1000
    for line in proc.stdout.split("Outputs:")[1].splitlines():
        if line.startswith("  ") and "/" in line:
            assert Path(line.split()[-1]).exists(), line
