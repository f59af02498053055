"""Manifests: streaming image records (id, uri, tags) and their split into shards.

A manifest is a JSONL file (one record per line, ``schemas/manifest_record.v1``) or a COCO
instances file, whose tags are the categories of each image's annotations (the standard WSSS
setting). Records stream: the driver never holds more than one shard of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from pipeline import schemas, storage
from pipeline.labeler import Category
from pipeline.prompts import class_prompt


@dataclass(frozen=True)
class Shard:
    """A manifest slice: its content-derived id, its records in manifest order, and how the
    outputs name each image (``storage.ImageName`` by id). ``shards`` names the images of the
    whole manifest together; a Shard built without ``names`` names its own records alone."""

    shard_id: str
    records: tuple[dict[str, Any], ...]
    names: dict[str, storage.ImageName] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", storage.image_names(self.records))


class ManifestError(ValueError):
    """A manifest record (or the category list) a run cannot use; the message names the record
    and the field."""


def read_categories(uri: str, prompt_set: str = "voc", **storage_options: Any) -> list[Category]:
    """A JSON list of ``{"id": int 1..254, "name": str}`` (COCO's ``categories`` list works)."""
    with fsspec.open(uri, "rt", encoding="utf-8", **storage_options) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as err:
            raise ManifestError(f"categories {uri}: not valid JSON ({err.msg}, line {err.lineno})") from None
    return categories_from(doc, f"categories {uri}", prompt_set)


def categories_from(doc: Any, where: str, prompt_set: str) -> list[Category]:
    """Validated categories: ids 1..254 (0 is background, 255 ignore), unique ids and names."""
    if not isinstance(doc, list) or not doc:
        raise ManifestError(f"{where}: expected a non-empty JSON list of {{id, name}}")
    cats: list[Category] = []
    for i, c in enumerate(doc):
        cid, name = (c.get("id"), c.get("name")) if isinstance(c, Mapping) else (None, None)
        if not isinstance(cid, int) or isinstance(cid, bool) or not 1 <= cid <= 254:
            raise ManifestError(f"{where} entry {i}: field 'id' must be an integer in 1..254, got {cid!r}")
        if not isinstance(name, str) or not name.strip():
            raise ManifestError(f"{where} entry {i} (id {cid}): field 'name' must be a non-empty string")
        if any(cid == o.id or name == o.name for o in cats):
            raise ManifestError(f"{where} entry {i} (id {cid}, name {name!r}): repeats an earlier id or name")
        cats.append(Category(cid, name, class_prompt(name, prompt_set)))
    return cats


class CompactStringSet:
    """A set of strings held as 8-byte blake2b digests: a sorted numpy array plus a small Python
    set of the latest additions, merged into the array every ``batch`` additions. About 8 bytes a
    string (16 while merging) instead of ~100 for a ``set[str]``, so a 10M-record manifest's ids fit
    in ~80 MiB. Two strings share a digest with probability about n**2 / 2**65 (3e-6 for 10M
    strings): the later one then reads as already present."""

    def __init__(self, batch: int = 1 << 18) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._batch = batch

    @staticmethod
    def _digest(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")

    def __contains__(self, text: str) -> bool:
        return self._has(self._digest(text))

    def _has(self, key: int) -> bool:
        if key in self._recent:
            return True
        i = int(self._sorted.searchsorted(np.uint64(key)))  # a uint64 key: no casting of the array
        return i < self._sorted.size and int(self._sorted[i]) == key

    def add(self, text: str) -> bool:
        """Add ``text``; False when it was there already."""
        key = self._digest(text)
        if self._has(key):
            return False
        self._recent.add(key)
        if len(self._recent) >= self._batch:
            merged = np.concatenate([self._sorted, np.fromiter(self._recent, np.uint64, len(self._recent))])
            merged.sort()
            self._sorted, self._recent = merged, set()
        return True


class _Checker:
    """Checks records one by one: schema, unique ids, tags resolved to known category ids.
    With ``problems`` a bad record is noted there and skipped; without, it raises."""

    def __init__(self, categories: Iterable[Category] | None, problems: list[str] | None) -> None:
        cats = list(categories) if categories is not None else None
        self.ids = {c.id for c in cats} if cats is not None else None
        self.by_name = {c.name: c.id for c in cats or ()}
        self.problems, self.seen = problems, CompactStringSet()

    def __call__(self, record: Any, where: str) -> dict[str, Any] | None:
        try:
            return self._check(record, where)
        except ManifestError as err:
            if self.problems is None:
                raise
            self.problems.append(str(err))
            return None

    def _check(self, record: Any, where: str) -> dict[str, Any]:
        if isinstance(record, _BadJson):
            raise ManifestError(f"{where}: not valid JSON ({record.msg})")
        try:
            schemas.validate("manifest_record", record, where)
        except ValueError as err:
            raise ManifestError(str(err)) from None
        if not self.seen.add(record["id"]):
            raise ManifestError(f"{where}: field 'id' repeats an earlier record; image ids must be unique")
        escape = leaves_root(record["file_name"]) if "file_name" in record else None
        if escape:
            raise ManifestError(f"{where}: field 'file_name' {record['file_name']!r} {escape}; file names must be "
                                "relative paths inside the image folder, without '..' parts")  # fmt: skip
        return {**record, "tags": [self._tag(t, j, where) for j, t in enumerate(record["tags"])]}

    def _tag(self, tag: int | str, j: int, where: str) -> int:
        if isinstance(tag, str):
            if self.ids is None:
                raise ManifestError(f"{where}: field 'tags/{j}': tag {tag!r} is a name; names need the category list")
            if tag not in self.by_name:
                raise ManifestError(f"{where}: field 'tags/{j}': {tag!r} is not a category name "
                                    f"(known: {_sample(self.by_name)})")  # fmt: skip
            return self.by_name[tag]
        if self.ids is not None and tag not in self.ids:
            raise ManifestError(f"{where}: field 'tags/{j}': {tag} is not a category id (known: {_sample(self.ids)})")
        return tag


_DRIVE = re.compile(r"[A-Za-z]:")


def leaves_root(name: str) -> str | None:
    """Why the relative file name ``name`` would be read from outside its image folder ("is an
    absolute path", "has a '..' part", "is a URL"), or None when it stays inside."""
    if "://" in name:
        return "is a URL"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "is an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "has a '..' part"
    return None


def _sample(values: Iterable[Any], n: int = 10) -> str:
    items = sorted(values, key=str)
    return ", ".join(map(repr, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def read_jsonl(uri: str, categories: Iterable[Category] | None = None, problems: list[str] | None = None,
               **storage_options: Any) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Stream and check the records of a JSONL manifest; errors name the line and field.

    Tags are category ids or names; given ``categories``, names become ids and unknown tags are
    errors. Without ``problems`` the first bad record raises ``ManifestError``; with a list, each
    bad record's message is appended there and the record skipped (a full scan before any work).
    """
    check = _Checker(categories, problems)
    with fsspec.open(uri, "rt", encoding="utf-8", **storage_options) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                record = _BadJson(err.msg)
            checked = check(record, f"manifest {uri} line {i + 1} (id {_id_of(record)!r})")
            if checked is not None:
                yield checked


@dataclass(frozen=True)
class _BadJson:
    msg: str


def _id_of(record: Any) -> Any:
    return record.get("id") if isinstance(record, Mapping) else None


def read_coco(annotations: str, images: str, prompt_set: str = "coco", problems: list[str] | None = None,
              **storage_options: Any) -> tuple[list[Category], list[dict[str, Any]]]:  # fmt: skip
    """Categories and manifest records from a COCO instances file; ``images`` is the folder
    (local or fsspec URL) holding the files named in ``images[].file_name``. ``problems`` as in
    ``read_jsonl``."""
    with fsspec.open(annotations, "rt", encoding="utf-8", **storage_options) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{annotations}: not valid JSON ({err.msg}, line {err.lineno})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise ManifestError(f"{annotations}: not a COCO instances file (no {key!r} list)")
    categories = categories_from(doc["categories"], f"{annotations} categories", prompt_set)
    check = _Checker(categories, problems)
    tags: dict[Any, set[Any]] = {}
    for ann in doc["annotations"]:
        if isinstance(ann, Mapping):  # anything else names no image and no tag
            tags.setdefault(ann.get("image_id"), set()).add(ann.get("category_id"))
    prefix = images.rstrip("/")
    records = []
    for i, im in enumerate(sorted(doc["images"], key=_coco_order)):
        im = im if isinstance(im, Mapping) else {}  # reported below: no id, no file name
        name = im.get("file_name")
        named = isinstance(name, str) and bool(name)
        record = {"id": str(im.get("id")), "uri": f"{prefix}/{name}" if named else None,
                  "tags": sorted(tags.get(im.get("id"), ()), key=str)}  # fmt: skip
        if named:  # outputs name the label map and the COCO image after it (storage.ImageName)
            record["file_name"] = name
        record.update({k: im[k] for k in ("width", "height") if k in im})
        checked = check(record, f"{annotations} images[{i}] (id {im.get('id')!r})")
        if checked is not None:
            records.append(checked)
    return categories, records


def _coco_order(im: Any) -> tuple[int, int, str]:
    """Numeric ids in numeric order (COCO's), then any others by their text."""
    cid = im.get("id") if isinstance(im, Mapping) else None
    numeric = isinstance(cid, int) and not isinstance(cid, bool)
    return (0, cid, "") if numeric else (1, 0, str(cid))


def shards(records: Iterable[dict[str, Any]], shard_size: int) -> Iterator[Shard]:
    """Consecutive slices of ``shard_size`` records; ids from position and content. Images are
    named over the whole stream (``storage.ImageNamer``), so names do not depend on the shard size."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    namer = storage.ImageNamer(CompactStringSet())  # names over millions of records in ~8 bytes each
    batch: list[dict[str, Any]] = []
    index = 0
    for record in records:
        batch.append(record)
        if len(batch) == shard_size:
            yield _shard(index, batch, namer)
            batch, index = [], index + 1
    if batch:
        yield _shard(index, batch, namer)


def _shard(index: int, batch: list[dict[str, Any]], namer: storage.ImageNamer) -> Shard:
    names = {r["id"]: namer(r) for r in batch}
    return Shard(storage.shard_id_for(index, [r["id"] for r in batch]), tuple(batch), names)


def fingerprint(records: Iterable[Mapping[str, Any]], categories: Iterable[Category]) -> str:
    """sha256 over the categories and every record, in order (streams)."""
    h = hashlib.sha256()
    for c in categories:
        h.update(json.dumps([c.id, c.name, c.prompt]).encode() + b"\n")
    h.update(storage.manifest_fingerprint(records).encode())
    return h.hexdigest()
