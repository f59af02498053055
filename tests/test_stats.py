import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import schemas, stats
from pipeline.types import Failure, LabelResult


def hand_made_result(segments: bool = True) -> LabelResult:
    """4 x 4 image, candidates (3, 7, 9); kept (3, 7). Class 3 fills the left half, class 7 the
    top-right quarter, one pixel of the bottom-right quarter is ignore, the rest background."""
    lm = np.zeros((4, 4), np.uint8)
    lm[:, :2] = 3
    lm[:2, 2:] = 7
    lm[3, 3] = 255
    decision = np.zeros((2, 4, 4), np.float32)
    decision[0, :, :2] = [[0.5, 0.7], [0.5, 0.7], [0.5, 0.7], [0.5, 0.7]]  # mean 0.6, std 0.1
    decision[1, :2, 2:] = 0.9  # mean 0.9, std 0
    coarse = np.zeros((3, 2, 2), np.float32)
    coarse[0] = 1.0  # class 3 wins every coarse cell
    refined = np.zeros((3, 2, 2), np.float32)
    refined[0, :, 0] = 1.0
    refined[1, :, 1] = 1.0  # class 7 wins the right column: agreement 0.5
    seg = np.zeros((4, 4), np.int32)
    seg[:, 2:] = 1  # left superpixel pure (8/8), right one holds 4x7, 3x0, 1x255: purity (8 + 4) / 16
    return LabelResult(
        image_id="img/1", label_map=lm, class_ids=(3, 7, 9), coarse=coarse, compensated=refined,
        coarse_scores=np.array([0.8, 0.6, 0.1], np.float32), final_scores=np.array([0.9, 0.7, 0.2], np.float32),
        kept_ids=(3, 7), decision=decision, segments=seg if segments else None,
        timings={"clip_coarse": 0.25, "superpixels": 0.125},
    )  # fmt: skip


def test_image_row_by_hand():
    row = stats.image_row(hand_made_result(), "s1", "labels/x.png")
    assert row == {
        "shard_id": "s1", "image_id": "img/1", "status": "ok", "error": None, "label_file": "labels/x.png",
        "height": 4, "width": 4, "n_candidates": 3, "n_kept": 2,
        "background_fraction": 3 / 16, "ignore_fraction": 1 / 16, "coarse_refined_agreement": 0.5,
        "superpixel_purity": 12 / 16, "n_superpixels": 2,
    }  # fmt: skip


def test_without_superpixels_purity_is_null():
    row = stats.image_row(hand_made_result(segments=False), "s1", None)
    assert row["superpixel_purity"] is None and row["n_superpixels"] is None


def test_class_rows_by_hand():
    rows = stats.class_rows(hand_made_result(), "s1")
    assert [(r["category_id"], r["kept"], r["pixel_area"], r["pixel_fraction"]) for r in rows] == [
        (3, True, 8, 0.5),
        (7, True, 4, 0.25),
        (9, False, 0, 0.0),
    ]
    assert rows[0]["win_score_mean"] == pytest.approx(0.6) and rows[0]["win_score_std"] == pytest.approx(0.1)
    assert rows[1]["win_score_mean"] == pytest.approx(0.9) and rows[1]["win_score_std"] == 0.0
    assert rows[2]["win_score_mean"] is None and rows[2]["win_score_std"] is None
    assert [r["class_score"] for r in rows] == pytest.approx([0.9, 0.7, 0.2])
    assert [r["coarse_score"] for r in rows] == pytest.approx([0.8, 0.6, 0.1])


def test_agreement_resizes_coarse_to_refined_grid():
    coarse = np.stack([np.full((2, 2), 0.6), np.full((2, 2), 0.4)]).astype(np.float32)
    refined = np.zeros((2, 8, 8), np.float32)
    refined[1, :, :2] = 1.0  # class 1 wins a quarter of the refined grid
    assert stats.coarse_refined_agreement(coarse, refined) == 0.75
    assert stats.coarse_refined_agreement(np.zeros((0, 2, 2)), np.zeros((0, 4, 4))) is None
    with pytest.raises(ValueError, match="same C"):
        stats.coarse_refined_agreement(coarse, refined[:1])


def test_timing_rows_sorted_by_stage():
    rows = stats.timing_rows(hand_made_result(), "s1")
    assert [(r["stage"], r["seconds"]) for r in rows] == [("clip_coarse", 0.25), ("superpixels", 0.125)]


def test_failed_row_and_failure_checks():
    row = stats.failed_row(Failure("bad.jpg", "decode_error", "truncated JPEG"), "s1")
    assert row["status"] == "decode_error" and row["error"] == "truncated JPEG" and row["height"] is None
    assert set(row) == set(schemas.STATS_IMAGES.names)
    with pytest.raises(ValueError, match="other than 'ok'"):
        Failure("x", "ok", "")
    with pytest.raises(ValueError, match="non-empty string image id"):
        Failure("", "decode_error", "")


def test_mismatched_decision_shape_is_rejected():
    r = hand_made_result()
    r.decision = r.decision[:1]
    with pytest.raises(ValueError, match=r"\[K, H, W\] = \[2, 4, 4\]"):
        stats.image_row(r, "s1", None)


def test_parquet_is_byte_deterministic_and_typed():
    r = hand_made_result()
    rows = stats.class_rows(r, "s1")
    first = stats.parquet_bytes(stats.to_table("stats_classes", rows))
    second = stats.parquet_bytes(stats.to_table("stats_classes", stats.class_rows(hand_made_result(), "s1")))
    assert first == second
    table = pq.read_table(io.BytesIO(first))
    schemas.check_table("stats_classes", table)
    assert table.to_pylist() == rows
    assert table.schema.metadata[b"tag2mask.schema"] == b"tag2mask/stats-classes/v1"


def test_row_groups_follow_the_requested_size():
    rows = [stats.failed_row(Failure(f"i{i}", "decode_error", "x"), "s") for i in range(10)]
    meta = pq.ParquetFile(io.BytesIO(stats.parquet_bytes(stats.to_table("stats_images", rows), 4))).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]


def test_bad_segments_are_rejected():
    r = hand_made_result()
    r.segments = r.segments - 1
    with pytest.raises(ValueError, match="non-negative"):
        stats.image_row(r, "s1", None)
