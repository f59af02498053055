"""Audit metrics against hand-computed and directly counted figures; readers on tiny fixtures; the
CLI on a synthetic run written with the real storage code."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import audit, coco, pngs
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import IGNORE, LabelResult, run_fingerprint
from pipeline.usecases import audit as audit_masks

# The 4x4 example (classes 0, 1, 2). GT 255 pixels (two, right column, bottom rows) are excluded.
GT_4x4 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255], [2, 2, 2, 255]], np.uint8)
PRED_4x4 = np.array([[0, 1, 1, 1], [0, 0, 1, 255], [2, 2, 0, 0], [2, 2, 2, 2]], np.uint8)
# Counted by hand, rows GT 0/1/2, columns pred 0/1/2/255:
#   GT 0: 3 x pred 0, 1 x pred 1                -> 4 GT pixels
#   GT 1: 3 x pred 1, 1 x pred 255 (ignored)    -> 4
#   GT 2: 1 x pred 0, 5 x pred 2                -> 6        14 valid pixels
MATRIX_4x4 = [[3, 1, 0, 0], [0, 3, 0, 1], [1, 0, 5, 0]]
# predicted pixels: class 0: 3+1 = 4, class 1: 1+3 = 4, class 2: 5 (the 255 pixel is no class)
IOU_4x4 = [0.6, 0.6, 5 / 6]  # 3/(4+4-3), 3/(4+4-3), 5/(6+5-5)
MIOU_4x4 = 61 / 90  # (3/5 + 3/5 + 5/6) / 3 = (18 + 18 + 25) / 30 / 3
MIOU_FG_4x4 = 43 / 60  # (3/5 + 5/6) / 2
PIXEL_ACC_4x4 = 11 / 14  # (3 + 3 + 5) / 14; the ignored pixel counts as a miss
IGNORED_4x4 = 1 / 14
LABELLED_ACC_4x4 = 11 / 13  # 11 correct of the 13 pixels we labelled
PRECISION_4x4 = [0.75, 0.75, 1.0]  # 3/4, 3/4, 5/5
RECALL_4x4 = [0.75, 0.75, 5 / 6]  # 3/4, 3/4, 5/6
CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]


def test_hand_computed_4x4() -> None:
    matrix = audit.fold(audit.pair_histogram(GT_4x4, PRED_4x4), (0, 1, 2))
    assert matrix.tolist() == MATRIX_4x4
    m = audit.metrics(matrix, (0, 1, 2))
    np.testing.assert_allclose(m.iou, IOU_4x4)
    np.testing.assert_allclose(m.precision, PRECISION_4x4)
    np.testing.assert_allclose(m.recall, RECALL_4x4)
    assert m.miou == pytest.approx(MIOU_4x4) and m.miou_fg == pytest.approx(MIOU_FG_4x4)
    assert m.pixel_accuracy == pytest.approx(PIXEL_ACC_4x4)
    assert m.ignored_fraction == pytest.approx(IGNORED_4x4)
    assert m.labelled_accuracy == pytest.approx(LABELLED_ACC_4x4)
    assert m.valid_pixels == 14


def _direct(gt: np.ndarray, pred: np.ndarray, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """IoU, precision, recall per class and pixel accuracy, counted directly with np.logical_and."""
    valid = gt != IGNORE
    iou, prec, rec = [], [], []
    for c in ids:
        g, p = (gt == c) & valid, (pred == c) & valid
        inter, union = np.logical_and(g, p).sum(), np.logical_or(g, p).sum()
        iou.append(inter / union if union else np.nan)
        prec.append(inter / p.sum() if p.sum() else np.nan)
        rec.append(inter / g.sum() if g.sum() else np.nan)
    acc = np.logical_and(gt == pred, valid).sum() / valid.sum()
    return np.array(iou), np.array(prec), np.array(rec), acc


@pytest.mark.parametrize("seed", range(5))
def test_random_maps_match_direct_counts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = [0, 3, 7, 20]
    values = np.array([*ids, IGNORE], np.uint8)
    gt = values[rng.integers(0, 5, (37, 53))]
    pred = values[rng.integers(0, 5, (37, 53))]
    pred[pred == 20] = 7  # class 20 never predicted: precision undefined, IoU 0
    m = audit.metrics(audit.fold(audit.pair_histogram(gt, pred), ids), ids)
    iou, prec, rec, acc = _direct(gt, pred, ids)
    np.testing.assert_allclose(m.iou, iou)
    np.testing.assert_allclose(m.precision, prec)
    np.testing.assert_allclose(m.recall, rec)
    assert m.pixel_accuracy == pytest.approx(acc)
    assert m.miou == pytest.approx(np.nanmean(iou)) and m.miou_fg == pytest.approx(np.nanmean(iou[1:]))
    valid = gt != IGNORE
    labelled = valid & (pred != IGNORE)
    assert m.ignored_fraction == pytest.approx((valid & (pred == IGNORE)).sum() / valid.sum())
    assert m.labelled_accuracy == pytest.approx((labelled & (gt == pred)).sum() / labelled.sum())


label_maps = st.integers(0, 10_000).map(
    lambda seed: tuple(np.array([0, 1, 5, IGNORE], np.uint8)[np.random.default_rng(seed).integers(0, 4, (2, 6, 7))])
)


@settings(max_examples=30, deadline=None)
@given(st.lists(label_maps, min_size=1, max_size=8), st.integers(1, 4), st.randoms(use_true_random=False))
def test_chunked_accumulation_equals_one_shot(maps: list, chunk: int, rnd) -> None:
    ids = (0, 1, 5)
    one = audit.Audit(ids)
    for i, (gt, pred) in enumerate(maps):
        one.add(f"img{i:02d}", gt, pred)
    chunks = []
    for start in range(0, len(maps), chunk):
        part = audit.Audit(ids)
        for i in range(start, min(start + chunk, len(maps))):
            part.add(f"img{i:02d}", *maps[i])
        chunks.append(part)
    rnd.shuffle(chunks)  # merge order does not matter
    merged = audit.Audit(ids)
    for part in chunks:
        merged = merged.merge(part)
    assert np.array_equal(merged.matrix, one.matrix)
    assert merged.sorted_rows() == one.sorted_rows()


def test_errors_become_rows_and_leave_the_matrix_alone() -> None:
    a = audit.Audit((0, 1, 2))
    a.add("size", GT_4x4, PRED_4x4[:3])
    a.add("unknown", GT_4x4, np.full((4, 4), 9, np.uint8))
    assert a.matrix.sum() == 0
    rows = {r["image_id"]: r for r in a.rows}
    assert rows["size"]["status"] == rows["unknown"]["status"] == audit.ERROR
    assert "4x4" in rows["size"]["error"] and "[9]" in rows["unknown"]["error"]


def test_ranks_and_correlations() -> None:
    np.testing.assert_allclose(audit.ranks(np.array([10.0, 30.0, 20.0, 20.0])), [1, 4, 2.5, 2.5])
    rng = np.random.default_rng(0)
    x, y = rng.random(50), rng.random(50)
    d = audit.ranks(x) - audit.ranks(y)
    assert audit.spearman(x, y) == pytest.approx(1 - 6 * (d @ d) / (50 * (50**2 - 1)))  # no ties
    assert audit.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert audit.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert np.isnan(audit.pearson(x, np.ones(50)))


def test_match_categories() -> None:
    assert audit.match_categories(CATS[::-1], CATS) == CATS
    with pytest.raises(ValueError, match=r"only in the ground truth: \[3\].*'dog' vs 'horse'"):
        audit.match_categories(CATS, [CATS[0], {"id": 2, "name": "horse"}, {"id": 3, "name": "cow"}])


def test_coco_reader_paints_polygons_rle_and_overlaps() -> None:
    rle = coco.encode_masks((GT_4x4 == 2)[:, :, None])[0]
    doc = {"images": [{"id": 7, "file_name": "x/000007.jpg", "height": 4, "width": 4}],
           "categories": CATS,
           "annotations": [
               {"id": 1, "image_id": 7, "category_id": 2, "segmentation": rle, "area": 6},
               # a polygon over the top-right 2x2 block, smaller, painted after (on top of) larger ones
               {"id": 2, "image_id": 7, "category_id": 1, "segmentation": [[2, 0, 4, 0, 4, 2, 2, 2]], "area": 4},
               {"id": 3, "image_id": 7, "category_id": 2, "iscrowd": 1, "area": 16,
                "segmentation": {"size": [4, 4], "counts": [12, 4]}},  # uncompressed RLE: last column
           ]}  # fmt: skip
    source = audit.CocoLabels(doc, "tiny")
    assert source.image_ids() == ["7"]
    expected = np.where(GT_4x4 == 255, 2, GT_4x4)  # column 3 rows 2-3: the crowd region, class 2
    expected[:2, 3] = 1  # the smaller polygon is painted over the larger crowd region
    np.testing.assert_array_equal(source.read("7"), expected)
    assert audit.CocoLabels(doc, "tiny", key="file_stem").image_ids() == ["000007"]


def test_coco_reader_equals_decode_label_map_on_our_output() -> None:
    doc = coco.build_coco([("a", PRED_4x4, {1: 0.9, 2: 0.8}, "labels/a.png")], CATS)
    source = audit.CocoLabels(doc, "ours", key="source_id")
    np.testing.assert_array_equal(source.read("a"), coco.decode_label_map(doc["images"][0], doc["annotations"]))
    np.testing.assert_array_equal(source.read("a"), PRED_4x4)


def test_png_folder_reads_palette_and_grey(tmp_path: Path) -> None:
    (tmp_path / "p.png").write_bytes(pngs.encode_png(GT_4x4))
    Image.fromarray(GT_4x4, mode="L").save(tmp_path / "g.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    folder = audit.PngFolder(str(tmp_path))
    assert folder.image_ids() == ["g", "p", "rgb"]
    np.testing.assert_array_equal(folder.read("p"), GT_4x4)
    np.testing.assert_array_equal(folder.read("g"), GT_4x4)
    with pytest.raises(ValueError, match="mode RGB"):
        folder.read("rgb")


def _result(image_id: str, label_map: np.ndarray) -> LabelResult:
    h, w = label_map.shape
    rng = np.random.default_rng(len(image_id))
    return LabelResult(
        image_id=image_id, label_map=label_map, class_ids=(1, 2), coarse=rng.random((2, 3, 3), dtype=np.float32),
        compensated=rng.random((2, 4, 4), dtype=np.float32), coarse_scores=np.array([0.5, 0.6], np.float32),
        final_scores=np.array([0.7, 0.8], np.float32), kept_ids=(1, 2),
        decision=rng.random((2, h, w), dtype=np.float32), segments=None, timings={},
    )  # fmt: skip


@pytest.fixture
def synthetic_run(tmp_path: Path) -> tuple[Path, Path]:
    """Our run with images a (the 4x4 example), c (not in the GT) and failed b; GT PNGs for a and b."""
    pred = tmp_path / "run"
    store = Store.open(str(pred))
    commit.write_shard(store, "00000-test", [_result("a", PRED_4x4), _result("c", np.ones((4, 4), np.uint8))],
                        [("b", "decode_error", "truncated file")], CATS, "f" * 64)  # fmt: skip
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "a.png").write_bytes(pngs.encode_png(GT_4x4))
    (gt / "b.png").write_bytes(pngs.encode_png(GT_4x4))
    (tmp_path / "cats.json").write_text(json.dumps(CATS))
    return pred, gt


def test_cli_on_a_synthetic_run(synthetic_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    pred, gt = synthetic_run
    args = ["--pred", str(pred), "--gt", str(gt), "--categories", str(tmp_path / "cats.json")]
    assert audit_masks.main([*args, "--out", str(tmp_path / "r1")]) == 0
    out = capsys.readouterr().out
    assert "1 images scored, 1 missing in the prediction, 1 missing in the ground truth" in out
    summary = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert summary["miou"] == pytest.approx(MIOU_4x4) and summary["miou_fg"] == pytest.approx(MIOU_FG_4x4)
    assert summary["pixel_accuracy"] == pytest.approx(PIXEL_ACC_4x4)
    assert summary["labelled_accuracy"] == pytest.approx(LABELLED_ACC_4x4)
    classes = pq.read_table(tmp_path / "r1" / "classes.parquet").to_pylist()
    np.testing.assert_allclose([c["iou"] for c in classes], IOU_4x4)
    assert [c["name"] for c in classes] == ["background", "cat", "dog"]
    confusion = pq.read_table(tmp_path / "r1" / "confusion.parquet").column("pixels").to_pylist()
    assert confusion == [v for row in MATRIX_4x4 for v in row]
    images = {r["image_id"]: r for r in pq.read_table(tmp_path / "r1" / "images.parquet").to_pylist()}
    assert images["a"]["miou"] == pytest.approx(MIOU_4x4) and images["a"]["pred_ignore_pixels"] == 1
    assert images["b"]["status"] == "missing_pred" and "decode_error: truncated file" in images["b"]["error"]
    assert images["c"]["status"] == "missing_gt"
    stats = {r["stat"]: r for r in pq.read_table(tmp_path / "r1" / "correlations.parquet").to_pylist()}
    assert stats["ignore_fraction"]["n"] == 1  # one scored image: correlation undefined, not made up
    # deterministic: a second run writes byte-identical tables
    assert audit_masks.main([*args, "--out", str(tmp_path / "r2")]) == 0
    for name in ("images", "classes", "confusion", "correlations"):
        assert (tmp_path / "r1" / f"{name}.parquet").read_bytes() == (tmp_path / "r2" / f"{name}.parquet").read_bytes()


def test_run_audit_reads_and_writes_through_fsspec(synthetic_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The run, the ground truth, the categories and the report all under a memory:// prefix (as
    under s3://): the same bytes as the audit of local folders."""
    import fsspec

    pred, gt = synthetic_run
    local = audit_masks.run_audit(str(pred), str(gt), str(tmp_path / "local"), categories=str(tmp_path / "cats.json"))
    mem = fsspec.filesystem("memory")
    for folder, name in ((pred, "pred"), (gt, "gt")):
        for f in folder.rglob("*"):
            if f.is_file():
                mem.pipe_file(f"/audit-test/{name}/{f.relative_to(folder)}", f.read_bytes())
    mem.pipe_file("/audit-test/cats.json", (tmp_path / "cats.json").read_bytes())
    try:
        remote = audit_masks.run_audit("memory://audit-test/pred", "memory://audit-test/gt", "memory://audit-test/out",
                                       categories="memory://audit-test/cats.json")  # fmt: skip
        assert remote.summary == local.summary and local.summary["images_scored"] == 1
        for name in ("images.parquet", "classes.parquet", "confusion.parquet", "correlations.parquet",
                     "summary.json"):  # fmt: skip
            assert mem.cat_file(f"/audit-test/out/{name}") == (tmp_path / "local" / name).read_bytes(), name
        assert mem.cat_file("/audit-test/out/report.html").startswith(b"<!DOCTYPE html>")
    finally:
        mem.rm("/audit-test", recursive=True)


def test_cli_refuses_disagreeing_categories(synthetic_run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    pred, gt = synthetic_run
    (tmp_path / "other.json").write_text(json.dumps([{"id": 1, "name": "cat"}, {"id": 3, "name": "cow"}]))
    args = ["--pred", str(pred), "--gt", str(gt), "--categories", str(tmp_path / "other.json"), "--out", str(tmp_path)]
    assert audit_masks.main(args) == 2
    assert "categories disagree" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_and_serial_audits_write_identical_tables(synthetic_run: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess

    pred, gt = synthetic_run
    args = [sys.executable, "jobs/audit_masks.py", "--pred", str(pred), "--gt", str(gt),
            "--categories", str(tmp_path / "cats.json")]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(root)}
    for out, extra in (("serial", []), ("ray", ["--ray"])):
        proc = subprocess.run([*args, "--out", str(tmp_path / out), *extra], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("images", "classes", "confusion", "correlations"):
        assert (tmp_path / "serial" / f"{name}.parquet").read_bytes() == (
            tmp_path / "ray" / f"{name}.parquet"
        ).read_bytes()


# --- pairing real layouts (issue 11, section 3) and stale shards (issue 12) ---

COCO_NAMES = {"139": "000000000139.jpg", "285": "000000000285.jpg"}


def _coco_style_run(prefix: Path, fingerprint: str = "f" * 64, shard: str = "00000-test") -> Store:
    """A run as label_coco.py writes it from a COCO file: ids 139 and 285, files 000000000139.jpg, ..."""
    from pipeline import manifest

    records = [{"id": i, "uri": f"/coco/val2017/{n}", "file_name": n, "tags": [1, 2]} for i, n in COCO_NAMES.items()]
    store = Store.open(str(prefix))
    names = next(manifest.shards(records, 10)).names
    commit.write_shard(store, shard, [_result("139", PRED_4x4), _result("285", PRED_4x4)], [], CATS, fingerprint,
                        names)  # fmt: skip
    return store


@pytest.mark.parametrize("given_categories", [False, True])
def test_cli_pairs_png_ground_truth_by_file_stem(given_categories: bool, tmp_path: Path, capsys) -> None:
    """Without --categories the run's own are used; with them, pairing is what is tested."""
    pred = tmp_path / "run"
    _coco_style_run(pred)
    gt = tmp_path / "stuffthingmaps"
    gt.mkdir()
    for name in COCO_NAMES.values():  # ground truth named like the images, as COCO-Stuff and VOC name them
        (gt / name.replace(".jpg", ".png")).write_bytes(pngs.encode_png(GT_4x4))
    (tmp_path / "cats.json").write_text(json.dumps(CATS))
    extra = ["--categories", str(tmp_path / "cats.json")] if given_categories else []
    assert audit_masks.main(["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "r"), *extra]) == 0
    out = capsys.readouterr().out
    assert "2 images scored, 0 missing in the prediction, 0 missing in the ground truth" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["miou"] == pytest.approx(MIOU_4x4) and summary["pixel_accuracy"] == pytest.approx(PIXEL_ACC_4x4)
    images = pq.read_table(tmp_path / "r" / "images.parquet").to_pylist()
    assert [r["image_id"] for r in images] == ["139", "285"]  # rows keep our ids (they join the stats)
    classes = pq.read_table(tmp_path / "r" / "classes.parquet").column("name").to_pylist()
    assert classes == ["background", "cat", "dog"]


def test_cli_stops_when_nothing_pairs_and_shows_both_sides(tmp_path: Path, capsys) -> None:
    pred = tmp_path / "run"
    _coco_style_run(pred)
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "IMG_0001.png").write_bytes(pngs.encode_png(GT_4x4))
    (tmp_path / "cats.json").write_text(json.dumps(CATS))
    args = ["--pred", str(pred), "--gt", str(gt), "--categories", str(tmp_path / "cats.json")]
    assert audit_masks.main([*args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "no image pairs" in err and "'139'" in err and "'000000000139'" in err and "'IMG_0001'" in err
    assert "--pred-key" in err and "--gt-key" in err
    assert not (tmp_path / "r").exists()


def test_cocostuff_maps_store_id_minus_one(tmp_path: Path) -> None:
    # COCO-Stuff stuffthingmaps: 0 is person (id 1), 1 bicycle (id 2), 181 wood (id 182), 255 unlabeled
    stored = np.array([[0, 0, 1, 255], [181, 0, 1, 1]], np.uint8)
    Image.fromarray(stored, mode="L").save(tmp_path / "000000000139.png")
    everything = audit.CocoStuffFolder(str(tmp_path))
    np.testing.assert_array_equal(everything.read("000000000139"), [[1, 1, 2, 255], [182, 1, 2, 2]])
    things = audit.CocoStuffFolder(str(tmp_path), keep=[1, 2])  # a run over two thing classes: wood is background
    np.testing.assert_array_equal(things.read("000000000139"), [[1, 1, 2, 255], [0, 1, 2, 2]])


def test_cli_audits_against_cocostuff_maps(tmp_path: Path) -> None:
    pred = tmp_path / "run"
    _coco_style_run(pred)
    gt = tmp_path / "cocostuff"
    gt.mkdir()
    stored = np.where(GT_4x4 == 255, 255, np.where(GT_4x4 == 0, 120, GT_4x4 - 1)).astype(np.uint8)  # 120: stuff
    for name in COCO_NAMES.values():
        Image.fromarray(stored, mode="L").save(gt / name.replace(".jpg", ".png"))
    args = ["--pred", str(pred), "--gt", str(gt), "--out", str(tmp_path / "r")]
    assert audit_masks.main([*args, "--gt-format", "cocostuff"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["images_scored"] == 2 and summary["miou"] == pytest.approx(MIOU_4x4)
    assert audit_masks.main(args) == 0  # read as plain ids, the same maps score differently
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["images_error"] == 2  # 120 is no category


def test_open_run_audits_only_the_runs_shards(tmp_path: Path) -> None:
    from pipeline.config import Config

    store = _coco_style_run(tmp_path / "run", fingerprint="a" * 64, shard="00000-stale")  # before --overwrite
    run = run_fingerprint(Config().fingerprint(), {"clip": {"sha256": "ab"}}, "b" * 64)
    commit.write_run(store, run, Config().to_dict(), {"clip": {"sha256": "ab"}})
    commit.write_shard(store, "00001-new", [_result("7", PRED_4x4)], [], CATS, run.digest)
    opened = audit.open_run(str(tmp_path / "run"))
    assert list(opened.shards) == ["00001-new"] and opened.ignored_shards == 1
    assert sorted(k for s in opened.shards.values() for k in s.image_ids()) == ["7"]


def test_a_ground_truth_annotation_without_segmentation_is_an_error_row() -> None:
    doc = {"images": [{"id": 7, "file_name": "7.jpg", "height": 4, "width": 4}], "categories": CATS,
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2]}]}  # fmt: skip
    ours = coco.build_coco([("7", PRED_4x4, {1: 0.9, 2: 0.8}, "7.jpg")], CATS)
    pred, gt = audit.CocoLabels(ours, "ours", "source_id"), audit.CocoLabels(doc, "gt")
    row = audit.audit_images(pred, gt, ["7"], (0, 1, 2)).rows[0]
    assert row["status"] == audit.ERROR and "annotation 1 of image 7 has no segmentation" in row["error"]
