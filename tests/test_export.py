"""Exports loaded back with the tools' own readers (Label Studio SDK's brush RLE decoder) or, where
the tool's importer is not installed in CI (FiftyOne needs MongoDB; CVAT is a server), read as
their documented layouts say, and compared pixel for pixel with the run's label maps."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from pipeline import export
from pipeline.review.decisions import DecisionLog
from pipeline.review.run import open_review_run
from tests.review_data import IMAGES, interleaved, label_maps, make_run, review_run, tree_digest  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
# class scores by image (review_data.painted: the tags' scores are linspace(0.9, 0.3) in tag order)
SCORES = {"cat-0": {1: 0.9}, "dog-1": {7: 0.9}, "both-2": {1: 0.9, 7: 0.3}, "person-3": {15: 0.9},
          "three-4": {1: 0.9, 7: 0.6, 15: 0.3}}  # fmt: skip


@pytest.fixture
def run_copy(review_run, tmp_path) -> Path:  # noqa: F811
    shutil.copytree(review_run.parent, tmp_path / "copy", ignore=shutil.ignore_patterns("tiny*"))
    return tmp_path / "copy" / "run"


def _reject(run: Path, image_id: str) -> None:
    DecisionLog(open_review_run(str(run)), "t").record(image_id, "reject", "wrong class")


def _ls_masks(task: dict) -> dict[int, np.ndarray]:
    """Label Studio task -> {category id: bool mask}, decoded by the Label Studio SDK."""
    names = {"cat": 1, "dog": 7, "person": 15}
    out = {}
    for r in task["predictions"][0]["result"]:
        assert r["type"] == "brushlabels" and r["value"]["format"] == "rle"
        rgba = decode_rle(r["value"]["rle"]).reshape(r["original_height"], r["original_width"], 4)
        out[names[r["value"]["brushlabels"][0]]] = rgba[:, :, 3] == 255
    return out


def test_label_studio_predictions_decode_to_the_label_maps(run_copy, tmp_path):
    maps = label_maps(run_copy)
    summary = export.export(str(run_copy), "labelstudio", tmp_path / "ls")
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert summary.exported == 5 == len(tasks)
    for task in tasks:
        lm = maps[task["data"]["image_id"]]
        masks = _ls_masks(task)
        assert sorted(masks) == sorted(set(np.unique(lm).tolist()) - {0, 255})
        for cid, mask in masks.items():
            assert np.array_equal(mask, lm == cid)
        # the least sure class present decides the task's score, so the Data Manager sorts doubt first
        assert task["predictions"][0]["score"] == pytest.approx(min(SCORES[task["data"]["image_id"]].values()))
        assert Path(task["data"]["image"]).name == f"{task['data']['image_id']}.png"
    config = (tmp_path / "ls" / "label_config.xml").read_text()
    assert '<BrushLabels name="label" toName="image">' in config and '<Label value="person"' in config


def test_rejected_images_are_left_out_or_tagged(run_copy, tmp_path):
    _reject(run_copy, "both-2")
    skipped = export.export(str(run_copy), "labelstudio", tmp_path / "skip")
    ids = [t["data"]["image_id"] for t in json.loads((tmp_path / "skip" / "tasks.json").read_text())]
    assert "both-2" not in ids and len(ids) == 4 and skipped.rejected_skipped == 1
    export.export(str(run_copy), "labelstudio", tmp_path / "tag", rejected="tag")
    tagged = {
        t["data"]["image_id"]: t["data"].get("review")
        for t in json.loads((tmp_path / "tag" / "tasks.json").read_text())
    }
    assert tagged["both-2"] == "reject" and len(tagged) == 5
    export.export(str(run_copy), "cvat", tmp_path / "cvat", rejected="tag")
    assert (tmp_path / "cvat" / "rejected.txt").read_text() == "both-2\n"
    export.export(str(run_copy), "fiftyone", tmp_path / "fo", rejected="skip")
    assert not (tmp_path / "fo" / "labels" / "both-2.png").exists()


def _labelmap(path: Path) -> dict[tuple[int, int, int], str]:
    colours = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, rgb, parts, actions = line.split(":")
            colours[tuple(int(v) for v in rgb.split(","))] = name
    return colours


def test_cvat_segmentation_masks_decode_through_labelmap(run_copy, tmp_path):
    maps = label_maps(run_copy)
    export.export(str(run_copy), "cvat", tmp_path / "cvat")
    colours = _labelmap(tmp_path / "cvat" / "labelmap.txt")
    ids = {"background": 0, "cat": 1, "dog": 7, "person": 15, "ignore": 255}
    assert sorted(colours.values()) == sorted(ids) and len(colours) == len(ids)  # distinct colours
    stems = (tmp_path / "cvat" / "ImageSets" / "Segmentation" / "default.txt").read_text().split()
    assert stems == sorted(maps)
    for stem in stems:
        rgb = np.array(Image.open(tmp_path / "cvat" / "SegmentationClass" / f"{stem}.png").convert("RGB"))
        decoded = np.zeros(rgb.shape[:2], np.uint8)
        for colour, name in colours.items():
            decoded[(rgb == colour).all(axis=2)] = ids[name]
        assert np.array_equal(decoded, maps[stem])


def test_fiftyone_segmentation_directory_layout(run_copy, tmp_path):
    """FiftyOne's ImageSegmentationDirectory: data/<stem>.<ext> beside labels/<stem>.png whose pixel
    values are the targets of mask_targets (fiftyone.types docs). FiftyOne's importer needs a
    MongoDB, which fiftyone-db cannot fetch here, so the documented layout is checked instead."""
    maps = label_maps(run_copy)
    summary = export.export(str(run_copy), "fiftyone", tmp_path / "fo")
    out = tmp_path / "fo"
    assert summary.exported == 5 and not summary.missing_pictures
    assert sorted(p.stem for p in (out / "data").iterdir()) == sorted(p.stem for p in (out / "labels").iterdir())
    targets = {int(k): v for k, v in json.loads((out / "mask_targets.json").read_text()).items()}
    assert targets == {0: "background", 1: "cat", 7: "dog", 15: "person", 255: "ignore"}
    fields = json.loads((out / "fields.json").read_text())
    stats = {r["image_id"]: r for r in ds.dataset(run_copy / "merged" / "stats_images").to_table().to_pylist()}
    for stem, lm in maps.items():
        mask = Image.open(out / "labels" / f"{stem}.png")
        assert mask.mode in ("L", "P") and np.array_equal(np.array(mask), lm)
        assert (out / "data" / f"{stem}.png").read_bytes() == (run_copy.parent / "images" / f"{stem}.png").read_bytes()
        assert fields[stem]["ignore_fraction"] == stats[stem]["ignore_fraction"]
        assert fields[stem]["score"] == pytest.approx(min(SCORES[stem].values()))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1), st.floats(0, 1))
def test_brush_rle_round_trips_through_the_label_studio_decoder(h, w, seed, density):
    mask = np.random.default_rng(seed).random((h, w)) < density
    rgba = decode_rle(export.brush_rle(mask)).reshape(h, w, 4)
    assert np.array_equal(rgba[:, :, 3] == 255, mask) and np.array_equal(rgba[:, :, 3] == 0, ~mask)


def test_brush_rle_splits_runs_longer_than_its_widest_length_field():
    mask = np.ones((300, 300), bool)  # 360000 equal bytes: over 2**16, so several chunks
    mask[150, 7] = False
    assert np.array_equal(decode_rle(export.brush_rle(mask)).reshape(300, 300, 4)[:, :, 3] == 255, mask)


def _job():
    from pipeline.usecases import export as command

    return command


def test_misuse_is_refused_with_a_sentence(run_copy, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown export format 'coco'; choose one of"):
        export.export(str(run_copy), "coco", tmp_path / "x")
    with pytest.raises(ValueError, match="--rejected must be one of"):
        export.export(str(run_copy), "cvat", tmp_path / "x", rejected="drop")
    assert _job().main([str(tmp_path / "nothing"), "--to", "cvat", "--out", str(tmp_path / "x")]) == 2
    assert "no shards committed" in capsys.readouterr().err


def test_export_job_prints_what_it_wrote(run_copy, tmp_path, capsys):
    assert _job().main([str(run_copy), "--to", "labelstudio", "--out", str(tmp_path / "ls")]) == 0
    assert "labelstudio: 5 images exported" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "ls" / "tasks.json").read_text())) == len(IMAGES) - 1


@pytest.mark.parametrize("fmt", sorted(export.EXPORTERS))
def test_an_export_is_byte_identical_when_repeated(run_copy, tmp_path, fmt):
    _reject(run_copy, "dog-1")
    export.export(str(run_copy), fmt, tmp_path / "a", rejected="tag")
    export.export(str(run_copy), fmt, tmp_path / "b", rejected="tag")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != {}


@pytest.fixture(scope="module")
def interleaved_run(tmp_path_factory, tiny_config) -> Path:
    """65 shards of two images, the manifest not in id order (``review_data.interleaved``)."""
    images, shards = interleaved(65)
    return make_run(tmp_path_factory.mktemp("interleaved"), tiny_config, images, shards, size=(12, 12))


def test_an_export_reads_each_shards_coco_file_once(interleaved_run, tmp_path, monkeypatch):
    """Images are exported in id order, which visits all 65 shards before any shard's second
    image: each shard's annotations.json is still read once (more shards than any cache holds)."""
    run = open_review_run(str(interleaved_run))
    reads: list[str] = []
    read = run.store.read

    def counting(rel: str) -> bytes | None:
        reads.append(rel)
        return read(rel)

    monkeypatch.setattr(run.store, "read", counting)
    summary = export.export(run, "labelstudio", tmp_path / "ls", images="/pictures")
    coco = sorted(r for r in reads if r.endswith("/annotations.json"))
    assert len(run.shards) == 65 and summary.exported == 130
    assert coco == sorted(set(coco)) and len(coco) == 65
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["image_id"] for t in tasks] == [f"im-{i:03d}" for i in range(130)]
    assert all(t["data"]["image"].rsplit("/", 1)[-1] == f"{t['data']['image_id']}.png" for t in tasks)


def _idat(png: bytes) -> bytes:
    return b"".join(body for kind, body in export._chunks(png) if kind == b"IDAT")


def test_fiftyone_masks_are_the_runs_label_pngs_made_greyscale(run_copy, tmp_path, monkeypatch):
    """FiftyOne reads masks with OpenCV (IMREAD_UNCHANGED), which turns an indexed PNG into
    colours, so the run's PNGs cannot be copied as they are: they go out as greyscale PNGs holding
    the same compressed rows, with nothing encoded again."""
    from PIL import Image as PILImage

    def no_encoding(*args, **kwargs):
        raise AssertionError("a FiftyOne mask was encoded again")

    monkeypatch.setattr(PILImage.Image, "save", no_encoding)
    summary = export.export(str(run_copy), "fiftyone", tmp_path / "fo")
    monkeypatch.undo()
    maps = label_maps(run_copy)
    stats = {r["image_id"]: r for r in ds.dataset(run_copy / "merged" / "stats_images").to_table().to_pylist()}
    assert summary.exported == len(maps) == 5
    for stem, lm in maps.items():
        written = (tmp_path / "fo" / "labels" / f"{stem}.png").read_bytes()
        mask = Image.open(tmp_path / "fo" / "labels" / f"{stem}.png")
        assert mask.mode == "L" and mask.palette is None and np.array_equal(np.array(mask), lm)
        assert _idat(written) == _idat((run_copy / stats[stem]["label_file"]).read_bytes())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 2**32 - 1), st.integers(1, 256))
def test_grey_png_keeps_every_label_value(h, w, seed, values):
    from pipeline.pngs import encode_png

    lm = np.random.default_rng(seed).integers(0, values, (h, w)).astype(np.uint8)
    grey = Image.open(io.BytesIO(export.grey_png(encode_png(lm))))
    assert grey.mode == "L" and np.array_equal(np.array(grey), lm)


def test_grey_png_declines_what_it_cannot_convert():
    """Anything but an 8-bit indexed PNG: None, and the exporter encodes the label map itself."""
    lm = np.arange(12, dtype=np.uint8).reshape(3, 4)
    pngs = {}
    for name, image, options in (("grey", Image.fromarray(lm), {}), ("4-bit", Image.fromarray(lm).convert("P"),
                                                                      {"bits": 4})):  # fmt: skip
        buf = io.BytesIO()
        image.save(buf, format="PNG", **options)
        pngs[name] = buf.getvalue()
    assert pngs["4-bit"][24:26] == b"\x04\x03"  # really 4 bits a pixel, indexed (IHDR)
    for name, data in {**pngs, "junk": b"not a png", "cut short": pngs["grey"][:30]}.items():
        assert export.grey_png(data) is None, name
