"""jobs/explain.py on tiny checkpoints: heatmaps, overlay and raw arrays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import blob_image

ROOT = Path(__file__).resolve().parents[1]


def test_explain_writes_heatmaps_overlay_and_arrays(tiny_paths, tmp_path):
    image = tmp_path / "rgb_150x200.jpg"
    Image.fromarray(blob_image(150, 200)).save(image, quality=95)
    out = tmp_path / "explain"
    proc = subprocess.run(
        [sys.executable, "jobs/explain.py", "--image", str(image), "--tags", "cat,dog",
         "--clip-model", str(tiny_paths["clip_config"]), "--clip-checkpoint", str(tiny_paths["clip_checkpoint"]),
         "--sd-checkpoint", str(tiny_paths["sd_dir"]), "--device", "cpu",
         "--out", str(out), "--dump", str(out / "maps.npz")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("coarse.png", "refined.png", "overlay.png"):
        with Image.open(out / name) as im:
            assert im.width > 100 and im.height > 100
    maps = np.load(out / "maps.npz")
    # 150x200 -> 336 x 448 on a 16 px grid: 21 x 28 patches
    assert maps["coarse"].shape == (2, 21, 28)
    assert maps["refined"].shape == (2, 64, 64)
    assert maps["coarse_scores"].shape == maps["final_scores"].shape == (2,)
    assert maps["label_map"].shape == (150, 200) and maps["label_map"].dtype == np.uint8
    # Candidates: VOC's 20 classes (the preset's), so the ids are VOC's: cat 8, dog 12.
    assert maps["class_ids"].tolist() == [8, 12]
    assert set(np.unique(maps["label_map"]).tolist()) <= {0, 8, 12}
    assert maps["class_names"].tolist() == ["cat", "dog"]


@pytest.mark.slow
def test_explain_refuses_tags_outside_the_candidate_classes(tmp_path):
    image = tmp_path / "rgb_20x20.png"
    Image.fromarray(blob_image(20, 20)).save(image)
    proc = subprocess.run(
        [sys.executable, "jobs/explain.py", "--image", str(image), "--tags", "cat,zebra", "--categories", "cat,dog",
         "--out", str(tmp_path / "out"), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--tags ['zebra'] are not candidate classes; add them to --categories (candidates: cat, dog)" in proc.stderr
