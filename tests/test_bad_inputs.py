"""Issue 6, bad inputs: every awkward image gets what a user expects (converted, upright and
labeled where usable; a stats row with a status and a message otherwise) and nothing else in the
shard is lost; manifest problems are reported before any model is loaded."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline import manifest
from pipeline.config import build_config
from pipeline.labeler import Labeler
from pipeline.shards import label_shard
from pipeline.storage import layout
from pipeline.storage.merge import merge
from pipeline.storage.store import Store
from tests.bad_inputs import PIXEL_LIMIT, REFUSED, UPRIGHT, USABLE, write_corpus
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
CATS = [{"id": 1, "name": "chat noir"}, {"id": 7, "name": "狗"}, {"id": 15, "name": "person"}]
ESCAPING_IDS = ["../../outside/x", "/etc/passwd", "a/../../b", "画像 1", ".hidden"]
FP = "c" * 64


def _records(folder: Path) -> list[dict]:
    recs = [{"id": f"usable-{name}", "uri": str(folder / name), "tags": ["狗", 1]} for name in USABLE]
    recs += [{"id": f"refused-{name}", "uri": str(folder / name), "tags": [15]} for name, _, _ in REFUSED]
    recs.append({"id": "no-tags", "uri": str(folder / "gray.png"), "tags": []})
    recs += [{"id": rid, "uri": str(folder / "palette.png"), "tags": ["person"]} for rid in ESCAPING_IDS]
    return recs


@pytest.fixture(scope="module")
def corpus_run(labeler, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    write_corpus(tmp / "img")
    (tmp / "m.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _records(tmp / "img")))
    cats = manifest.categories_from(CATS, "test categories", "voc")
    records = list(manifest.read_jsonl(str(tmp / "m.jsonl"), cats))  # names -> ids
    config = build_config("voc-vit-b16", {**tiny_overrides_of(labeler), "max_pixels": PIXEL_LIMIT})
    lab = Labeler(labeler.clip, labeler.sd, config, cats)
    shard = next(manifest.shards(records, len(records)))
    store = Store.open(str(tmp / "out"))
    marker = label_shard(lab, store, shard, FP)
    rows = pq.read_table(tmp / "out" / "shards" / shard.shard_id / "stats_images.parquet").to_pylist()
    return {"tmp": tmp, "lab": lab, "marker": marker, "rows": {r["image_id"]: r for r in rows},
            "records": records, "store": store, "shard": shard}  # fmt: skip


def tiny_overrides_of(labeler: Labeler) -> dict:
    m = labeler.config.model
    paths = {"clip_config": m.clip.model, "clip_checkpoint": m.clip.checkpoint, "sd_dir": m.sd.checkpoint}
    return tiny_overrides(paths)


def _label_map(out: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(out / row["label_file"]))


def test_names_and_non_ascii_tags_resolve_to_category_ids(corpus_run):
    by_id = {r["id"]: r for r in corpus_run["records"]}
    assert by_id["usable-图像.png"]["tags"] == [7, 1]
    assert by_id["画像 1"]["tags"] == [15]


def test_unusable_images_become_rows_with_a_status_and_message(corpus_run):
    rows = corpus_run["rows"]
    for name, status, words in REFUSED:
        row = rows[f"refused-{name}"]
        assert (row["status"], row["label_file"]) == (status, None), name
        assert words in row["error"] and name in row["error"], row["error"]
    counts = corpus_run["marker"]["counts"]
    assert counts["failed"] == len(REFUSED)
    assert counts["ok"] == counts["images"] - len(REFUSED) == len(corpus_run["records"]) - len(REFUSED)


def test_usable_images_are_converted_and_labeled_with_their_tags(corpus_run):
    out, rows = corpus_run["tmp"] / "out", corpus_run["rows"]
    for name in USABLE:
        row = rows[f"usable-{name}"]
        assert row["status"] == "ok", (name, row["error"])
        stored = Image.open(corpus_run["tmp"] / "img" / name)
        expected = UPRIGHT if name == "exif_rotated.jpg" else (stored.height, stored.width)
        label = _label_map(out, row)
        assert label.shape == expected, name
        assert set(np.unique(label)) <= {0, 1, 7, 255}, name
    assert set(np.unique(_label_map(out, rows["no-tags"]))) == {0}  # no tags: all background


def test_exif_rotated_image_is_labeled_like_the_upright_image(corpus_run):
    """The EXIF file against a lossless PNG of its pixels turned upright by hand, each alone in a
    shard with the same id (batch composition can move boundary pixels, so it is kept equal)."""
    from tests.bad_inputs import exif_rotated_jpeg

    tmp, lab = corpus_run["tmp"], corpus_run["lab"]
    stored = np.asarray(Image.open(io.BytesIO(exif_rotated_jpeg())).convert("RGB"))  # sideways, EXIF ignored
    Image.fromarray(np.rot90(stored, k=-1)).save(tmp / "upright_by_hand.png")  # orientation 6: 90 degrees clockwise
    maps = []
    for name in ("exif_rotated.jpg", "upright_by_hand.png"):
        record = {"id": "rotated", "uri": str(tmp / ("img/" + name if name.endswith("jpg") else name)), "tags": [7, 1]}
        store = Store.open(str(tmp / f"out-{name}"))
        shard = next(manifest.shards([record], 1))
        label_shard(lab, store, shard, FP)
        maps.append(np.asarray(Image.open(tmp / f"out-{name}" / layout.label_file(shard.names["rotated"].label))))
    assert maps[0].shape == UPRIGHT
    np.testing.assert_array_equal(maps[0], maps[1])
    assert len(np.unique(maps[0])) > 1  # a uniform map would make the comparison empty


def test_ids_that_would_escape_the_prefix_stay_inside_it(corpus_run):
    out = (corpus_run["tmp"] / "out").resolve()
    for rid in ESCAPING_IDS:
        row = corpus_run["rows"][rid]
        assert row["status"] == "ok" and row["label_file"].startswith("labels/")
        assert ".." not in row["label_file"].split("/") and "/" not in row["label_file"][len("labels/") :]
        assert (out / row["label_file"]).resolve().parent == out / "labels"
    assert not (corpus_run["tmp"] / "outside").exists()
    assert all(p.resolve().is_relative_to(out) for p in out.rglob("*"))


def test_the_shard_is_complete_and_readable_by_coco_tools(corpus_run):
    store, shard = corpus_run["store"], corpus_run["shard"]
    merge(store, [shard.shard_id], FP)
    api = COCO(str(corpus_run["tmp"] / "out" / "merged" / "annotations.json"))
    ok = [r for r in corpus_run["rows"].values() if r["status"] == "ok"]
    assert len(api.getImgIds()) == len(ok)
    assert {c["name"] for c in api.loadCats(api.getCatIds())} == {"chat noir", "狗", "person"}
    assert len(list((corpus_run["tmp"] / "out" / "labels").glob("*.png"))) == len(ok)


# --- manifest problems: found in one scan, before any model is loaded ---


def _job(tmp: Path, tiny_paths: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "jobs/label_coco.py", "--output", str(tmp / "out"),
           "--clip-model", str(tiny_paths["clip_config"]), "--clip-checkpoint", str(tiny_paths["clip_checkpoint"]),
           "--sd-checkpoint", str(tiny_paths["sd_dir"]), "--device", "cpu", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_manifest_problem_is_reported_before_any_work(tmp_path, tiny_paths):
    write_corpus(tmp_path / "img")
    good = str(tmp_path / "img" / "gray.png")
    lines = [
        json.dumps({"id": "a", "uri": good, "tags": [1]}),
        json.dumps({"id": "a", "uri": good, "tags": [7]}),  # line 2: duplicate id
        json.dumps({"id": "b", "uri": good, "tags": [99]}),  # line 3: unknown id
        json.dumps({"id": "c", "uri": good, "tags": ["licorne"]}),  # line 4: unknown name
        '{"id": "d", "uri": ',  # line 5: not JSON
        json.dumps({"id": "e", "uri": good, "tags": [""]}),  # line 6: empty tag
        json.dumps({"id": "f", "uri": good, "tags": ["狗"]}),  # fine
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "cats.json").write_text(json.dumps(CATS, ensure_ascii=False), encoding="utf-8")
    proc = _job(tmp_path, tiny_paths, "--manifest", str(tmp_path / "m.jsonl"), "--categories",
                str(tmp_path / "cats.json"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "5 manifest record(s) cannot be used; nothing was labeled" in err and "Traceback" not in err
    assert "line 2 (id 'a'): field 'id' repeats" in err
    assert "line 3 (id 'b'): field 'tags/0': 99 is not a category id" in err
    assert "line 4 (id 'c'): field 'tags/0': 'licorne' is not a category name" in err
    assert "line 5 (id None): not valid JSON" in err
    assert "line 6 (id 'e')" in err and "field 'tags/0'" in err
    assert "line 7" not in err and "line 1 " not in err
    assert not (tmp_path / "out").exists()  # nothing written, no model loaded, no Ray started


def test_bad_categories_and_a_missing_image_folder_stop_before_any_work(tmp_path, tiny_paths):
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "uri": str(tmp_path / "nowhere" / "a.jpg"),
                                                  "tags": [1]}) + "\n")  # fmt: skip
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "cat"}, {"id": 255, "name": "x"}]))
    args = ["--manifest", str(tmp_path / "m.jsonl"), "--categories", str(tmp_path / "cats.json")]
    proc = _job(tmp_path, tiny_paths, *args)
    assert proc.returncode == 2 and "entry 1: field 'id' must be an integer in 1..254, got 255" in proc.stderr
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "cat"}]))
    proc = _job(tmp_path, tiny_paths, *args)
    assert proc.returncode == 2 and "and so is its folder" in proc.stderr and "check --images" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_credentials_on_the_command_line_are_refused(tmp_path, tiny_paths):
    proc = _job(tmp_path, tiny_paths, "--annotations", "x.json", "--images", "img",
                "--storage-options", '{"key": "AKIAEXAMPLEKEY01", "secret": "verysecretvalue123"}')  # fmt: skip
    assert proc.returncode == 2 and "hold credentials; put them in a JSON file" in proc.stderr
    assert "verysecretvalue123" not in proc.stderr + proc.stdout


def test_decode_limit_is_part_of_the_config():
    with pytest.raises(ValueError, match="max_pixels must be at least 1"):
        build_config(None, {"max_pixels": 0})
    assert build_config(None, {"max_pixels": 5}).fingerprint() != build_config(None, {}).fingerprint()


def test_exif_rotated_pixels_decode_upright():
    from pipeline.decode import decode_image
    from tests.bad_inputs import exif_rotated_jpeg, upright_image

    decoded = decode_image(exif_rotated_jpeg())
    assert decoded.shape[:2] == UPRIGHT
    assert np.abs(decoded.astype(int) - upright_image()).mean() < 2  # JPEG rounding only
    raw = np.asarray(Image.open(io.BytesIO(exif_rotated_jpeg())).convert("RGB"))
    assert raw.shape[:2] == UPRIGHT[::-1]  # the file really is stored sideways


def test_a_coco_file_with_malformed_entries_is_reported_not_crashed(tmp_path):
    doc = {"categories": CATS, "annotations": [7, {"image_id": 1, "category_id": 1}],
           "images": ["not an image entry", {"id": 1, "file_name": "a.jpg"}]}  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    problems: list[str] = []
    _, records = manifest.read_coco(str(tmp_path / "instances.json"), str(tmp_path), problems=problems)
    assert [r["id"] for r in records] == ["1"] and records[0]["tags"] == [1]
    assert len(problems) == 1 and "images[1] (id None)" in problems[0] and "'uri'" in problems[0]


ESCAPING_FILE_NAMES = ["../escape.jpg", "sub/../../escape.jpg", "/etc/escape.jpg", "C:\\escape.jpg",
                       "..\\escape.jpg", "file:///escape.jpg"]  # fmt: skip


def test_coco_file_names_that_leave_the_image_folder_are_manifest_problems(tmp_path):
    (tmp_path / "escape.jpg").write_bytes(b"outside the image folder")
    images = [{"id": i + 1, "file_name": n} for i, n in enumerate(ESCAPING_FILE_NAMES)]
    images.append({"id": 99, "file_name": "sub/inside.jpg"})
    doc = {"categories": CATS, "annotations": [], "images": images}
    (tmp_path / "instances.json").write_text(json.dumps(doc), encoding="utf-8")
    problems: list[str] = []
    _, records = manifest.read_coco(str(tmp_path / "instances.json"), str(tmp_path / "img"), problems=problems)
    assert [r["id"] for r in records] == ["99"] and records[0]["file_name"] == "sub/inside.jpg"
    assert len(problems) == len(ESCAPING_FILE_NAMES)
    for name, problem in zip(ESCAPING_FILE_NAMES, problems, strict=True):
        assert f"field 'file_name' {name!r}" in problem and "inside the image folder" in problem
    with pytest.raises(manifest.ManifestError, match="'../escape.jpg' has a '..' part"):
        manifest.read_coco(str(tmp_path / "instances.json"), str(tmp_path / "img"))


@pytest.mark.slow
def test_the_job_refuses_escaping_file_names_before_any_work(tmp_path, tiny_paths):
    doc = {"categories": CATS, "annotations": [], "images": [{"id": 1, "file_name": "../escape.jpg"}]}
    (tmp_path / "instances.json").write_text(json.dumps(doc), encoding="utf-8")
    (tmp_path / "img").mkdir()
    (tmp_path / "escape.jpg").write_bytes(b"outside the image folder")
    proc = _job(tmp_path, tiny_paths, "--annotations", str(tmp_path / "instances.json"), "--images",
                str(tmp_path / "img"))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "1 manifest record(s) cannot be used" in proc.stderr and "'../escape.jpg' has a '..' part" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_absolute_uris_in_a_jsonl_manifest_stay_allowed(tmp_path):
    lines = [{"id": "a", "uri": "/data/images/a.jpg", "tags": [1]}, {"id": "b", "uri": "s3://bucket/b.jpg", "tags": []}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    problems: list[str] = []
    records = list(manifest.read_jsonl(str(tmp_path / "m.jsonl"), problems=problems))
    assert problems == [] and [r["uri"] for r in records] == ["/data/images/a.jpg", "s3://bucket/b.jpg"]
