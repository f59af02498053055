import argparse
import hashlib
import json
import os
import uuid

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO

from pipeline import cli, coco, pngs, retry
from pipeline.storage import commit, layout, outputs
from pipeline.storage.merge import merge
from pipeline.storage.store import Store
from pipeline.types import (
    Failure,
    LabelResult,
    id_name,
    image_names,
    manifest_fingerprint,
    run_fingerprint,
    safe_name,
    shard_id_for,
)

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 90, "name": "toothbrush"}]
FP = "f" * 64
SECRET = "dummy-secret-Zq81"


def synthetic_result(image_id: str, seed: int, h: int = 24, w: int = 32) -> LabelResult:
    """Blobs of two tagged classes on background, a band of 255, random scores; no model needed."""
    rng = np.random.default_rng(seed)
    ids = (3, 90) if seed % 2 else (7, 3)
    lm = np.zeros((h, w), np.uint8)
    lm[rng.integers(0, h // 2) :, : rng.integers(4, w)] = ids[0]
    lm[: rng.integers(2, h), rng.integers(w // 2, w) :] = ids[1]
    lm[h // 2 : h // 2 + 2] = 255
    return LabelResult(
        image_id=image_id, label_map=lm, class_ids=ids,
        coarse=rng.random((2, 3, 4), dtype=np.float32), compensated=rng.random((2, 8, 8), dtype=np.float32),
        coarse_scores=rng.random(2, dtype=np.float32), final_scores=rng.random(2, dtype=np.float32),
        kept_ids=ids, decision=rng.random((2, h, w), dtype=np.float32),
        segments=(np.arange(h * w).reshape(h, w) // 37).astype(np.int32), timings={"clip_coarse": rng.random()},
    )  # fmt: skip


def shard_inputs(n: int, offset: int = 0) -> list[LabelResult]:
    return [synthetic_result(f"img-{offset + i:03d}", offset + i) for i in range(n)]


# --- a real S3 API: moto's server on 127.0.0.1 (conftest's s3_endpoint), used through s3fs ---


@pytest.fixture
def s3_store(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "skip_instance_cache": True}
    store = Store.open(f"s3://{bucket}/run1", **opts)
    store.fs.mkdir(bucket)
    return store


def all_files(store: Store) -> dict[str, bytes]:
    store.fs.invalidate_cache()
    return {p[len(store.root) + 1 :]: store.fs.cat_file(p) for p in store.fs.find(store.root)}


def decode_from_coco_file(path) -> dict[str, np.ndarray]:
    api = COCO(str(path))
    maps = {}
    for img_id, image in api.imgs.items():
        out = np.zeros((image["height"], image["width"]), np.uint8)
        for ann in api.loadAnns(api.getAnnIds(imgIds=[img_id])):
            out[api.annToMask(ann) == 1] = ann["category_id"]
        out[coco.decode_rle(image["ignore_segmentation"]) == 1] = 255
        maps[image["source_id"]] = out
    return maps


def test_three_shards_on_s3_merge_and_reload(s3_store, tmp_path):
    shards = {}
    for k in range(3):
        results = shard_inputs(3, offset=10 * k)
        failures = [(f"bad-{k}", "decode_error", "cannot identify image file")] if k == 1 else []
        shard_id = shard_id_for(k, [r.image_id for r in results] + [f[0] for f in failures])
        commit.write_shard(s3_store, shard_id, results, failures, CATEGORIES, FP)
        shards[shard_id] = results
    assert all(commit.is_committed(s3_store, s, FP) for s in shards)
    summary = merge(s3_store, list(shards), FP)
    assert summary["counts"] == {"images": 10, "ok": 9, "failed": 1, "annotations": 18, "class_rows": 18,
                                 "label_maps": 9}  # fmt: skip

    local = tmp_path / "annotations.json"
    s3_store.fs.get(s3_store.path("merged/annotations.json"), str(local))
    decoded = decode_from_coco_file(local)
    expected = {r.image_id: r.label_map for results in shards.values() for r in results}
    assert decoded.keys() == expected.keys()
    for image_id, label_map in expected.items():
        assert np.array_equal(decoded[image_id], label_map), image_id
        png = s3_store.fs.cat_file(s3_store.path(layout.label_path(image_id)))
        assert np.array_equal(pngs.decode_png(png), label_map)

    images = pq.read_table(s3_store.path("merged/stats_images"), filesystem=s3_store.fs)
    assert images.num_rows == 10
    failed = [r for r in images.to_pylist() if r["status"] != "ok"]
    assert failed == [{**dict.fromkeys(images.column_names), "shard_id": failed[0]["shard_id"], "image_id": "bad-1",
                       "status": "decode_error", "error": "cannot identify image file"}]  # fmt: skip
    classes = ds.dataset(s3_store.path("merged/stats_classes"), filesystem=s3_store.fs, format="parquet").to_table()
    assert classes.num_rows == 18
    assert all(SECRET.encode() not in data for data in all_files(s3_store).values())


def test_memory_and_local_prefixes_give_identical_bytes(tmp_path):
    results = shard_inputs(4)
    mem = Store.open(f"memory://{uuid.uuid4().hex}/out")
    loc = Store.open(str(tmp_path / "out"))
    for store in (mem, loc):
        commit.write_shard(store, "00000-a", results, [Failure("gone", "download_error", "404")], CATEGORIES, FP)
        merge(store, ["00000-a"], FP)
    mem_files, loc_files = all_files(mem), all_files(loc)
    assert mem_files.keys() == loc_files.keys()
    volatile = {k for k in mem_files if "timings" in k}
    assert {k: v for k, v in mem_files.items() if k not in volatile} == {
        k: v for k, v in loc_files.items() if k not in volatile
    }
    assert "shards/00000-a/_COMMITTED.json" in loc_files and "labels/img-003.png" in loc_files


def test_rewrite_is_byte_identical_whatever_the_order_and_timings():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    results = shard_inputs(5)
    commit.write_shard(store, "s", results, [], CATEGORIES, FP)
    first = all_files(store)
    shuffled = list(reversed(shard_inputs(5)))
    for r in shuffled:
        r.timings = {"clip_coarse": 99.0}
    commit.write_shard(store, "s", shuffled, [], CATEGORIES, FP)
    second = all_files(store)
    assert first.keys() == second.keys()
    assert first["shards/s/timings.parquet"] != second["shards/s/timings.parquet"]
    assert {k: v for k, v in first.items() if "timings" not in k} == {
        k: v for k, v in second.items() if "timings" not in k
    }


def test_marker_holds_counts_and_checksums_of_what_was_written():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    marker = commit.write_shard(store, "s", shard_inputs(2), [("x", "decode_error", "bad")], CATEGORIES, FP)
    assert marker["counts"] == {"images": 3, "ok": 2, "failed": 1, "annotations": 4, "class_rows": 4,
                                "label_maps": 2}  # fmt: skip
    files = all_files(store)
    assert sorted(marker["files"]) == sorted(k for k in files if k.endswith((".png", ".json", ".parquet"))
                                             and "timings" not in k and not k.endswith("_COMMITTED.json"))  # fmt: skip
    for rel, entry in marker["files"].items():
        assert entry == {"sha256": hashlib.sha256(files[rel]).hexdigest(), "bytes": len(files[rel])}
    assert marker["volatile_files"] == ["shards/s/timings.parquet"]
    assert json.loads(files["shards/s/_COMMITTED.json"]) == marker


def test_marker_is_written_last(monkeypatch):
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    calls = []
    real = Store.write_many
    monkeypatch.setattr(
        Store, "write_many", lambda self, files: calls.append(sorted(files)) or real(self, files)
    )
    commit.write_shard(store, "s", shard_inputs(2), [], CATEGORIES, FP)
    assert calls[-1] == ["shards/s/_COMMITTED.json"]
    assert all("_COMMITTED" not in rel for call in calls[:-1] for rel in call)


def test_uncommitted_or_foreign_shards_are_not_done():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    assert not commit.is_committed(store, "s", FP)
    commit.write_shard(store, "s", shard_inputs(1), [], CATEGORIES, FP)
    assert commit.is_committed(store, "s", FP)
    assert not commit.is_committed(store, "s", "0" * 64)
    store.write_many({"shards/s/_COMMITTED.json": b'{"schema": "tag2mask/commit-ma'})  # torn write
    assert not commit.is_committed(store, "s", FP)
    with pytest.raises(ValueError, match="shard s is not committed"):
        merge(store, ["s"], FP)


def test_redo_deletes_stale_files():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    results = shard_inputs(2)
    commit.write_shard(store, "s", results, [], CATEGORIES, FP)
    store.write_many({"shards/s/leftover.parquet": b"junk"})
    commit.write_shard(store, "s", results[:1], [(results[1].image_id, "decode_error", "now broken")], CATEGORIES, FP)
    files = all_files(store)
    assert "shards/s/leftover.parquet" not in files
    assert layout.label_path(results[1].image_id) not in files
    assert layout.label_path(results[0].image_id) in files


def test_merge_detects_a_tampered_file():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    commit.write_shard(store, "s", shard_inputs(1), [], CATEGORIES, FP)
    store.write_many({"shards/s/stats_classes.parquet": b"tampered"})
    with pytest.raises(ValueError, match="does not match the sha256"):
        merge(store, ["s"], FP)


def test_merge_names_the_format_a_shard_was_written_without(tmp_path):
    """A shard committed with a subset of the formats (``write_shard(formats=...)``) is refused by
    name before anything is merged, not as a file that fails its checksum."""
    store = Store.open(str(tmp_path / "run"))
    commit.write_shard(store, "s0", shard_inputs(1), [], CATEGORIES, FP)
    commit.write_shard(store, "s1", shard_inputs(1, offset=5), [], CATEGORIES, FP, formats=["coco", "png"])
    with pytest.raises(ValueError, match=r"shard s1 was written without the 'stats' output format\(s\)") as err:
        merge(store, ["s0", "s1"], FP)
    assert "sha256" not in str(err.value) and "stats_classes.parquet" in str(err.value)
    commit.write_shard(store, "s1", shard_inputs(1, offset=5), [], CATEGORIES, FP, formats=["stats"])
    with pytest.raises(ValueError, match=r"shard s1 was written without the 'coco' output format\(s\)"):
        merge(store, ["s0", "s1"], FP)
    assert not (tmp_path / "run" / "merged").exists()


def test_merge_says_a_listed_file_is_missing():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    commit.write_shard(store, "s", shard_inputs(1), [], CATEGORIES, FP)
    store.remove_files(["shards/s/stats_images.parquet"])
    with pytest.raises(ValueError, match=r"stats_images.parquet is missing; delete the shard's _COMMITTED.json"):
        merge(store, ["s"], FP)


def test_merged_parquet_is_split_into_parts_in_shard_order():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    for k in range(3):
        commit.write_shard(store, f"s{k}", shard_inputs(2, offset=10 * k), [], CATEGORIES, FP)
    summary = merge(store, ["s2", "s0", "s1"], FP, file_rows=4)
    assert summary["tables"]["stats_images"] == {"files": 2, "rows": 6}
    table = pq.read_table(store.path("merged/stats_images"), filesystem=store.fs)
    assert table.column("image_id").to_pylist() == ["img-000", "img-001", "img-010", "img-011", "img-020", "img-021"]


UNSAFE_IDS = ["../../x", "/abs/path", "a\x00b", "..", ".", "a/b", "x" * 300, "ok-0123456789ab", "C:\\win", ".hidden"]


@pytest.mark.parametrize("image_id", UNSAFE_IDS)
def test_unsafe_ids_become_plain_names(image_id):
    name = safe_name(image_id)
    assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
    assert len(name) <= 100 and name != image_id
    assert Store.open("memory://p").path(layout.label_path(image_id)).startswith("/p/labels/")


def test_plain_ids_are_kept():
    assert safe_name("2008_000123") == "2008_000123"
    assert safe_name("000000397133") == "000000397133"


@settings(max_examples=200, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=30), min_size=2, max_size=20))
def test_safe_names_are_distinct_and_safe(ids):
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(names)
    assert all(layout.PART.fullmatch(n) for n in names)


def test_unsafe_ids_do_not_escape_a_local_prefix(tmp_path):
    prefix = tmp_path / "deep" / "out"
    results = [synthetic_result(i, n) for n, i in enumerate(UNSAFE_IDS[:4])]
    commit.write_shard(Store.open(str(prefix)), "s", results, [], CATEGORIES, FP)
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert len(written) == 4 + 5
    assert all(os.path.realpath(p).startswith(str(prefix) + os.sep) for p in written)


@pytest.mark.parametrize("bad", ["../s", "a/b", "", ".", "s\x00"])
def test_unsafe_shard_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="shard id"):
        commit.write_shard(Store.open("memory://p"), bad, [], [], CATEGORIES, FP)


def test_unsafe_relative_paths_are_rejected():
    with pytest.raises(ValueError, match="unsafe path"):
        Store.open("memory://p").path("shards/../../etc")


def test_duplicate_image_ids_are_rejected():
    with pytest.raises(ValueError, match="unique within a shard"):
        commit.write_shard(Store.open("memory://p"), "s", shard_inputs(1), [("img-000", "x", "y")],
                            CATEGORIES, FP)  # fmt: skip


def test_run_record_and_fingerprint():
    store = Store.open(f"memory://{uuid.uuid4().hex}/out")
    from pipeline.config import Config

    manifest = [{"id": "a", "uri": "a.jpg", "tags": [3]}]
    run = run_fingerprint(
        Config().fingerprint(), {"clip": {"sha256": "ab"}}, manifest_fingerprint(manifest)
    )
    other = run_fingerprint(Config().fingerprint(), {"clip": {"sha256": "ac"}}, run.manifest)
    assert run.digest != other.digest and len(run.digest) == 64
    assert manifest_fingerprint(manifest) != manifest_fingerprint([{**manifest[0], "tags": [7]}])
    commit.write_run(store, run, Config().to_dict(), {"clip": {"sha256": "ab"}})
    assert commit.read_run(store)["fingerprint"] == run.digest
    with pytest.raises(ValueError, match="belongs to another run"):
        commit.write_run(store, other, Config().to_dict(), {"clip": {"sha256": "ac"}})
    commit.write_run(store, other, Config().to_dict(), {"clip": {"sha256": "ac"}}, overwrite=True)
    assert commit.read_run(store)["parts"]["model"] == other.model


def test_another_run_names_an_edited_discovery_vocabulary_file(tmp_path):
    """The vocabulary file's sha256 is in the config fingerprint but not in run.json's config: the
    refusal names the file instead of no setting at all."""
    from pipeline.config import build_config

    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("kite\nbench\n")
    cfg = build_config(None, {"discovery": {"enabled": True, "vocabulary": str(vocabulary)}})
    store = Store.open(str(tmp_path / "out"))
    model = {"clip": {"sha256": "ab"}}
    commit.write_run(store, run_fingerprint(cfg.fingerprint(), model, "e" * 64), cfg.to_dict(), model)
    vocabulary.write_text("kite\nbench\nlamp\n")
    edited = run_fingerprint(cfg.fingerprint(), model, "e" * 64)
    with pytest.raises(ValueError, match=rf"the config changed \(no stored setting: the content of the discovery "
                                         rf"vocabulary file {vocabulary}") as err:  # fmt: skip
        commit.write_run(store, edited, cfg.to_dict(), model)
    assert "settings:" not in str(err.value)
    other = build_config(None, {"discovery": {"enabled": True, "vocabulary": str(vocabulary)}, "shard_size": 7})
    with pytest.raises(ValueError, match=r"\(settings: shard_size 256 -> 7\)"):
        commit.write_run(store, run_fingerprint(other.fingerprint(), model, "e" * 64), other.to_dict(), model)


# --- label maps named by the image file's stem (issue 11, section 3) ---


def _records(*uris: str, **file_names: str) -> list[dict]:
    """Manifest records ``img-000``.. for ``uris``; ``file_names`` by id as a COCO input gives them."""
    recs = [{"id": f"img-{i:03d}", "uri": u, "tags": [3]} for i, u in enumerate(uris)]
    return [{**r, "file_name": file_names[r["id"]]} if r["id"] in file_names else r for r in recs]


def test_label_maps_are_named_by_the_image_stem_and_coco_keeps_the_image_file_name(tmp_path):
    from pipeline import manifest

    records = _records("/data/coco/val2017/000000000139.jpg", "s3://bucket/photos/beach.png",
                       **{"img-000": "val2017/000000000139.jpg"})  # fmt: skip
    shard = next(manifest.shards(records, 10))
    store = Store.open(str(tmp_path / "out"))
    marker = commit.write_shard(store, "s", shard_inputs(2), [], CATEGORIES, FP, shard.names)
    labels = sorted(p for p in marker["files"] if p.startswith("labels/"))
    assert labels == ["labels/000000000139.png", "labels/beach.png"]
    merge(store, ["s"], FP)
    api = COCO(str(tmp_path / "out" / "merged" / "annotations.json"))
    by_source = {im["source_id"]: im["file_name"] for im in api.imgs.values()}
    # COCO input: the input's file_name (relative to --images); JSONL: the manifest's uri
    assert by_source == {"img-000": "val2017/000000000139.jpg", "img-001": "s3://bucket/photos/beach.png"}
    rows = pq.read_table(tmp_path / "out" / "shards" / "s" / "stats_images.parquet").to_pylist()
    assert [r["label_file"] for r in rows] == labels


def test_shared_stems_get_id_names_whatever_the_shard_boundaries():
    from pipeline import manifest

    records = _records("/a/x.jpg", "/b/x.jpg", "/c/X.png", "/d/y.jpg", "/e/../x", "/f/.jpg")
    whole = {i: n for s in manifest.shards(records, 6) for i, n in s.names.items()}
    for size in (1, 2, 4):  # other shard boundaries, same names
        assert {i: n for s in manifest.shards(records, size) for i, n in s.names.items()} == whole
    labels = {i: n.label for i, n in whole.items()}
    assert labels["img-000"] == "x" and labels["img-003"] == "y"  # first in manifest order keeps its stem
    for later in ("img-001", "img-002", "img-004"):  # the same stem, also in another case: the id's name
        assert labels[later] == id_name(later) and labels[later].startswith(f"{later}-")
    assert len({v.lower() for v in labels.values()}) == len(labels)
    assert all(layout.PART.fullmatch(v) and not v.startswith(".") for v in labels.values())


class _SetThatCollides(set):
    """A set-like that also answers "taken" for names it never held, as two 12-digit id_name
    digests shared by two ids, or CompactStringSet's 8-byte digests, would."""

    def __init__(self, phantoms):
        super().__init__()
        self.phantoms = {p.lower() for p in phantoms}

    def __contains__(self, name):
        return super().__contains__(name) or name in self.phantoms


def test_a_taken_id_name_gives_the_next_free_name_never_a_shared_one():
    from pipeline.types import ImageNamer

    records = _records("/a/x.jpg", "/b/x.jpg", "/c/x.jpg", "/d/y.jpg")
    phantoms = [id_name("img-001"), f"{id_name('img-001')}-2", "y"]  # as if other images held these
    namer = ImageNamer(_SetThatCollides(phantoms))
    labels = [namer(r).label for r in records]
    assert labels == ["x", f"{id_name('img-001')}-3", id_name("img-002"), id_name("img-003")]
    assert len({v.lower() for v in labels + phantoms}) == len(labels) + len(phantoms)
    assert all(layout.PART.fullmatch(v) for v in labels)
    again = ImageNamer(_SetThatCollides(phantoms))
    assert [again(r).label for r in records] == labels  # the same manifest, the same names


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=12))
def test_image_names_are_unique_and_safe(stems):
    records = [{"id": f"{i}:{s}", "uri": f"/img/{s}.jpg", "tags": []} for i, s in enumerate(stems)]
    labels = [n.label for n in image_names(records).values()]
    assert len({v.lower() for v in labels}) == len(labels)
    assert all(layout.PART.fullmatch(v) for v in labels)


def test_the_readme_training_recipe_pairs_every_labelled_image(tmp_path):
    """The README's mmsegmentation snippet, run on a COCO-style run, then mmseg's own ann_file rule
    (``<img_path>/<line><img_suffix>``, ``<seg_map_path>/<line><seg_map_suffix>``) on its list."""
    import re
    from pathlib import Path

    from pipeline import manifest

    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    doc = {"categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES], "annotations": [],
           "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (139, 285, 632)]}  # fmt: skip
    for im in doc["images"]:
        (images / im["file_name"]).write_bytes(b"jpeg")
    (tmp_path / "instances.json").write_text(json.dumps(doc))
    _, records = manifest.read_coco(str(tmp_path / "instances.json"), str(images))
    shard = next(manifest.shards(records, 10))
    results = [synthetic_result(r["id"], n) for n, r in enumerate(records[:2])]  # 632 failed: no label map
    store = Store.open(str(tmp_path / "run1"))
    commit.write_shard(store, shard.shard_id, results, [("632", "decode_error", "x")], CATEGORIES, FP, shard.names)
    merge(store, [shard.shard_id], FP)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"mmsegmentation \(1\.x\):\n\n```python\n(.*?)```", readme, re.S).group(1)
    snippet = snippet.replace("/data/pseudo/run1", str(tmp_path / "run1")).replace("/data/coco/train2017", str(images))
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    dataset = scope["train_dataloader"]["dataset"]
    root, prefix = Path(dataset["data_root"]), dataset["data_prefix"]
    lines = (root / dataset["ann_file"]).read_text().split()
    assert lines == ["000000000139", "000000000285"]
    for line in lines:
        assert (Path(prefix["img_path"]) / (line + dataset["img_suffix"])).is_file()
        assert (root / prefix["seg_map_path"] / (line + dataset["seg_map_suffix"])).is_file()
    assert len(scope["classes"]) == 91 and scope["classes"][90] == "toothbrush"


def test_output_formats_are_chosen_by_name(tmp_path):
    """The default formats write what a run always wrote; one format alone writes only its files
    (the marker still counts every key); an unknown or empty selection is refused."""
    results = shard_inputs(3)
    every = outputs.build_shard("00000-a", results, [("bad", "decode_error", "x")], CATEGORIES, FP)
    assert outputs.DEFAULT_FORMATS == ("png", "coco", "stats", "regions", "suggestions")  # the last two: discovery
    assert every == outputs.build_shard("00000-a", results, [("bad", "decode_error", "x")], CATEGORIES, FP,
                                        formats=("stats", "png", "coco"))  # fmt: skip
    only_coco = outputs.build_shard("00000-a", results, [], CATEGORIES, FP, formats=["coco"])
    assert sorted(only_coco.files) == ["shards/00000-a/annotations.json"] and only_coco.volatile == {}
    assert only_coco.files["shards/00000-a/annotations.json"] == every.files["shards/00000-a/annotations.json"]
    assert only_coco.counts == {"images": 3, "ok": 3, "failed": 0, "annotations": every.counts["annotations"],
                                "class_rows": 0, "label_maps": 0}  # fmt: skip
    only_png = outputs.build_shard("00000-a", results, [], CATEGORIES, FP, formats=["png"])
    assert all(k.startswith("labels/") and k.endswith(".png") for k in only_png.files) and len(only_png.files) == 3
    for bad in (["coco", "webdataset"], []):
        with pytest.raises(ValueError, match="must be a non-empty selection of"):
            outputs.build_shard("00000-a", results, [], CATEGORIES, FP, formats=bad)
    store = Store.open(str(tmp_path / "run"))
    marker = commit.write_shard(store, "00000-a", results, [], CATEGORIES, FP, formats=["coco"])
    assert commit.verify_shard(store, "00000-a") == [] and marker["counts"]["label_maps"] == 0
    assert not (tmp_path / "run" / "labels").exists()


def test_layout_names_and_parses_its_own_paths():
    assert layout.marker_file("00000-a") == "shards/00000-a/_COMMITTED.json"
    assert layout.shard_id_of_marker("/data/run/" + layout.marker_file("00000-a")) == "00000-a"
    assert layout.shard_id_of_marker(layout.marker_file("00001-b")) == "00001-b"
    assert layout.label_name(layout.label_file("000000000139")) == "000000000139"
    for bad in ("shards/00000-a/annotations.json", "other/00000-a/_COMMITTED.json"):
        with pytest.raises(ValueError, match="not a commit marker path"):
            layout.shard_id_of_marker(bad)
    with pytest.raises(ValueError, match="not a label file path"):
        layout.label_name("labels/.png")


def test_storage_retry_flags_set_the_policy():
    parser = argparse.ArgumentParser()
    cli.add_storage_retry_arguments(parser)
    assert cli.retry_policy_from_args(parser.parse_args([])) == retry.DEFAULT
    policy = cli.retry_policy_from_args(parser.parse_args(["--storage-retries", "2", "--storage-backoff", "0.25"]))
    assert policy == retry.RetryPolicy(attempts=2, base_s=0.25, cap_s=retry.DEFAULT.cap_s)
    assert Store.open("memory://retry-flags", retry=policy).retry_policy == policy
    for argv in (["--storage-retries", "0"], ["--storage-backoff", "-1"]):
        with pytest.raises(ValueError, match="--storage-retries / --storage-backoff"):
            cli.retry_policy_from_args(parser.parse_args(argv))


def test_a_store_retries_as_often_as_its_policy_says(tmp_path, monkeypatch):
    """Two transient faults: a store allowed two attempts gives up, one allowed three succeeds."""
    for attempts, ok in ((2, False), (3, True)):
        store = Store.open(str(tmp_path / f"run{attempts}"), retry=retry.RetryPolicy(attempts, 0.0, 0.0))
        store.write_many({"x.txt": b"x"})
        faults = [TimeoutError("slow"), TimeoutError("slow")]
        real = store.fs.cat_file

        def flaky(path, *a, faults=faults, real=real, **k):
            if faults:
                raise faults.pop()
            return real(path, *a, **k)

        with monkeypatch.context() as patch:  # local filesystems are shared instances: undo each time
            patch.setattr(store.fs, "cat_file", flaky)
            if ok:
                assert store.read("x.txt") == b"x"
            else:
                with pytest.raises(retry.StorageError):
                    store.read("x.txt")
