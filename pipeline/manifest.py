"""Manifests: streaming image records (id, uri, tags) and their split into shards.

A manifest is a JSONL file (one record per line, ``schemas/manifest_record.v1``) or a COCO
instances file, whose tags are the categories of each image's annotations (the standard WSSS
setting). Records stream: the driver never holds more than one shard of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline import schemas, storage
from pipeline.labeler import Category
from pipeline.prompts import class_prompt


@dataclass(frozen=True)
class Shard:
    """A manifest slice: its content-derived id and its records, in manifest order."""

    shard_id: str
    records: tuple[dict[str, Any], ...]


def read_jsonl(uri: str, **storage_options: Any) -> Iterator[dict[str, Any]]:
    """Stream and validate the records of a JSONL manifest; errors name the line and field."""
    seen: set[str] = set()
    with fsspec.open(uri, "rt", encoding="utf-8", **storage_options) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"manifest {uri} line {i + 1}: not valid JSON ({err.msg})") from None
            yield _checked(record, f"manifest {uri} line {i + 1} (id {_id_of(record)!r})", seen)


def _id_of(record: Any) -> Any:
    return record.get("id") if isinstance(record, Mapping) else None


def _checked(record: Any, where: str, seen: set[str]) -> dict[str, Any]:
    schemas.validate("manifest_record", record, where)
    if record["id"] in seen:
        raise ValueError(f"{where}: field 'id' repeats an earlier record; image ids must be unique")
    seen.add(record["id"])
    return record


def read_coco(
    annotations: str, images: str, prompt_set: str = "coco", **storage_options: Any
) -> tuple[list[Category], list[dict[str, Any]]]:
    """Categories and manifest records from a COCO instances file; ``images`` is the folder
    (local or fsspec URL) holding the files named in ``images[].file_name``."""
    with fsspec.open(annotations, "rt", encoding="utf-8", **storage_options) as f:
        doc = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ValueError(f"{annotations}: not a COCO instances file (no {key!r} list)")
    categories = [Category(int(c["id"]), c["name"], class_prompt(c["name"], prompt_set)) for c in doc["categories"]]
    tags: dict[int, set[int]] = {}
    for ann in doc["annotations"]:
        tags.setdefault(int(ann["image_id"]), set()).add(int(ann["category_id"]))
    prefix = images.rstrip("/")
    seen: set[str] = set()
    records = []
    for i, im in enumerate(sorted(doc["images"], key=lambda im: int(im["id"]))):
        record = {
            "id": str(im["id"]),
            "uri": f"{prefix}/{im['file_name']}",
            "tags": sorted(tags.get(int(im["id"]), ())),
        }
        record.update({k: int(im[k]) for k in ("width", "height") if k in im})
        records.append(_checked(record, f"{annotations} image {i} (id {im['id']!r})", seen))
    return categories, records


def shards(records: Iterable[dict[str, Any]], shard_size: int) -> Iterator[Shard]:
    """Consecutive slices of ``shard_size`` records; ids from position and content."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    batch: list[dict[str, Any]] = []
    index = 0
    for record in records:
        batch.append(record)
        if len(batch) == shard_size:
            yield Shard(storage.shard_id_for(index, [r["id"] for r in batch]), tuple(batch))
            batch, index = [], index + 1
    if batch:
        yield Shard(storage.shard_id_for(index, [r["id"] for r in batch]), tuple(batch))


def fingerprint(records: Iterable[Mapping[str, Any]], categories: Iterable[Category]) -> str:
    """sha256 over the categories and every record, in order (streams)."""
    h = hashlib.sha256()
    for c in categories:
        h.update(json.dumps([c.id, c.name, c.prompt]).encode() + b"\n")
    h.update(storage.manifest_fingerprint(records).encode())
    return h.hexdigest()
