"""Manifests: streaming image records (id, uri, tags) and their split into shards.

A manifest is a JSONL file (one record per line, ``schemas/manifest_record.v1``) or a COCO
instances file, whose tags are the categories of each image's annotations (the standard WSSS
setting). Records stream: the driver never holds more than one shard of them.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import orjson

from pipeline import schemas, types
from pipeline.prompts import class_prompt
from pipeline.schemas import RECORD_KEYS
from pipeline.types import (
    MAX_CLASS_ID,
    Category,
    ImageName,
    ImageNamer,
    check_class_id,
    image_names,
    manifest_fingerprint,
    shard_id_for,
)


@dataclass(frozen=True)
class Shard:
    """A manifest slice: its content-derived id, its records in manifest order, and how the
    outputs name each image (``types.ImageName`` by id). ``shards`` names the images of the
    whole manifest together; a Shard built without ``names`` names its own records alone."""

    shard_id: str
    records: tuple[dict[str, Any], ...]
    names: dict[str, ImageName] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", image_names(self.records))


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
        try:
            cid = check_class_id(cid, "field 'id'")
        except ValueError as err:
            raise ManifestError(f"{where} entry {i}: {err}") from None
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
    strings): the later one then reads as already present. Only ``shards``' image names use it,
    where that is safe (``types.ImageNamer`` then picks another free name); manifest ids are
    checked exactly by ``_JsonlChecker``."""

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
    With ``problems`` a bad record is noted there and skipped; without, it raises. Ids are held
    exactly (COCO files, a few hundred thousand images); JSONL streams use ``_JsonlChecker``."""

    def __init__(self, categories: Iterable[Category] | None, problems: list[str] | None) -> None:
        cats = list(categories) if categories is not None else None
        self.ids = {c.id for c in cats} if cats is not None else None
        self.by_name = {c.name: c.id for c in cats or ()}
        self.problems, self.seen = problems, set[str]()

    def __call__(self, record: Any, where: str) -> dict[str, Any] | None:
        try:
            return self._check(record, where)
        except ManifestError as err:
            if self.problems is None:
                raise
            self.problems.append(str(err))
            return None

    def _check(self, record: Any, where: str) -> dict[str, Any]:
        self._schema(record, where)
        if record["id"] in self.seen:
            raise ManifestError(_repeated(where))
        self.seen.add(record["id"])
        return self._rest(record, where)

    def _schema(self, record: Any, where: str) -> None:
        if isinstance(record, _BadJson):
            raise ManifestError(f"{where}: not valid JSON ({record.msg})")
        try:
            schemas.validate("manifest_record", record, where)
        except ValueError as err:
            raise ManifestError(str(err)) from None

    def _rest(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        """The checks after the id's: file name, then tags (names become ids)."""
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


def _repeated(where: str) -> str:
    return f"{where}: field 'id' repeats an earlier record; image ids must be unique"


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
    Ids are held as 8-byte hashes; a hash seen before is confirmed exactly by a second look at the
    lines before (``_JsonlChecker``), so only a truly repeated id is reported.

    Cost: every block (64 KiB) holding the first repeat of an id re-reads the file up to that
    block, so with ``problems`` a manifest with repeated ids spread over its length reads in time
    quadratic in its size. Collect problems with ``scan_jsonl`` instead (one pass, then one second
    look for all suspects together; what the label job does); a production read after a clean
    scan has no repeats and so no second look.
    """
    check = _JsonlChecker(uri, categories, storage_options, defer=False)
    for block in check.blocks():
        for _, record, _, problem in block:
            if problem is None:
                yield record
            elif problems is None:
                raise ManifestError(problem)
            else:
                problems.append(problem)


@dataclass(frozen=True)
class Scan:
    """What one pass over a JSONL manifest found: the fingerprint (``fingerprint`` of the good
    records), their count and, given a shard size, the ids of ``shards``' shards (they need no
    second pass). Meaningful only when the scan's problem list stayed empty."""

    fingerprint: str
    count: int
    shard_ids: tuple[str, ...] | None


def scan_jsonl(uri: str, categories: list[Category], problems: list[str], shard_size: int | None = None,
               **storage_options: Any) -> Scan:  # fmt: skip
    """One pass that checks every record as ``read_jsonl`` does (its messages, in line order, are
    appended to ``problems``), fingerprints and counts the good ones, and gives the shard ids
    of ``shards(records, shard_size)``. A hash of an id seen before is a suspect until the end;
    then one second look over the stream confirms (or clears) every suspect exactly."""
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    check = _JsonlChecker(uri, categories, storage_options, defer=True)
    h, count = hashlib.sha256(), 0
    found: list[tuple[int, str]] = []
    shard_ids: list[str] = []
    batch: list[str] = []
    for block in check.blocks():
        canon = []
        for line, record, fast, problem in block:
            if problem is not None:
                found.append((line, problem))
                continue
            count += 1
            canon.append(orjson.dumps(record, option=orjson.OPT_SORT_KEYS) if fast else types.canonical_json(record))
            if shard_size is not None:
                batch.append(record["id"])
                if len(batch) == shard_size:
                    shard_ids.append(shard_id_for(len(shard_ids), batch))
                    batch = []
        if canon:
            h.update(b"\n".join(canon) + b"\n")
    repeated = check.confirm_suspects()
    taken = len(repeated.keys() - {line for line, _ in found})  # counted as good until confirmed
    if repeated:
        found = sorted({**dict(found), **repeated}.items())
    problems.extend(message for _, message in found)
    if batch:
        shard_ids.append(shard_id_for(len(shard_ids), batch))
    ids = tuple(shard_ids) if shard_size is not None else None
    return Scan(_with_categories(categories, h.hexdigest()), count - taken, ids)


# A block of these bytes only (printable ASCII but the backslash, and newlines) holds strings of
# printable ASCII without escapes, where orjson's sorted output is ``types.canonical_json``'s.
_PLAIN_BYTES = bytes(b for b in range(0x20, 0x7F) if b != 0x5C) + b"\n"
_BLOCK_BYTES = 1 << 16  # 64 KiB: fastest here (1 MiB blocks took twice the memory and ~2x the time)


def _hashes(texts: list[str]) -> np.ndarray:
    """uint64 hashes of ``texts`` (Python's string hash: cached, per process). Equal hashes are
    only suspects: every hit is confirmed by comparing the strings themselves."""
    return np.fromiter(map(hash, texts), np.int64, len(texts)).view(np.uint64)


def _maybe_leaves(name: str) -> bool:
    """False only when ``leaves_root(name)`` is None (a cheap test for the common name)."""
    return ":" in name or ".." in name or name.startswith(("/", "\\"))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a block's records are made: thousands of new dicts and
    lists (no cycles among them) would otherwise trigger collections that cost more than the
    parsing itself. Only around work on one block, never while the consumer holds the stream."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_TAG_TYPES = {int, str}


def _plain_optional(doc: dict) -> bool:
    """The optional fields of a record hold what the schema asks, and its file name stays inside."""
    get = doc.get
    name, truth, width, height = get("file_name", "-"), get("ground_truth", "-"), get("width", 1), get("height", 1)
    if type(name) is not str or type(truth) is not str or not name or not truth:
        return False
    if type(width) is not int or type(height) is not int or width < 1 or height < 1:
        return False
    return not (_maybe_leaves(name) and leaves_root(name))


def _raw_blocks(f: Any) -> Iterator[bytes]:
    """The file's bytes in blocks of about _BLOCK_BYTES, each ending after a newline (or at the end)."""
    rest = b""
    while chunk := f.read(_BLOCK_BYTES):
        data = rest + chunk
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut]
        rest = data[cut:]
    if rest:
        yield rest


class _JsonlChecker(_Checker):
    """Checks a JSONL stream block by block (64 KiB). A block of plain bytes is parsed with orjson and
    checked in plain Python; a block with anything else, or a record those checks do not accept,
    goes line by line through ``_Checker``'s own checks, so every message is the same. Ids: the
    hashes of every id in sorted uint64 runs (8 bytes an id), the ids themselves only for hashes
    seen twice. ``defer``: a hash hit whose strings are unknown is a suspect, confirmed after the
    stream (``confirm_suspects``); else the block waits for a second look at the lines before it."""

    _RUN = 1 << 20  # hashes per sorted run: merging never copies more than 8 MiB

    def __init__(self, uri: str, categories: Iterable[Category] | None, opts: dict, defer: bool) -> None:
        super().__init__(categories, None)
        self.uri, self.opts, self.defer = uri, opts, defer
        self.tag_map: dict[Any, int] | None = None
        if self.ids is not None:
            self.tag_map = {**{i: i for i in self.ids}, **self.by_name}
        self.runs: list[np.ndarray] = []
        self.bits: np.ndarray | None = None  # the filter in front of the runs (``_filter``)
        self.size, self.shift = 0, np.uint64(0)
        self.exact: dict[int, set[str]] = {}
        self.suspects: dict[int, tuple[str, int]] = {}  # line -> (where, hash)

    def blocks(self) -> Iterator[list[tuple[int, Any, bool, str | None]]]:
        """Per block, (line number, checked record, parsed fast, problem or None) in line order."""
        for entries, _ in self._parsed(1):
            with _gc_paused():
                checked = self._finish(entries)
            yield checked

    def _parsed(self, first_line: int, stop: int | None = None) -> Iterator[tuple[list, int]]:
        """(entries, lines) per block: entries (line, record or _BadJson, raw) of non-blank lines; raw
        is the line's bytes when orjson read it (None: ``json`` read it, as the text file's line)."""
        line = first_line
        opened = fsspec.open(self.uri, "rb", **self.opts)
        if not self.size:  # sizes the id filter
            self.size = opened.fs.size(opened.path) or 0
        with opened as f:
            for raw in _raw_blocks(f):
                if stop is not None and line >= stop:
                    return
                with _gc_paused():
                    fast = self._fast(raw, line) if not raw.translate(None, _PLAIN_BYTES) else None
                    entries, n = fast if fast is not None else self._slow(raw, line)
                yield entries, n
                line += n

    def _fast(self, raw: bytes, first: int) -> tuple[list, int] | None:
        lines = raw.split(b"\n")
        n = len(lines) - (lines[-1] == b"")
        entries = []
        try:
            for i, text in enumerate(lines):
                if text.strip():
                    entries.append((first + i, orjson.loads(text), text))
        except orjson.JSONDecodeError:
            return None
        return entries, n

    def _slow(self, raw: bytes, first: int) -> tuple[list, int]:
        entries, n = [], 0
        for n, text in enumerate(io.StringIO(raw.decode("utf-8"), newline=None), 1):
            if not text.strip():
                continue
            entries.append((first + n - 1, _loads(text), None))
        return entries, n

    def _where(self, line: int, record: Any) -> str:
        return f"manifest {self.uri} line {line} (id {_id_of(record)!r})"

    def _finish(self, entries: list) -> list[tuple[int, Any, bool, str | None]]:
        """Schema, ids, file names and tags of one block's parsed lines."""
        out: list[tuple[int, Any, bool, str | None]] = []
        ok = []
        for line, record, raw in entries:
            if raw is not None and self._plain(record):
                ok.append((line, record, True))
                continue
            if raw is not None:  # orjson's reading may differ from json's (big integers): json's counts
                record = _loads(raw.decode("ascii"))
            try:
                self._schema(record, self._where(line, record))
                ok.append((line, record, False))
            except ManifestError as err:
                out.append((line, None, False, str(err)))
        for (line, record, fast), repeated in zip(ok, self._repeats([r["id"] for _, r, _ in ok], ok), strict=True):
            where = self._where(line, record) if repeated or not fast else ""
            if repeated:
                out.append((line, None, False, _repeated(where)))
            elif fast:
                out.append((line, record, True, None))
            else:
                try:
                    out.append((line, self._rest(record, where), False, None))
                except ManifestError as err:
                    out.append((line, None, False, str(err)))
        out.sort(key=lambda e: e[0])
        return out

    def _plain(self, doc: Any) -> bool:
        """Accept (tags resolved in place) a record every check but the id's passes: the schema
        (as ``schemas._valid_manifest_record``), the file name, the tags. Plain Python fused for
        the usual record; False sends the record through the exact checks, unchanged."""
        if type(doc) is not dict or not doc.keys() <= RECORD_KEYS:
            return False
        rid, uri, tags = doc.get("id"), doc.get("uri"), doc.get("tags")
        if type(rid) is not str or type(uri) is not str or type(tags) is not list or not uri or not rid:
            return False
        if len(rid) > 1024 or (len(doc) > 3 and not _plain_optional(doc)):
            return False
        if not set(map(type, tags)) <= _TAG_TYPES or len(set(tags)) != len(tags):
            return False  # (no bool, no float: 1, True and 1.0 are one key in a dict)
        if self.tag_map is None:
            return all(type(t) is int and 0 < t <= MAX_CLASS_ID for t in tags)
        try:
            doc["tags"] = [self.tag_map[t] for t in tags]  # ids are 1..254, names non-empty: the schema's
        except KeyError:
            return False
        return True

    def _repeats(self, ids: list[str], entries: list) -> list[bool]:
        """Whether each of a block's ids (in line order) repeats an earlier id, exactly."""
        hashes = _hashes(ids)
        known = np.zeros(len(ids), dtype=bool)
        maybe = self._filter(hashes, add=False)
        if self.runs and maybe.any():  # a search of the runs misses the cache: only where the filter says maybe
            some = hashes[maybe]
            found = np.zeros(some.size, dtype=bool)
            for run in self.runs:
                found |= run[np.minimum(run.searchsorted(some), run.size - 1)] == some
            known[maybe] = found
        unknown = {int(x) for x in hashes[known]} - self.exact.keys()
        if unknown and not self.defer:
            first = entries[0][0]
            for _, rid, h in self._occurrences(unknown, stop=first):
                self.exact.setdefault(h, set()).add(rid)
            self.exact.update({h: set() for h in unknown - self.exact.keys()})
        fresh: dict[int, set[str]] = {}
        twice: set[int] = set()
        out = []
        for (line, record, _), rid, h, hit in zip(entries, ids, hashes.tolist(), known.tolist(), strict=True):
            if hit and h not in self.exact:  # deferred: a suspect until the second look
                self.suspects[line] = (self._where(line, record), h)
                out.append(False)
                continue
            if hit:
                strings = self.exact[h]
            elif h in fresh:
                strings = fresh[h]
                twice.add(h)
            else:
                strings = fresh[h] = set()
            out.append(rid in strings)
            strings.add(rid)
        self.exact.update({h: fresh[h] for h in twice})  # every string of these hashes is known
        self._add(np.fromiter(fresh.keys(), np.uint64, len(fresh)))
        return out

    def _filter(self, hashes: np.ndarray, add: bool) -> np.ndarray:
        """A one-hash Bloom filter over the ids' hashes (one bit each, ~2 bits per line of the file):
        False means certainly new; with ``add``, set their bits."""
        if self.bits is None:
            lines = max(self.size // 64, 1 << 16) if self.size else 1 << 20
            self.bits = np.zeros(1 << max(lines.bit_length() - 2, 13), dtype=np.uint8)  # >= lines * 2 bits
            self.shift = np.uint64(64 - (self.bits.size * 8).bit_length() + 1)
        slot = hashes >> self.shift
        byte, mask = (slot >> np.uint64(3)).astype(np.intp), np.left_shift(1, slot & np.uint64(7)).astype(np.uint8)
        if add:
            np.bitwise_or.at(self.bits, byte, mask)
            return mask
        return (self.bits[byte] & mask) != 0

    def _add(self, hashes: np.ndarray) -> None:
        """Hashes new to the set join as a sorted run; equal-sized neighbours merge (at most _RUN)."""
        if not hashes.size:
            return
        self._filter(hashes, add=True)
        self.runs.append(np.sort(hashes))
        while len(self.runs) > 1 and self.runs[-2].size <= 2 * self.runs[-1].size:
            if self.runs[-2].size + self.runs[-1].size > self._RUN:
                break
            last = self.runs.pop()
            merged = np.concatenate([self.runs.pop(), last])
            merged.sort()
            self.runs.append(merged)

    def _occurrences(self, wanted: set[int], stop: int | None) -> list[tuple[int, str, int]]:
        """The second look: (line, id, hash) of every record before line ``stop`` (all when None)
        that reached the id check (it passed the schema) and whose id hashes to one of ``wanted``."""
        found = []
        for entries, _ in self._parsed(1, stop):
            named = [(line, rec, raw) for line, rec, raw in entries
                     if type(rec) is dict and type(rec.get("id")) is str and (stop is None or line < stop)]  # fmt: skip
            hashes = _hashes([rec["id"] for _, rec, _ in named])
            for (line, rec, raw), h in zip(named, hashes.tolist(), strict=True):
                if h in wanted and self._reaches_id_check(rec, raw):
                    found.append((line, rec["id"], h))
        return found

    def _reaches_id_check(self, record: Any, raw: bytes | None) -> bool:
        if raw is not None and schemas._valid_manifest_record(record):
            return True
        record = _loads(raw.decode("ascii")) if raw is not None else record
        try:
            self._schema(record, "")
        except ManifestError:
            return False
        return True

    def confirm_suspects(self) -> dict[int, str]:
        """After a deferred stream: the suspects whose id truly repeats an earlier one, by line,
        with their message; the others were rightly taken as new."""
        if not self.suspects:
            return {}
        seen: dict[int, set[str]] = {}
        repeated = {}
        for line, rid, h in self._occurrences({h for _, h in self.suspects.values()}, None):
            strings = seen.setdefault(h, set())
            if rid in strings and line in self.suspects:
                repeated[line] = _repeated(self.suspects[line][0])
            strings.add(rid)
        return repeated


@dataclass(frozen=True)
class _BadJson:
    msg: str


def _id_of(record: Any) -> Any:
    return record.get("id") if isinstance(record, Mapping) else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        return _BadJson(err.msg)


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
        if named:  # outputs name the label map and the COCO image after it (types.ImageName)
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
    named over the whole stream (``types.ImageNamer``), so names do not depend on the shard size."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    namer = ImageNamer(CompactStringSet())  # names over millions of records in ~8 bytes each
    batch: list[dict[str, Any]] = []
    index = 0
    for record in records:
        batch.append(record)
        if len(batch) == shard_size:
            yield _shard(index, batch, namer)
            batch, index = [], index + 1
    if batch:
        yield _shard(index, batch, namer)


def _shard(index: int, batch: list[dict[str, Any]], namer: ImageNamer) -> Shard:
    names = {r["id"]: namer(r) for r in batch}
    return Shard(shard_id_for(index, [r["id"] for r in batch]), tuple(batch), names)


def fingerprint(records: Iterable[Mapping[str, Any]], categories: Iterable[Category]) -> str:
    """sha256 over the categories and every record, in order (streams)."""
    return _with_categories(categories, manifest_fingerprint(records))


def _with_categories(categories: Iterable[Category], records_digest: str) -> str:
    """The manifest fingerprint: sha256 over one JSON line per category ([id, name, prompt]), then
    the hex digest of the records (``manifest_fingerprint``, or ``scan_jsonl``'s running hash)."""
    h = hashlib.sha256()
    for c in categories:
        h.update(json.dumps([c.id, c.name, c.prompt]).encode() + b"\n")
    h.update(records_digest.encode())
    return h.hexdigest()
