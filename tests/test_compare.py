"""Comparing two runs: agreement and IoU of A against B on hand-made maps counted by hand, runs with
different categories, missing and failed images, and the CLI with and without ground truth on
runs written with the real storage code."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import compare, pngs
from pipeline.config import Config
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import LabelResult, run_fingerprint
from pipeline.usecases import compare as compare_runs

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
A_4x4 = np.array([[0, 1, 1, 1], [0, 0, 1, 255], [2, 2, 0, 0], [2, 2, 2, 2]], np.uint8)
B_4x4 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255], [2, 2, 2, 255]], np.uint8)
# Counted by hand. A ignores 1 pixel (row 1, col 3), B 2 (col 3 of rows 2 and 3), none in common:
# 16 - 1 - 2 = 13 compared pixels. Rows A 0/1/2, columns B 0/1/2:
#   A 0: 3 x B 0 (r0c0, r1c0, r1c1), 1 x B 2 (r2c2)           -> 4
#   A 1: 1 x B 0 (r0c1), 3 x B 1 (r0c2, r0c3, r1c2)           -> 4
#   A 2: 5 x B 2 (r2c0, r2c1, r3c0, r3c1, r3c2)                -> 5
MATRIX = [[3, 0, 1], [1, 3, 0], [0, 0, 5]]
AGREEMENT = 11 / 13
IOU = [3 / 5, 3 / 4, 5 / 6]  # 3/(4+4-3), 3/(4+3-3), 5/(5+6-5)
MIOU = 131 / 180  # (36 + 45 + 50) / 60 / 3


def label_result(image_id: str, label_map: np.ndarray, class_ids: Sequence[int] = (1, 2),
                 scores: Sequence[float] | None = None) -> LabelResult:  # fmt: skip
    """A LabelResult as the labeler returns one, around a hand-made label map."""
    h, w = label_map.shape
    n = len(class_ids)
    final = np.asarray(scores if scores is not None else np.linspace(0.7, 0.8, n), np.float32)
    rng = np.random.default_rng(len(image_id))
    return LabelResult(
        image_id=image_id, label_map=label_map, class_ids=tuple(class_ids), coarse=rng.random((n, 3, 3), np.float32),
        compensated=rng.random((n, 4, 4), np.float32), coarse_scores=final / 2, final_scores=final,
        kept_ids=tuple(class_ids), decision=rng.random((n, h, w), np.float32), segments=None, timings={},
    )  # fmt: skip


def write_run(prefix: Path, shards: Mapping[str, Sequence], categories: Sequence[Mapping] = CATS,
              failures: Mapping[str, Sequence] | None = None, tag: str = "a") -> Store:  # fmt: skip
    """A run as label_coco.py leaves it: run.json, then shards committed under its fingerprint.
    ``shards``: shard id -> LabelResults; ``failures``: shard id -> (image_id, status, error)."""
    store = Store.open(str(prefix))
    model = {"clip": {"sha256": tag}}
    run = run_fingerprint(Config().fingerprint(), model, (tag * 64)[:64])
    commit.write_run(store, run, Config().to_dict(), model)
    for shard_id in sorted(set(shards) | set(failures or {})):
        commit.write_shard(store, shard_id, shards.get(shard_id, []), (failures or {}).get(shard_id, []),
                            categories, run.digest)  # fmt: skip
    return store


def test_hand_counted_agreement_and_iou() -> None:
    cats = compare.share_categories(CATS, CATS)
    result = compare.Agreement.of(cats)
    result.add("x", A_4x4, B_4x4)
    np.testing.assert_array_equal(result.matrix, MATRIX)
    row = result.rows[0]
    assert (row["pixels"], row["ignore_a"], row["ignore_b"], row["unshared_pixels"]) == (16, 1, 2, 0)
    assert (row["compared_pixels"], row["agree_pixels"]) == (13, 11)
    assert row["agreement"] == pytest.approx(AGREEMENT) and row["miou"] == pytest.approx(MIOU)
    assert (row["n_classes_a"], row["n_classes_b"]) == (2, 2)
    classes = compare.class_table(result.matrix, cats).to_pylist()
    np.testing.assert_allclose([c["iou"] for c in classes], IOU)
    assert [(c["pixels_a"], c["pixels_b"], c["both"]) for c in classes] == [(4, 4, 3), (4, 3, 3), (5, 6, 5)]


def test_iou_is_symmetric_and_ignore_is_no_answer() -> None:
    cats = compare.share_categories(CATS, CATS)
    ab, ba = compare.Agreement.of(cats), compare.Agreement.of(cats)
    ab.add("x", A_4x4, B_4x4)
    ba.add("x", B_4x4, A_4x4)
    np.testing.assert_array_equal(ab.matrix, ba.matrix.T)
    assert ab.rows[0]["miou"] == pytest.approx(ba.rows[0]["miou"])
    # a map against itself with its 255s: full agreement over the labelled pixels, not a disagreement
    same = compare.Agreement.of(cats)
    same.add("y", A_4x4, A_4x4)
    assert same.rows[0]["agreement"] == 1.0 and same.rows[0]["compared_pixels"] == 15
    assert same.rows[0]["ignore_a"] == same.rows[0]["ignore_b"] == 1


def test_different_categories_compare_on_shared_ids_and_report_the_rest() -> None:
    a_cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "cow"}]
    b_cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "hound"}, {"id": 4, "name": "bird"}]
    cats = compare.share_categories(a_cats, b_cats)
    assert (cats.class_ids, cats.only_a, cats.only_b, cats.renamed) == ((0, 1), [3], [4], [2])
    a = np.array([[1, 1, 3, 2], [0, 0, 0, 255]], np.uint8)
    b = np.array([[1, 4, 1, 2], [0, 1, 255, 0]], np.uint8)
    # pairs: (1,1) ok, (1,4) unshared, (3,1) unshared, (2,2) unshared (2 is named differently),
    #        (0,0) ok, (0,1) compared, (0,255) B ignores, (255,0) A ignores
    result = compare.Agreement.of(cats)
    result.add("x", a, b)
    row = result.rows[0]
    assert (row["unshared_pixels"], row["compared_pixels"], row["agree_pixels"]) == (3, 3, 2)
    np.testing.assert_array_equal(result.matrix, [[1, 1], [0, 1]])  # rows A 0/1, columns B 0/1
    table = compare.category_table(cats).to_pylist()
    assert [(r["category_id"], r["compared"]) for r in table] == [(1, True), (2, False), (3, False), (4, False)]
    assert table[2]["name_b"] is None and table[3]["name_a"] is None
    # an id that is no category of its run is an error row, not a silent count
    result.add("bad", np.full((2, 2), 9, np.uint8), np.zeros((2, 2), np.uint8))
    assert (
        result.rows[-1]["status"] == "error"
        and "run A" in result.rows[-1]["error"]
        and "[9]" in result.rows[-1]["error"]
    )
    result.add("size", a, b[:, :3])
    assert result.rows[-1]["status"] == "error" and "2x4" in result.rows[-1]["error"]
    np.testing.assert_array_equal(result.matrix, [[1, 1], [0, 1]])


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Run A: a (A_4x4), c (only in A), f failed; run B: a (B_4x4), b (only in B), f labelled.
    The runs shard their images differently: pairing goes by manifest id, not by shard."""
    write_run(tmp_path / "A", {"00000-x": [label_result("a", A_4x4), label_result("c", A_4x4)]},
              failures={"00001-y": [("f", "decode_error", "truncated file")]})  # fmt: skip
    write_run(tmp_path / "B", {"00000-p": [label_result("a", B_4x4)],
                               "00001-q": [label_result("b", B_4x4), label_result("f", B_4x4)]}, tag="b")  # fmt: skip
    return tmp_path / "A", tmp_path / "B"


def test_cli_without_ground_truth(two_runs: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    a, b = two_runs
    assert compare_runs.main([str(a), str(b), "--out", str(tmp_path / "r1")]) == 0
    assert "1 images compared, 2 missing in A, 1 missing in B, 0 errors" in capsys.readouterr().out
    rows = {r["image_id"]: r for r in pq.read_table(tmp_path / "r1" / "agreement.parquet").to_pylist()}
    assert rows["a"]["agreement"] == pytest.approx(AGREEMENT) and rows["a"]["miou"] == pytest.approx(MIOU)
    assert rows["b"]["status"] == "missing_a" and "not in run A" in rows["b"]["error"]
    assert rows["c"]["status"] == "missing_b"
    assert rows["f"]["status"] == "missing_a" and "decode_error: truncated file" in rows["f"]["error"]
    classes = pq.read_table(tmp_path / "r1" / "classes.parquet").to_pylist()
    np.testing.assert_allclose([c["iou"] for c in classes], IOU)
    pairs = pq.read_table(tmp_path / "r1" / "pairs.parquet").column("pixels").to_pylist()
    assert pairs == [v for row in MATRIX for v in row]
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert summary["agreement"] == pytest.approx(AGREEMENT) and summary["ignore_fraction_b"] == pytest.approx(2 / 16)
    page = (tmp_path / "r1" / "report.html").read_text()
    for section in ("summary", "categories", "class-agreement", "image-agreement", "disagreeing", "missing"):
        assert f'<section id="{section}">' in page
    assert 'id="gt-classes"' not in page and "data:image/png;base64," in page
    assert compare_runs.main([str(a), str(b), "--out", str(tmp_path / "r2")]) == 0
    for name in ("agreement", "classes", "pairs", "categories"):
        assert (tmp_path / "r1" / f"{name}.parquet").read_bytes() == (tmp_path / "r2" / f"{name}.parquet").read_bytes()


def test_cli_with_ground_truth_side_by_side(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = two_runs
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "a.png").write_bytes(pngs.encode_png(B_4x4))  # run B is the truth itself
    assert compare_runs.main([str(a), str(b), "--gt", str(gt), "--out", str(tmp_path / "r")]) == 0
    classes = pq.read_table(tmp_path / "r" / "gt_classes.parquet").to_pylist()
    # A against B_4x4 as ground truth (its 255s excluded): rows GT 0/1/2, columns A 0/1/2/255:
    #   GT 0: 3 x A 0, 1 x A 1; GT 1: 3 x A 1, 1 x A 255; GT 2: 1 x A 0, 5 x A 2  (test_audit's 4x4)
    np.testing.assert_allclose([c["iou_a"] for c in classes], [0.6, 0.6, 5 / 6])
    np.testing.assert_allclose([c["iou_b"] for c in classes], [1.0, 1.0, 1.0])
    np.testing.assert_allclose([c["iou_delta"] for c in classes], [0.4, 0.4, 1 / 6])
    images = pq.read_table(tmp_path / "r" / "gt_images.parquet").to_pylist()
    assert [r["image_id"] for r in images] == ["a"]  # only images both runs labelled
    assert images[0]["miou_a"] == pytest.approx(61 / 90) and images[0]["miou_delta"] == pytest.approx(29 / 90)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())["ground_truth"]
    assert summary["delta"]["miou"] == pytest.approx(29 / 90)
    page = (tmp_path / "r" / "report.html").read_text()
    assert '<section id="gt-classes">' in page and '<section id="gt-images">' in page


def test_cli_with_ground_truth_refuses_runs_with_other_categories(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "A", {"00000-x": [label_result("a", A_4x4)]})
    write_run(tmp_path / "B", {"00000-x": [label_result("a", B_4x4)]}, categories=[*CATS, {"id": 3, "name": "cow"}],
              tag="b")  # fmt: skip
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "a.png").write_bytes(pngs.encode_png(B_4x4))
    args = [str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "r")]
    assert compare_runs.main([*args, "--gt", str(gt)]) == 2
    assert "only in B: [3]" in capsys.readouterr().err
    assert compare_runs.main(args) == 0  # without ground truth they compare on the shared ids
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["category_ids_only_b"] == [3]
