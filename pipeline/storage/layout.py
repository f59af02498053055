"""Every path of a run under its output prefix: the one module that knows them. Pure; no I/O.

    run.json                              fingerprint + config + model fingerprint (schemas/run.v1)
    labels/<name>.png                     indexed PNG label map of each image, <name> its file stem (pngs.py)
    shards/<shard_id>/annotations.json    COCO annotations of the shard's images (pipeline/coco.py)
    shards/<shard_id>/stats_images.parquet, stats_classes.parquet   quality statistics (deterministic)
    shards/<shard_id>/timings.parquet     wall-clock seconds per stage (the only non-deterministic file)
    shards/<shard_id>/regions/<name>.png  discovery, unknown "regions": uint16 region map per image
    shards/<shard_id>/regions.json        discovery, unknown "regions": COCO "unknown object" regions
    shards/<shard_id>/suggestions.parquet discovery: the best vocabulary class of each region
    shards/<shard_id>/_COMMITTED.json     commit marker, written last (schemas/commit_marker.v1)
    merged/annotations.json               every committed shard's COCO annotations in one file
    merged/stats_images/part-00000.parquet, merged/stats_classes/..., merged/timings/...   datasets
    merged/regions.json, merged/suggestions/part-00000.parquet   discovery's, when the shards have them
    merged/missing_tags.parquet           discovery: classes most often suggested but never tagged
    merged/_MERGED.json                   written last by ``merge``
    _probe/<random hex>.txt               the access probe (``store.check_access``), deleted again

How ``<name>`` is chosen: ``pipeline.types`` (``ImageNamer``, ``safe_name``).
"""

from __future__ import annotations

import re

from pipeline.types import safe_name

RUN_FILE = "run.json"
MARKER = "_COMMITTED.json"
SHARDS_DIR = "shards"
LABELS_DIR = "labels"
MERGED_DIR = "merged"
MERGED_MARKER = f"{MERGED_DIR}/_MERGED.json"
MERGED_ANNOTATIONS = f"{MERGED_DIR}/annotations.json"
REVIEW_DIR = "review"  # review decisions (pipeline.review), append-only files
PROBE_DIR = "_probe"  # check_access writes, reads and deletes one small object here
ANNOTATIONS = "annotations.json"  # a shard's COCO file
REGIONS_COCO = "regions.json"  # a shard's COCO file of discovered regions
SUGGESTIONS = "suggestions"  # a shard's Parquet table of region suggestions
MERGED_REGIONS = f"{MERGED_DIR}/{REGIONS_COCO}"
MERGED_MISSING_TAGS = f"{MERGED_DIR}/missing_tags.parquet"

# One part of a path under the prefix: no "..", no leading dot, no separators.
PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,127}")


def unsafe_part(rel: str) -> str | None:
    """The first part of the relative path ``rel`` ("a/b/c") that is not a safe name, or None."""
    return next((p for p in rel.split("/") if not PART.fullmatch(p)), None)


def shard_dir(shard_id: str) -> str:
    """``shards/<shard_id>``; ValueError for an id that is not a safe file name."""
    if not isinstance(shard_id, str) or not PART.fullmatch(shard_id):
        raise ValueError(f"shard id {shard_id!r} must match {PART.pattern} (letters, digits, ._=-)")
    return f"{SHARDS_DIR}/{shard_id}"


def shard_file(shard_id: str, name: str) -> str:
    """Path of the shard's file ``name`` (``annotations.json``, ``stats_images.parquet``, ...)."""
    return f"{shard_dir(shard_id)}/{name}"


def table_file(shard_id: str, table: str) -> str:
    """Path of the shard's Parquet table ``table`` (``stats_images``, ``stats_classes``, ``timings``)."""
    return shard_file(shard_id, f"{table}.parquet")


def marker_file(shard_id: str) -> str:
    """Path of the shard's commit marker."""
    return shard_file(shard_id, MARKER)


def marker_glob() -> str:
    """Pattern (relative to the prefix) matching every shard's commit marker."""
    return f"{SHARDS_DIR}/*/{MARKER}"


def shard_id_of_marker(path: str) -> str:
    """The shard id of a marker path that ``marker_glob`` matched (absolute or relative)."""
    parts = path.rstrip("/").rsplit("/", 3)
    if len(parts) < 3 or parts[-1] != MARKER or parts[-3] != SHARDS_DIR:
        raise ValueError(f"{path!r} is not a commit marker path ({marker_glob()})")
    return parts[-2]


def merged_table_dir(table: str) -> str:
    """Folder of the merged Parquet dataset ``table``."""
    return f"{MERGED_DIR}/{table}"


def merged_part(table: str, index: int) -> str:
    """Path of the ``index``-th file of the merged Parquet dataset ``table``."""
    return f"{merged_table_dir(table)}/part-{index:05d}.parquet"


def label_file(name: str) -> str:
    """Path of the label PNG named ``name`` (an ``ImageName.label``), relative to the prefix."""
    return f"{LABELS_DIR}/{name}.png"


def label_name(path: str) -> str:
    """The ``name`` of a label file path ``labels/<name>.png`` (``label_file``'s inverse)."""
    prefix, suffix = f"{LABELS_DIR}/", ".png"
    if not (path.startswith(prefix) and path.endswith(suffix)) or len(path) <= len(prefix) + len(suffix):
        raise ValueError(f"{path!r} is not a label file path ({label_file('<name>')})")
    return path[len(prefix) : -len(suffix)]


def label_path(image_id: str) -> str:
    """Path of an image's label PNG named by its id (writers given no ``ImageName``; old runs)."""
    return label_file(safe_name(image_id))


def region_file(shard_id: str, name: str) -> str:
    """Path of the region map PNG of the image whose label is named ``name`` (discovery)."""
    return shard_file(shard_id, f"regions/{name}.png")


def probe_file(token: str) -> str:
    """Path of the access probe object with the random ``token``."""
    return f"{PROBE_DIR}/{token}.txt"
