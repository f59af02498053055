"""Discovery's outputs (issue 17, phase 2): region maps, the regions' COCO file, suggestions.parquet,
the stats columns, the merge's missing tags, the CLI flags and the fingerprint. The run tests use
the tiny models through the production path (``runner._LabelActor`` -> ``shards.label_shard`` ->
``commit.write_shard`` -> ``merge``); since random weights put no objects in the tokens, a planted
token map (an object in the lower-right quadrant) replaces them after ``infer``, as in
tests/test_discovery.py."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from pipeline import cli, discovery, manifest, schemas, stats
from pipeline.config import build_config, merge_overrides
from pipeline.labeler import Labeler
from pipeline.storage import commit, layout, merge, outputs
from pipeline.storage.store import Store
from pipeline.types import LabelResult
from tests.conftest import CATEGORIES, blob_image, tiny_overrides

FP = "d" * 64


def _regions(masks: list[np.ndarray]) -> discovery.Regions:
    m = np.stack(masks) if masks else np.zeros((0, 4, 5), bool)
    return discovery.Regions(m, np.eye(len(masks), 4, dtype=np.float32),
                             np.linspace(0.9, 0.8, len(masks)).astype(np.float32),
                             m.reshape(len(m), 20).mean(axis=1).astype(np.float32))  # fmt: skip


def _result(image_id: str, regions: discovery.Regions | None, mode: str = "regions") -> LabelResult:
    """A labelled 16 x 20 image (class 1 on the top rows) with the given regions on a 4 x 5 grid."""
    label = np.zeros((16, 20), np.uint8)
    label[:4] = 1
    region_map = None if regions is None or mode != "regions" else regions.region_map(label.shape)
    suggestions = () if regions is None else tuple(("dog", 0.75 - 0.1 * k) for k in range(len(regions.masks)))
    return LabelResult(image_id, label, (1,), np.zeros((1, 4, 5), np.float32), np.zeros((1, 4, 5), np.float32),
                       np.ones(1, np.float32), np.ones(1, np.float32), (1,), np.zeros((1, 16, 20), np.float32), None,
                       regions=regions, region_map=region_map, suggestions=suggestions)  # fmt: skip


def _grid(*cells: tuple[slice, slice]) -> np.ndarray:
    m = np.zeros((4, 5), bool)
    for c in cells:
        m[c] = True
    return m


TWO = [_grid((slice(2, 4), slice(0, 2))), _grid((slice(2, 4), slice(3, 5)))]


def test_region_png_round_trips_uint16():
    region_map = np.arange(12 * 7, dtype=np.uint16).reshape(12, 7) * 700  # values above 255 too
    data = discovery.encode_region_png(region_map)
    assert np.array_equal(discovery.decode_region_png(data), region_map)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # 16-bit greyscale, not a palette
    assert data == discovery.encode_region_png(region_map.copy())
    with pytest.raises(ValueError, match="uint16 region map"):
        discovery.encode_region_png(region_map.astype(np.uint8))


def test_shard_files_with_regions_load_in_pycocotools_and_pyarrow(tmp_path):
    store = Store.open(str(tmp_path))
    results = [_result("a", _regions(TWO)), _result("b", _regions(TWO[:1])), _result("c", _regions([]))]
    marker = commit.write_shard(store, "s0", results, [("x", "missing", "gone")], CATEGORIES, FP, discovery=True)
    regions_json = layout.shard_file("s0", layout.REGIONS_COCO)
    suggestions = layout.table_file("s0", layout.SUGGESTIONS)
    for rel in (regions_json, suggestions, layout.region_file("s0", "a"), layout.region_file("s0", "c")):
        assert marker["files"][rel]["sha256"] == commit.sha256_hex(store.read(rel))  # committed by the marker
    ds = COCO(str(tmp_path / regions_json))
    assert [c["name"] for c in ds.loadCats(ds.getCatIds())] == ["unknown object"]
    assert discovery.UNKNOWN_OBJECT_ID not in {c.id for c in CATEGORIES}
    for img in ds.loadImgs(ds.getImgIds()):
        region_map = discovery.decode_region_png(store.read(layout.region_file("s0", img["source_id"])))
        anns = ds.loadAnns(ds.getAnnIds(imgIds=img["id"]))
        assert sorted(a["region"] for a in anns) == [v for v in np.unique(region_map).tolist() if v]
        for ann in anns:
            assert np.array_equal(ds.annToMask(ann), region_map == ann["region"])
            assert ann["suggested_class"] == "dog" and ann["category_id"] == discovery.UNKNOWN_OBJECT_ID
    table = pq.read_table(tmp_path / suggestions)
    schemas.check_table("suggestions", table)
    assert table.column("image_id").to_pylist() == ["a", "a", "b"]
    assert table.column("region").to_pylist() == [1, 2, 1]
    assert table.column("area").to_pylist() == pytest.approx([0.2, 0.2, 0.2])
    images = pq.read_table(tmp_path / layout.table_file("s0", "stats_images")).to_pydict()
    assert images["n_unknown_regions"] == [2, 1, 0, None]  # the failed image has no discovery
    assert images["unknown_fraction"][:3] == pytest.approx([0.4, 0.2, 0.0])


def test_without_discovery_the_shard_writes_what_it_wrote_before(tmp_path):
    """No region or suggestion files, the stats_images schema and bytes of a run without them."""
    store = Store.open(str(tmp_path))
    plain = commit.write_shard(store, "s0", [_result("a", None)], [], CATEGORIES, FP)
    shard_files = ("annotations.json", "stats_images.parquet", "stats_classes.parquet")
    expected = [layout.shard_file("s0", f) for f in shard_files]
    assert sorted(plain["files"]) == sorted([*expected, layout.label_file("a")])
    table = pq.read_table(tmp_path / layout.table_file("s0", "stats_images"))
    assert table.schema.remove_metadata().equals(schemas.STATS_IMAGES.remove_metadata())
    built = outputs.build_shard("s0", [_result("a", None)], [], CATEGORIES, FP, formats=("png", "coco", "stats"))
    assert {rel: commit.sha256_hex(d) for rel, d in built.files.items()} == {
        rel: v["sha256"] for rel, v in plain["files"].items()}  # fmt: skip


def test_ignore_mode_writes_suggestions_but_no_region_maps(tmp_path):
    store = Store.open(str(tmp_path))
    marker = commit.write_shard(store, "s0", [_result("a", _regions(TWO), mode="ignore")], [], CATEGORIES, FP,
                                discovery=True)  # fmt: skip
    assert layout.table_file("s0", layout.SUGGESTIONS) in marker["files"]
    assert not any("regions" in rel for rel in marker["files"])


def test_merge_writes_regions_suggestions_and_the_missing_tags(tmp_path):
    store = Store.open(str(tmp_path))
    cat_result = _result("c1", _regions(TWO))
    commit.write_shard(store, "s0", [_result("a", _regions(TWO)), _result("b", _regions(TWO[:1]))], [], CATEGORIES, FP,
                       discovery=True)  # fmt: skip
    cat_result.suggestions = (("cat", 0.9), ("person", 0.5))  # "cat" is tagged (class 1): never a missing tag
    commit.write_shard(store, "s1", [cat_result], [], CATEGORIES, FP, discovery=True)
    summary = merge.merge(store, ["s0", "s1"], FP)
    assert summary["missing_tags"] == [["dog", 3, pytest.approx(0.716667)], ["person", 1, 0.5]]
    missing = pq.read_table(tmp_path / layout.MERGED_MISSING_TAGS)
    schemas.check_table("missing_tags", missing)
    assert missing.column("suggested_class").to_pylist() == ["dog", "person"]
    assert summary["tables"]["suggestions"] == {"files": 1, "rows": 5}
    ds = COCO(str(tmp_path / layout.MERGED_REGIONS))
    assert len(ds.getImgIds()) == 3 and len(ds.getAnnIds()) == 5
    merged_images = pq.read_table(tmp_path / layout.merged_part("stats_images", 0))
    assert merged_images.column("n_unknown_regions").to_pylist() == [2, 1, 2]


def test_merge_reads_each_shard_file_once_with_discovery(tmp_path, monkeypatch):
    """The missing tags need every shard's stats_classes and suggestions: merge reads and checks
    each file once (they were read again after being merged)."""
    store = Store.open(str(tmp_path))
    for sid, image_id in (("s0", "a"), ("s1", "b")):
        commit.write_shard(store, sid, [_result(image_id, _regions(TWO))], [], CATEGORIES, FP, discovery=True)
    reads: list[str] = []
    real = Store.read
    monkeypatch.setattr(Store, "read", lambda self, rel: reads.append(rel) or real(self, rel))
    merge.merge(store, ["s0", "s1"], FP)
    assert layout.table_file("s1", "stats_classes") in reads and layout.table_file("s1", layout.SUGGESTIONS) in reads
    assert sorted(rel for rel in set(reads) if reads.count(rel) > 1) == []


def test_merge_without_discovery_writes_no_discovery_files(tmp_path):
    store = Store.open(str(tmp_path))
    commit.write_shard(store, "s0", [_result("a", None)], [], CATEGORIES, FP)
    summary = merge.merge(store, ["s0"], FP)
    assert "missing_tags" not in summary and "suggestions" not in summary["tables"]
    assert not (tmp_path / layout.MERGED_REGIONS).exists() and not (tmp_path / layout.MERGED_MISSING_TAGS).exists()


def test_image_row_gains_the_columns_only_with_discovery():
    assert "unknown_fraction" not in stats.image_row(_result("a", None), "s", None)
    row = stats.image_row(_result("a", _regions(TWO)), "s", None)
    assert row["n_unknown_regions"] == 2 and row["unknown_fraction"] == pytest.approx(0.4)


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cli.add_model_arguments(p)
    cli.add_discovery_arguments(p)
    return p.parse_args(argv)


def test_cli_flags_set_discovery(tmp_path):
    vocab = tmp_path / "names.txt"
    vocab.write_text("zebra\nkite\n")
    cfg = cli.config_from_args(_args(["--discovery", "--unknown", "regions", "--discovery-vocabulary", str(vocab)]))
    assert (cfg.discovery.enabled, cfg.discovery.unknown, cfg.discovery.vocabulary) == (True, "regions", str(vocab))
    assert cli.config_from_args(_args([])).discovery.enabled is False
    on_file = tmp_path / "on.json"
    on_file.write_text(json.dumps({"discovery": {"enabled": True}}))
    assert cli.config_from_args(_args(["--config", str(on_file), "--unknown", "ignore"])).discovery.unknown == "ignore"
    with pytest.raises(ValueError, match="--unknown need discovery on: add --discovery"):
        cli.config_from_args(_args(["--unknown", "ignore"]))
    with pytest.raises(SystemExit):
        _args(["--discovery", "--unknown", "hide"])
    from pipeline.usecases import explain, label

    for parser in (label.build_parser(), explain.build_parser()):  # the label and explain commands take them
        assert all(f in parser.format_help() for f in ("--discovery", "--unknown", "--discovery-vocabulary"))


def test_vocabulary_file_content_enters_the_fingerprint_only_when_on(tmp_path):
    vocab = tmp_path / "names.txt"
    vocab.write_text("zebra\nkite\n")
    on = build_config(None, {"discovery": {"enabled": True, "vocabulary": str(vocab)}})
    off = build_config(None, {"discovery": {"enabled": False, "vocabulary": str(vocab)}})
    before_on, before_off = on.fingerprint(), off.fingerprint()
    vocab.write_text("zebra\nkite\nyak\n")
    assert on.fingerprint() != before_on and off.fingerprint() == before_off == build_config().fingerprint()
    assert on.identity()["discovery"]["vocabulary_sha256"] == commit.sha256_hex(vocab.read_bytes())
    vocab.unlink()
    with pytest.raises(ValueError, match="neither 'dataset', 'coco' nor an existing file"):
        on.fingerprint()


def test_vocabulary_prompts_use_the_prompt_given_for_the_dataset(tmp_path):
    names, prompts = discovery.vocabulary_prompts("dataset", CATEGORIES)
    assert names == ("cat", "dog", "person") and prompts == tuple(c.prompt for c in CATEGORIES)  # the default
    method_prompts = {1: "cat", 7: "dog", 15: "person with clothes,people,human"}  # as CLIP-ES labels them
    names, prompts = discovery.vocabulary_prompts("dataset", CATEGORIES, lambda c: method_prompts[c.id])
    assert names == ("cat", "dog", "person") and prompts == ("cat", "dog", "person with clothes,people,human")
    vocab = tmp_path / "v.txt"
    vocab.write_text("kite\n")
    assert discovery.vocabulary_prompts(str(vocab), CATEGORIES) == (("kite",), ("kite",))


# --- a run through the production path, with planted tokens -----------------------------------


def _planted(grid: tuple[int, int], d: int) -> torch.Tensor:
    """[h, w, d] unit tokens: the lower-right quadrant one direction, the rest another (+ noise)."""
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(2, d))
    layout_ = np.zeros(grid, int)
    layout_[grid[0] // 2 :, grid[1] // 2 :] = 1
    x = dirs[layout_] + 0.2 * rng.normal(size=(*grid, d))
    return torch.from_numpy((x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32))


@pytest.fixture()
def planted_tokens(monkeypatch):
    real = Labeler.infer

    def infer(self, requests):
        work = real(self, requests)
        for w in work:
            if w.output is not None and w.output.tokens is not None:
                w.output.tokens = _planted(tuple(w.output.tokens.shape[:2]), w.output.tokens.shape[-1])
        return work

    monkeypatch.setattr(Labeler, "infer", infer)


def _dataset(tmp_path: Path, n: int = 4) -> list[dict]:
    records = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(blob_image(48, 64, seed=i)).save(path)
        records.append({"id": f"img{i}", "uri": str(path), "tags": [1]})
    return records


def _run(config, records, out: Path, stop_after: int | None = None) -> dict | None:
    """Label every shard not committed yet (as the runner's driver does), then merge; with
    ``stop_after``, stop after that many shards (the interrupted run) and do not merge."""
    from pipeline.runner import _LabelActor

    actor = _LabelActor(config, CATEGORIES, str(out), {})
    shards = list(manifest.shards(records, config.shard_size))
    for k, shard in enumerate(shards):
        if stop_after is not None and k == stop_after:
            return None
        if not commit.is_committed(actor.store, shard.shard_id, FP):
            actor.label(shard, FP)
    return merge.merge(actor.store, [s.shard_id for s in shards], FP)


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the wall-clock ones (timings)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "timings" not in p.name and "timings" not in p.parent.name}  # fmt: skip


@pytest.mark.slow
def test_a_discovery_run_resumes_byte_identically_and_loads(tmp_path, tiny_paths, planted_tokens):
    overrides = merge_overrides(tiny_overrides(tiny_paths, compensation=False),
                                {"shard_size": 2, "discovery": {"enabled": True, "unknown": "regions",
                                                                "max_area": 0.7}})  # fmt: skip
    config = build_config("voc-vit-b16", overrides)
    records = _dataset(tmp_path)
    whole = _run(config, records, tmp_path / "whole")
    assert _run(config, records, tmp_path / "resumed", stop_after=1) is None
    second = next(iter(manifest.shards(records, 2)))  # a crashed second shard left a stray region file
    stray = tmp_path / "resumed" / layout.region_file(list(manifest.shards(records, 2))[1].shard_id, "old")
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"stale")
    resumed = _run(config, records, tmp_path / "resumed")
    assert second.shard_id and whole == resumed
    a, b = _files(tmp_path / "whole"), _files(tmp_path / "resumed")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert any("/regions/" in k for k in a) and "merged/missing_tags.parquet" in a
    # What the run wrote loads with the readers users have.
    out = tmp_path / "whole"
    merged = COCO(str(out / layout.MERGED_REGIONS))
    assert len(merged.getImgIds()) == 4 and merged.getAnnIds()
    for shard in manifest.shards(records, 2):
        ds = COCO(str(out / layout.shard_file(shard.shard_id, layout.REGIONS_COCO)))
        for img in ds.loadImgs(ds.getImgIds()):
            region_map = discovery.decode_region_png((out / layout.region_file(shard.shard_id, img["source_id"]))
                                                     .read_bytes())  # fmt: skip
            assert region_map.shape == (48, 64)
            for ann in ds.loadAnns(ds.getAnnIds(imgIds=img["id"])):
                assert np.array_equal(ds.annToMask(ann), region_map == ann["region"])
        table = pq.read_table(out / layout.table_file(shard.shard_id, layout.SUGGESTIONS))
        schemas.check_table("suggestions", table)
        assert table.num_rows and set(table.column("suggested_class").to_pylist()) <= {c.name for c in CATEGORIES}
        images = pq.read_table(out / layout.table_file(shard.shard_id, "stats_images")).to_pydict()
        assert all(n >= 1 for n in images["n_unknown_regions"])


@pytest.mark.slow
def test_explain_draws_the_regions_and_their_suggestions(tmp_path, tiny_paths, planted_tokens):
    from pipeline.usecases import explain

    Image.fromarray(blob_image(48, 64)).save(tmp_path / "scene.png")
    overrides = merge_overrides(tiny_overrides(tiny_paths, compensation=False),
                                {"discovery": {"enabled": True, "unknown": "ignore", "max_area": 0.7}})  # fmt: skip
    config = build_config("voc-vit-b16", overrides)
    done = explain.explain_image(config, str(tmp_path / "scene.png"), ["cat"], str(tmp_path / "out"),
                                 dump=str(tmp_path / "maps.npz"))  # fmt: skip
    assert Image.open(tmp_path / "out" / "regions.png").size[0] > 0
    arrays = np.load(tmp_path / "maps.npz")
    region_map = arrays["region_map"]
    assert region_map.shape == (48, 64) and region_map.max() == len(done.result.suggestions) >= 1
    assert (region_map[24:, 32:] > 0).mean() > 0.5 and not region_map[:20, :28].any()  # the planted quadrant
    assert list(arrays["suggested_classes"]) == [n for n, _ in done.result.suggestions]
    assert (done.result.label_map[region_map > 0] != 0).all()  # "ignore": the region's background became 255


def _review_run(tmp_path: Path, discovery_on: bool) -> Path:
    from pipeline import types

    prefix = tmp_path / ("on" if discovery_on else "off")
    store = Store.open(str(prefix))
    config = build_config(None, {"discovery": {"enabled": discovery_on, "unknown": "regions"}})
    fp = types.run_fingerprint(config.fingerprint(), {"clip": {"sha256": "tiny"}}, "e" * 64)
    commit.write_run(store, fp, config.to_dict(), {"clip": {"sha256": "tiny"}})
    results = [_result("a", _regions(TWO) if discovery_on else None), _result("b", None)]
    commit.write_shard(store, "s0", results, [], CATEGORIES, fp.digest, discovery=discovery_on)
    merge.merge(store, ["s0"], fp.digest)
    return prefix


def test_review_image_page_shows_regions_and_suggestions(tmp_path):
    from starlette.testclient import TestClient

    from pipeline.review.app import create_app

    client = TestClient(create_app(str(_review_run(tmp_path, True))), base_url="http://127.0.0.1")
    page = client.get("/image", params={"id": "a"})
    assert page.status_code == 200
    assert 'id="regions-toggle"' in page.text and "/picture/regions?id=a" in page.text
    table = page.text.split('id="suggestions"')[1].split("</table>")[0]
    assert table.count("<td>dog</td>") == 2 and "<td>1</td>" in table and "<td>2</td>" in table
    png = client.get("/picture/regions", params={"id": "a"})
    rgba = np.array(Image.open(io.BytesIO(png.content)))
    assert png.status_code == 200 and np.array_equal(rgba[..., 3] > 0, _regions(TWO).region_map((16, 20)) > 0)
    assert "regions-toggle" not in client.get("/image", params={"id": "b"}).text  # no regions for b
    assert client.get("/picture/regions", params={"id": "b"}).status_code == 404
    off = TestClient(create_app(str(_review_run(tmp_path, False))), base_url="http://127.0.0.1")
    text = off.get("/image", params={"id": "a"}).text
    assert "regions-toggle" not in text and 'id="suggestions"' not in text


def test_the_label_summary_prints_the_missing_tags(tmp_path, capsys):
    from pipeline.runner import RunSummary
    from pipeline.usecases.label import Outcome, print_outcome

    store = Store.open(str(tmp_path))
    commit.write_shard(store, "s0", [_result("a", _regions(TWO))], [], CATEGORIES, FP, discovery=True)
    merged = merge.merge(store, ["s0"], FP)
    print_outcome(Outcome(RunSummary(shards_done=1, images=1, committed=["s0"]), merged), str(tmp_path), 8)
    out = capsys.readouterr().out
    assert "suggested but never tagged" in out and "dog (2 regions, mean score 0.70)" in out
    print_outcome(Outcome(RunSummary(), {"shards": ["s0"]}), str(tmp_path), 8)  # discovery off: no such line
    assert "never tagged" not in capsys.readouterr().out
