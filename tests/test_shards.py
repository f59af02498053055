"""Manifests and one shard end to end (no Ray): bad images become rows, the shard still commits."""

from __future__ import annotations

import io
import json

import fsspec
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import manifest
from pipeline.shards import label_shard
from pipeline.storage import commit, layout, outputs
from pipeline.storage.store import Store
from tests.conftest import blob_image


def _jpeg(h: int, w: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(blob_image(h, w, seed)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture
def coco_files():
    fs = fsspec.filesystem("memory")
    root = "memory://coco-test"
    fs.pipe({f"{root}/img/a.jpg": _jpeg(60, 80, 1), f"{root}/img/b.jpg": _jpeg(50, 50, 2),
             f"{root}/img/text.jpg": b"this is not an image", f"{root}/img/long.jpg": _jpeg(4, 300, 3)})  # fmt: skip
    doc = {
        "images": [{"id": 3, "file_name": "b.jpg", "width": 50, "height": 50},
                   {"id": 1, "file_name": "a.jpg", "width": 80, "height": 60},
                   {"id": 9, "file_name": "text.jpg"}, {"id": 12, "file_name": "gone.jpg"},
                   {"id": 20, "file_name": "long.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7}, {"id": 2, "image_id": 1, "category_id": 1},
                        {"id": 3, "image_id": 1, "category_id": 7}, {"id": 4, "image_id": 3, "category_id": 15},
                        {"id": 5, "image_id": 9, "category_id": 1}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 15, "name": "person"}],
    }  # fmt: skip
    fs.pipe(f"{root}/instances.json", json.dumps(doc).encode())
    yield root
    fs.rm(root, recursive=True)


def test_coco_tags_come_from_annotation_categories(coco_files):
    cats, records = manifest.read_coco(f"{coco_files}/instances.json", f"{coco_files}/img")
    assert [(c.id, c.prompt) for c in cats] == [(1, "cat"), (7, "dog"), (15, "person with cloth people human")]
    assert [(r["id"], r["tags"]) for r in records] == [("1", [1, 7]), ("3", [15]), ("9", [1]), ("12", []), ("20", [])]
    assert records[0]["uri"] == f"{coco_files}/img/a.jpg" and records[0]["width"] == 80


def test_shards_are_deterministic_and_content_named():
    recs = [{"id": str(i), "uri": f"x/{i}.jpg", "tags": [1]} for i in range(7)]
    first = list(manifest.shards(iter(recs), 3))
    assert [len(s.records) for s in first] == [3, 3, 1]
    assert [s.shard_id for s in first] == [s.shard_id for s in manifest.shards(iter(recs), 3)]
    changed = [dict(r) for r in recs]
    changed[4]["id"] = "40"
    ids = [s.shard_id for s in manifest.shards(iter(changed), 3)]
    assert ids[0] == first[0].shard_id and ids[1] != first[1].shard_id


def test_malformed_jsonl_names_the_line_and_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "uri": "a.jpg", "tags": [1]}\n{"id": "b", "uri": "b.jpg", "tags": ["cat"]}\n')
    with pytest.raises(ValueError, match=r"line 2 \(id 'b'\).*tags/0"):
        list(manifest.read_jsonl(str(path)))
    path.write_text('{"id": "a", "uri": "a.jpg", "tags": [1]}\n{"id": "a", "uri": "b.jpg", "tags": [2]}\n')
    with pytest.raises(ValueError, match="line 2.*repeats"):
        list(manifest.read_jsonl(str(path)))


def test_a_shard_with_bad_images_commits_and_counts_them(labeler, coco_files):
    _, records = manifest.read_coco(f"{coco_files}/instances.json", f"{coco_files}/img")
    shard = next(manifest.shards(records, 10))
    store = Store.open("memory://out-shards")
    marker = label_shard(labeler, store, shard, "f" * 64)
    assert marker["counts"]["ok"] == 2 and marker["counts"]["failed"] == 3 and marker["counts"]["images"] == 5
    assert commit.is_committed(store, shard.shard_id, "f" * 64)
    rows = pq.read_table(io.BytesIO(store.read(f"shards/{shard.shard_id}/stats_images.parquet"))).to_pylist()
    status = {r["image_id"]: r["status"] for r in rows}
    assert status == {"1": "ok", "3": "ok", "9": "decode_error", "12": "missing", "20": "unusable"}
    errors = {r["image_id"]: r["error"] for r in rows}
    assert "gone.jpg" in errors["12"] and "cannot decode" in errors["9"]
    assert "300x4 has aspect ratio 75.0, over cliper.max_aspect_ratio 10" in errors["20"]


def test_decode_errors_have_stable_messages():
    from pipeline.decode import ImageDecodeError, decode_image

    messages = set()
    for _ in range(2):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(b"not an image at all")
        messages.add(str(err.value))
    assert messages == {"cannot decode image: not a recognised image format"}


def test_the_overlapped_shard_path_gives_the_labeler_s_own_label_maps(labeler, coco_files):
    from pipeline import pngs
    from pipeline.decode import decode_image
    from pipeline.types import LabelRequest

    _, records = manifest.read_coco(f"{coco_files}/instances.json", f"{coco_files}/img")
    good = [r for r in records if r["id"] in ("1", "3")]
    store = Store.open("memory://out-overlap")
    shard = next(manifest.shards(good, 10))
    label_shard(labeler, store, shard, "e" * 64)
    fs = fsspec.filesystem("memory")
    # The same batch as the shard forms (batch size is part of the config: batched float sums may
    # round differently, so byte identity is promised for a fixed config).
    direct = labeler.label([LabelRequest(r["id"], decode_image(fs.cat(r["uri"])), tuple(r["tags"])) for r in good])
    for r, d in zip(good, direct, strict=True):
        stored = pngs.decode_png(store.read(layout.label_file(shard.names[r["id"]].label)))
        assert stored.tobytes() == d.label_map.tobytes()


def _many(n: int, bad: tuple[int, ...] = ()) -> list[dict]:
    """``n`` small images on the memory filesystem; the positions in ``bad`` are not images."""
    fs, root = fsspec.filesystem("memory"), f"memory://many-{n}-{len(bad)}"
    fs.pipe({f"{root}/{i}.jpg": b"not an image" if i in bad else _jpeg(20, 24, i) for i in range(n)})
    return [{"id": f"im{i:03d}", "uri": f"{root}/{i}.jpg", "tags": [1 + 6 * (i % 2)]} for i in range(n)]


@pytest.mark.slow
def test_reading_ahead_is_bounded_and_float_maps_are_dropped_before_the_write(labeler, monkeypatch):
    import gc
    import time
    import weakref

    from pipeline import shards as shards_mod

    records, size = _many(12), 2
    requested, at_infer, maps, alive = [0], [], [], []
    real_request, real_infer, real_finish, real_write = (shards_mod._request, labeler.infer, labeler.finish,
                                                         commit.write_shard)  # fmt: skip

    def request(*args):
        requested[0] += 1
        return real_request(*args)

    def infer(batch):
        time.sleep(0.2)  # time enough for unbounded readers to read the whole shard
        at_infer.append(requested[0])
        return real_infer(batch)

    def finish(work):
        result = real_finish(work)
        maps.append(weakref.ref(result.decision))
        return result

    def write_shard(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in maps))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shards_mod, "_request", request)
    monkeypatch.setattr(labeler, "infer", infer)
    monkeypatch.setattr(labeler, "finish", finish)
    monkeypatch.setattr(shards_mod.commit, "write_shard", write_shard)
    shard = next(manifest.shards(records, 12))
    marker = label_shard(labeler, Store.open("memory://bounded"), shard, "a" * 64, batch_size=size)
    monkeypatch.undo()
    assert marker["counts"]["ok"] == 12 and len(maps) == 12
    window = shards_mod.prefetch_window(size, 4)
    # Before the first batch runs: what the window holds, plus one refill per image taken.
    assert at_infer[0] <= window + size < 12
    assert alive == [0]  # every [K, H, W] decision map was reduced to its rows and freed


@pytest.mark.slow
def test_a_streamed_shard_batches_by_position_and_writes_what_whole_results_would(labeler, monkeypatch):
    """Batches are records [4k, 4k + 4) whatever fails (a failed image moves no other image to
    another batch, so a redone shard batches as before); the files equal those built from whole
    LabelResults of the same batches."""
    from pipeline.decode import decode_image
    from pipeline.types import Failure, LabelRequest

    records = _many(10, bad=(1,))
    shard = next(manifest.shards(records, 10))
    seen: list[list[str]] = []
    real_infer = labeler.infer
    monkeypatch.setattr(labeler, "infer", lambda batch: seen.append([r.image_id for r in batch]) or real_infer(batch))
    streamed = Store.open("memory://streamed")
    label_shard(labeler, streamed, shard, "b" * 64, batch_size=4)
    monkeypatch.undo()
    assert seen == [["im000", "im002", "im003"], ["im004", "im005", "im006", "im007"], ["im008", "im009"]]
    fs = fsspec.filesystem("memory")
    results = []
    for chunk in ([0, 2, 3], [4, 5, 6, 7], [8, 9]):
        reqs = [LabelRequest(records[i]["id"], decode_image(fs.cat(records[i]["uri"])), tuple(records[i]["tags"]))
                for i in chunk]  # fmt: skip
        results += labeler.label(reqs)
    whole = outputs.build_shard(shard.shard_id, results, [Failure("im001", "decode_error", "x")],
                                list(labeler.categories.values()), "b" * 64, shard.names)  # fmt: skip
    for rel, data in whole.files.items():
        if "stats_images" not in rel:  # the failed row's message differs (ours is a stand-in)
            assert streamed.read(rel) == data, rel
