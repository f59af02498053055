"""Consensus labels: pixels equal to the inputs' where all agree and 255 elsewhere, counted by hand;
outputs written like a run (PNG, COCO that pycocotools loads, Parquet stats, markers, merged/);
failed inputs as rows; resume skips committed shards and gives byte-identical files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools.coco import COCO

from pipeline import audit, consensus
from pipeline.storage import layout
from pipeline.storage.store import Store
from pipeline.usecases import consensus as consensus_job
from tests.test_compare import CATS, A_4x4, B_4x4, label_result, write_run

C_4x4 = np.array([[0, 1, 1, 2], [0, 0, 1, 1], [2, 2, 2, 0], [2, 2, 2, 2]], np.uint8)
# A_4x4, B_4x4 and C_4x4 cell by cell: kept where all three hold one id, else 255
#   row 0: (0,0,0) (1,0,1)x (1,1,1) (1,1,2)x          -> 0 255 1 255
#   row 1: (0,0,0) (0,0,0) (1,1,1) (255,1,1)x         -> 0 0 1 255
#   row 2: (2,2,2) (2,2,2) (0,2,2)x (0,255,0)x        -> 2 2 255 255
#   row 3: (2,2,2) (2,2,2) (2,2,2) (2,255,2)x         -> 2 2 2 255
ABC = np.array([[0, 255, 1, 255], [0, 0, 1, 255], [2, 2, 255, 255], [2, 2, 2, 255]], np.uint8)
AB = np.array([[0, 255, 1, 1], [0, 0, 1, 255], [2, 2, 255, 255], [2, 2, 2, 255]], np.uint8)  # A and B only


def test_consensus_map_by_hand() -> None:
    np.testing.assert_array_equal(consensus.consensus_map([A_4x4, B_4x4, C_4x4]), ABC)
    np.testing.assert_array_equal(consensus.consensus_map([A_4x4, B_4x4]), AB)
    np.testing.assert_array_equal(consensus.consensus_map([A_4x4, A_4x4]), A_4x4)  # 255 stays 255
    with pytest.raises(ValueError, match="at least two"):
        consensus.consensus_map([A_4x4])
    with pytest.raises(ValueError, match="one size"):
        consensus.consensus_map([A_4x4, B_4x4[:3]])


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 4).flatmap(lambda n: st.lists(arrays(np.uint8, (3, 5), elements=st.sampled_from([0, 1, 2, 255])),
                                                    min_size=n, max_size=n)))  # fmt: skip
def test_consensus_pixels_equal_every_input_or_are_255(maps: list[np.ndarray]) -> None:
    out = consensus.consensus_map(maps)
    stack = np.stack(maps)
    unanimous = (stack == stack[0]).all(axis=0) & (stack[0] != 255)
    np.testing.assert_array_equal(out[unanimous], stack[0][unanimous])
    assert (out[~unanimous] == 255).all()


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    """Run A in two shards: x, y | z, w, f (f failed in A). Run B in one shard, class scores other
    than A's: x, y, z, f, v (v not in A); w absent. Run C: x, y, w, f; z failed."""
    write_run(tmp_path / "A", {"00000-s": [label_result("x", A_4x4, scores=[0.6, 0.8]), label_result("y", A_4x4)],
                               "00001-t": [label_result("z", A_4x4), label_result("w", A_4x4)]},
              failures={"00001-t": [("f", "decode_error", "truncated file")]})  # fmt: skip
    write_run(tmp_path / "B", {"00000-u": [label_result("x", B_4x4, scores=[0.2, 0.4]), label_result("y", A_4x4),
                                           label_result("z", A_4x4), label_result("f", A_4x4),
                                           label_result("v", A_4x4)]}, tag="b")  # fmt: skip
    write_run(tmp_path / "C", {"00000-v": [label_result("x", C_4x4, scores=[0.1, 0.3]), label_result("y", A_4x4),
                                           label_result("w", A_4x4), label_result("f", A_4x4)]},
              failures={"00000-v": [("z", "missing", "image not found: /z.jpg")]}, tag="c")  # fmt: skip
    return [tmp_path / n for n in "ABC"]


def _files(prefix: Path) -> dict[str, bytes]:
    return {str(p.relative_to(prefix)): p.read_bytes() for p in sorted(prefix.rglob("*")) if p.is_file()}


def test_consensus_written_as_a_run(runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "agreed"
    assert consensus_job.main([*map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 shard(s) written, 0 already committed; 2 images labelled, 3 failed" in printed
    assert "1 image(s) of the other runs are not in run A's committed shards" in printed
    np.testing.assert_array_equal(audit.read_label_png((out / "labels" / "x.png").read_bytes()), ABC)
    np.testing.assert_array_equal(audit.read_label_png((out / "labels" / "y.png").read_bytes()), A_4x4)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000-s", "00001-t"]  # run A's shards
    images = {r["image_id"]: r for r in pq.read_table(out / "merged" / "stats_images").to_pylist()}
    assert images["x"]["ignore_fraction"] == pytest.approx(6 / 16)  # ABC holds 6 x 255
    assert images["y"]["ignore_fraction"] == pytest.approx(1 / 16)
    assert images["f"]["status"] == "input_failed" and "decode_error: truncated file" in images["f"]["error"]
    assert (
        images["z"]["status"] == "input_failed"
        and "run 3" in images["z"]["error"]
        and "missing" in images["z"]["error"]
    )
    assert images["w"]["status"] == "input_missing" and "run 2" in images["w"]["error"]
    classes = {
        (r["image_id"], r["category_id"]): r for r in pq.read_table(out / "merged" / "stats_classes").to_pylist()
    }
    assert classes[("x", 1)]["class_score"] == pytest.approx(0.3)  # mean of 0.6, 0.2, 0.1
    assert classes[("x", 2)]["class_score"] == pytest.approx(0.5)  # mean of 0.8, 0.4, 0.3
    assert classes[("x", 1)]["pixel_area"] == 2 and classes[("x", 2)]["pixel_area"] == 5
    ground = COCO(str(out / "merged" / "annotations.json"))  # pycocotools loads it as a dataset
    image = next(im for im in ground.dataset["images"] if im["source_id"] == "x")
    np.testing.assert_array_equal(audit.coco_label_map(image, ground.loadAnns(ground.getAnnIds(image["id"]))), ABC)
    scores = sorted((a["category_id"], a["score"]) for a in ground.loadAnns(ground.getAnnIds(image["id"])))
    assert scores == [(1, pytest.approx(0.3)), (2, pytest.approx(0.5))]
    record = json.loads((out / "run.json").read_text())
    inputs = [json.loads((r / "run.json").read_text())["fingerprint"] for r in runs]
    assert [i["fingerprint"] for i in record["model"]["consensus"]["inputs"]] == inputs
    opened = audit.open_run(str(out))  # the audit reads it like any run
    assert opened.ignored_shards == 0 and sorted(k for s in opened.shards.values() for k in s.image_ids()) == ["x", "y"]


def test_rerun_skips_committed_shards_and_is_byte_identical(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "agreed"
    inputs = consensus.open_inputs([str(r) for r in runs])
    first = consensus.write_consensus(inputs, Store.open(str(out)))
    assert first["written"] == ["00000-s", "00001-t"]
    before = _files(out)
    again = consensus.write_consensus(inputs, Store.open(str(out)))
    assert again["written"] == [] and again["skipped"] == ["00000-s", "00001-t"]
    (out / "shards" / "00001-t" / layout.MARKER).unlink()  # an interrupted shard: redone, alone
    (out / "shards" / "00001-t" / "stats_images.parquet").write_bytes(b"half written")
    resumed = consensus.write_consensus(inputs, Store.open(str(out)))
    assert resumed["written"] == ["00001-t"] and resumed["skipped"] == ["00000-s"]
    assert _files(out) == before


def test_changed_inputs_are_refused(runs: list[Path], tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "agreed")
    assert consensus_job.main([str(runs[0]), str(runs[1]), "--out", out]) == 0
    assert consensus_job.main([*map(str, runs), "--out", out]) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert consensus_job.main([*map(str, runs), "--out", out, "--overwrite"]) == 0
    np.testing.assert_array_equal(audit.read_label_png((tmp_path / "agreed" / "labels" / "x.png").read_bytes()), ABC)
    assert consensus_job.main([str(runs[0]), "--out", out]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert consensus_job.main([str(runs[0]), str(runs[1]), "--out", str(runs[0])]) == 2
    assert "is one of the input runs" in capsys.readouterr().err


def test_runs_naming_an_id_differently_are_refused(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "A", {"00000-s": [label_result("x", A_4x4)]})
    write_run(tmp_path / "B", {"00000-s": [label_result("x", B_4x4)]}, categories=[CATS[0], {"id": 2, "name": "cow"}],
              tag="b")  # fmt: skip
    assert consensus_job.main([str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "name category ids differently" in err and "2 ('dog', 'cow')" in err
