"""A shard's files as bytes: the one place that chooses which formats a shard writes. Pure; no I/O.

Formats are writers selected by name, as img2dataset's ``output_format``; ``DEFAULT_FORMATS``
(every one of them) is what a run writes:

    png     labels/<name>.png: the indexed PNG label map of each labelled image (``pngs``)
    coco    shards/<id>/annotations.json: COCO RLE annotations with class scores (``coco``)
    stats   shards/<id>/stats_images.parquet, stats_classes.parquet (deterministic) and
            timings.parquet (wall clock, volatile) (``stats``)
    regions shards/<id>/regions/<name>.png and regions.json: discovery's region maps and their
            COCO file, when the images carry region maps (``discovery.unknown: regions``)
    suggestions  shards/<id>/suggestions.parquet: discovery's suggestions (discovery on only)

Without discovery the last two write nothing, so such a run's files are as before they existed.

``merge`` and the audit read ``coco`` and ``stats``. Every file but the volatile ones is
checksummed in the commit marker (``commit``), whose counts hold all six keys whatever the
formats (0 for what a format not chosen would have counted).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import coco, discovery, pngs, stats
from pipeline.storage import layout
from pipeline.types import Failure, ImageName, LabelResult, safe_name

TABLES = ("stats_images", "stats_classes")  # deterministic Parquet tables
VOLATILE_TABLES = ("timings",)
COUNT_KEYS = ("images", "ok", "failed", "annotations", "class_rows", "label_maps")  # the marker's order


@dataclass(frozen=True)
class ShardFiles:
    """A shard's files before writing: deterministic ones (checksummed in the marker) and volatile ones."""

    files: dict[str, bytes]
    volatile: dict[str, bytes]
    counts: dict[str, int]


@dataclass(frozen=True)
class ShardContent:
    """What every writer reads: the shard's labelled images (``ImageEntry``, sorted by id), its
    failures (sorted by id), how each image is named, the categories, the run's fingerprint and
    whether discovery is on (``discovery.enabled``)."""

    shard_id: str
    entries: list[stats.ImageEntry]
    failures: list[Failure]
    names: dict[str, ImageName]
    categories: Sequence[Any]
    fingerprint: str
    discovery: bool = False


def _png(shard: ShardContent) -> ShardFiles:
    files = {layout.label_file(shard.names[e.image_id].label): pngs.encode_png(e.label_map) for e in shard.entries}
    return ShardFiles(files, {}, {"label_maps": len(shard.entries)})


def _coco(shard: ShardContent) -> ShardFiles:
    items = [(e.image_id, e.label_map, e.class_scores, shard.names[e.image_id].file_name) for e in shard.entries]
    doc = coco.build_coco(items, shard.categories,
                          {"description": "tag2mask pseudo-labels", "fingerprint": shard.fingerprint})  # fmt: skip
    data = json.dumps(doc, separators=(",", ":")).encode()
    return ShardFiles({layout.shard_file(shard.shard_id, layout.ANNOTATIONS): data}, {},
                      {"annotations": len(doc["annotations"])})  # fmt: skip


def _stats(shard: ShardContent) -> ShardFiles:
    sid = shard.shard_id
    rows = {
        "stats_images": [e.image_row for e in shard.entries] + [stats.failed_row(f, sid) for f in shard.failures],
        "stats_classes": [row for e in shard.entries for row in e.class_rows],
        "timings": [row for e in shard.entries for row in e.timing_rows],
    }
    schema = {"stats_images": "stats_images_discovery" if shard.discovery else "stats_images"}
    encoded = {name: stats.parquet_bytes(stats.to_table(schema.get(name, name), r)) for name, r in rows.items()}
    return ShardFiles({layout.table_file(sid, name): encoded[name] for name in TABLES},
                      {layout.table_file(sid, name): encoded[name] for name in VOLATILE_TABLES},
                      {"class_rows": len(rows["stats_classes"])})  # fmt: skip


def _regions(shard: ShardContent) -> ShardFiles:
    mapped = [e for e in shard.entries if e.region_map is not None]
    if not shard.discovery or not mapped:
        return ShardFiles({}, {}, {})
    sid = shard.shard_id
    files = {layout.region_file(sid, shard.names[e.image_id].label): discovery.encode_region_png(e.region_map)
             for e in mapped if e.region_map is not None}  # fmt: skip
    items = [(e.image_id, e.region_map, e.suggestion_rows or [], shard.names[e.image_id].file_name)
             for e in mapped if e.region_map is not None]  # fmt: skip
    doc = discovery.regions_coco(items, {"description": "tag2mask discovered regions",
                                         "fingerprint": shard.fingerprint})  # fmt: skip
    files[layout.shard_file(sid, layout.REGIONS_COCO)] = json.dumps(doc, separators=(",", ":")).encode()
    return ShardFiles(files, {}, {})


def _suggestions(shard: ShardContent) -> ShardFiles:
    if not shard.discovery:
        return ShardFiles({}, {}, {})
    rows = [row for e in shard.entries for row in e.suggestion_rows or []]
    data = stats.parquet_bytes(stats.to_table("suggestions", rows))
    return ShardFiles({layout.table_file(shard.shard_id, layout.SUGGESTIONS): data}, {}, {})


WRITERS: dict[str, Callable[[ShardContent], ShardFiles]] = {
    "png": _png, "coco": _coco, "stats": _stats, "regions": _regions, "suggestions": _suggestions,
}  # fmt: skip
DEFAULT_FORMATS: tuple[str, ...] = tuple(WRITERS)


def check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """``formats`` as a tuple of known writer names, without repeats; ValueError otherwise."""
    chosen = tuple(dict.fromkeys(formats))
    unknown = [f for f in chosen if f not in WRITERS]
    if unknown or not chosen:
        raise ValueError(f"output formats {list(chosen)} must be a non-empty selection of {sorted(WRITERS)}")
    return chosen


def _ordered(
    results: Sequence[Any], failures: Sequence[Failure | tuple[str, str, str]], names: Mapping[str, ImageName]
) -> tuple[list[Any], list[Failure]]:
    fails = [f if isinstance(f, Failure) else Failure(*f) for f in failures]
    ids = [r.image_id for r in results] + [f.image_id for f in fails]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"image ids must be unique within a shard (results and failures together): {dup[:5]}")
    labels = [names[i].label.lower() for i in ids]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two images of shard would share a label file: {sorted(names[i].label for i in ids)[:5]}; "
                         "name them with types.image_names")  # fmt: skip
    # Sorted by id: the files do not depend on the order in which batches finished.
    return sorted(results, key=lambda r: r.image_id), sorted(fails, key=lambda f: f.image_id)


def names_for(ids: Iterable[str], names: Mapping[str, ImageName] | None) -> dict[str, ImageName]:
    """``names`` for ``ids``; without names (old callers), labels are named by id and the COCO
    ``file_name`` is the label's path, as before label maps were named by file stem."""
    if names is None:
        return {i: ImageName(safe_name(i), layout.label_path(i)) for i in ids}
    unnamed = [i for i in ids if i not in names]
    if unnamed:
        raise ValueError(f"images {unnamed[:5]} have no ImageName; build names with types.image_names(records)")
    return dict(names)


def failure_ids(failures: Iterable[Failure | tuple[str, str, str]]) -> list[str]:
    """The image ids of ``failures`` (``Failure`` records or ``(image_id, status, error)`` tuples)."""
    return [f[0] if isinstance(f, tuple) else f.image_id for f in failures]


def build_shard(shard_id: str, results: Sequence[LabelResult | stats.ImageEntry],
                failures: Sequence[Failure | tuple[str, str, str]], categories: Sequence[Any], fingerprint: str,
                names: Mapping[str, ImageName] | None = None,
                formats: Iterable[str] = DEFAULT_FORMATS, discovery: bool = False) -> ShardFiles:  # fmt: skip
    """The shard's files as bytes, by path relative to the prefix. ``results``: an ``ImageEntry``
    per image (label_shard reduces each result as it finishes) or whole LabelResults. ``names``:
    the label stem and image file name of each image (``image_names``); see ``names_for``
    without. ``formats``: the writers to run (``WRITERS``), each once, in the order given.
    ``discovery``: the run's ``discovery.enabled`` (its stats columns and files)."""
    chosen = check_formats(formats)
    layout.shard_dir(shard_id)  # checks the id before any work
    ids = [r.image_id for r in results] + failure_ids(failures)
    names = names_for(ids, names)
    results, fails = _ordered(results, failures, names)
    entries = [r if isinstance(r, stats.ImageEntry)
               else stats.entry(r, shard_id, layout.label_file(names[r.image_id].label)) for r in results]  # fmt: skip
    shard = ShardContent(shard_id, entries, fails, names, categories, fingerprint, discovery)
    files: dict[str, bytes] = {}
    volatile: dict[str, bytes] = {}
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts.update(images=len(entries) + len(fails), ok=len(entries), failed=len(fails))
    for name in chosen:
        written = WRITERS[name](shard)
        files.update(written.files)
        volatile.update(written.volatile)
        counts.update(written.counts)
    return ShardFiles(files, volatile, counts)
