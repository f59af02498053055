"""Storage: the one module that knows paths under the output prefix. Writes through fsspec, so the
prefix is a local path or any fsspec URL (``s3://``, ``gs://``, ``memory://``).

Layout under the prefix::

    run.json                              fingerprint + config + model fingerprint (schemas/run.v1)
    labels/<name>.png                     indexed PNG label map of each image, <name> its file stem (pngs.py)
    shards/<shard_id>/annotations.json    COCO annotations of the shard's images (pipeline/coco.py)
    shards/<shard_id>/stats_images.parquet, stats_classes.parquet   quality statistics (deterministic)
    shards/<shard_id>/timings.parquet     wall-clock seconds per stage (the only non-deterministic file)
    shards/<shard_id>/_COMMITTED.json     commit marker, written last (schemas/commit_marker.v1)
    merged/annotations.json               every committed shard's COCO annotations in one file
    merged/stats_images/part-00000.parquet, merged/stats_classes/..., merged/timings/...   datasets
    merged/_MERGED.json                   written last by ``merge``

Commit protocol: object stores have no atomic rename, so only the marker counts. It holds the
shard's counts, the sha256 and size of every deterministic file it wrote (label PNGs included)
and the run's fingerprint. A shard without a marker, or with another run's fingerprint, is not
done: ``write_shard`` deletes its marker and stale files first and rewrites it from scratch.

Names: ``<name>`` is the image file's stem (``000000000139`` for ``000000000139.jpg``), so label
maps pair with their images the way COCO-Stuff, VOC and mmsegmentation expect (``image_names``).
The stem is taken from the record's ``file_name`` (COCO inputs) or the basename of its ``uri``
and passed through ``safe_name``: kept when it is a plain file name, else a sanitised stem plus 12
hex digits of its sha256, so no name ("../x", "/abs", NUL, ...) can leave the prefix. When two
records of a run share a stem (compared case-insensitively, as on case-insensitive disks), the
first in manifest order keeps it and each later one is named ``<sanitised id>-<12 hex digits>``
(``id_name``), which no plain stem can look like. The rule depends on the manifest order only,
never on shard boundaries. Writers that pass no names (runs before stems) name labels by
``safe_name(image_id)``.
Storage options (credentials) are handed to fsspec and never written anywhere.

Faults: every ``Store`` method retries transient storage faults (``pipeline.retry``: resets,
timeouts, 503 SlowDown) by redoing the whole idempotent operation; permanent ones (no permission,
missing bucket) raise at once. ``check_access`` writes, reads and deletes a probe object so a run
can stop with a clear ``StorageAccessError`` before any GPU work.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline import coco, pngs, redact, schemas, stats
from pipeline import retry as retrying
from pipeline.retry import RetryPolicy
from pipeline.stats import Failure

if TYPE_CHECKING:  # the labeler imports the model stack; storage only reads its results
    from pipeline.labeler import LabelResult

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
MARKER = "_COMMITTED.json"
MERGED_MARKER = "merged/_MERGED.json"
TABLES = ("stats_images", "stats_classes")  # deterministic Parquet tables
VOLATILE_TABLES = ("timings",)
FILE_ROWS = 8 * stats.ROW_GROUP_ROWS  # rows per file of a merged Parquet dataset
WRITE_BATCH = 64  # files per retried write: bounds what one fault makes us send again
PROBE_DIR = "_probe"  # check_access writes, reads and deletes one small object here

T = TypeVar("T")

_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,127}")
_PLAIN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,99}")
_ESCAPED = re.compile(r".*-[0-9a-f]{12}")  # what an escaped name ends with; plain ids never look like it


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def safe_name(image_id: str) -> str:
    """A file stem for ``image_id`` that cannot leave its directory: the id when it is a plain
    name (letters, digits, ``._=-``, not starting with ``.``), else a sanitised stem plus 12 hex
    digits of the id's sha256. Injective up to sha256 collisions."""
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"image ids must be non-empty strings, got {image_id!r}")
    if _PLAIN_ID.fullmatch(image_id) and not _ESCAPED.fullmatch(image_id):
        return image_id
    stem = re.sub(r"[^A-Za-z0-9._=-]", "_", image_id)[:64].lstrip(".=-") or "id"
    digest = _sha256(image_id.encode("utf-8", "surrogatepass"))[:12]
    return f"{stem}-{digest}"


def id_name(image_id: str) -> str:
    """The label stem of an image whose file stem another image of the run already took: the
    sanitised id plus 12 hex digits of a sha256 kept apart from ``safe_name``'s, so it equals no
    stem ``safe_name`` gives and no other id's name."""
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"image ids must be non-empty strings, got {image_id!r}")
    stem = re.sub(r"[^A-Za-z0-9._=-]", "_", image_id)[:64].lstrip(".=-") or "id"
    return f"{stem}-{_sha256(('id:' + image_id).encode('utf-8', 'surrogatepass'))[:12]}"


def label_file(name: str) -> str:
    """Path of the label PNG named ``name`` (an ``ImageName.label``), relative to the prefix."""
    return f"labels/{name}.png"


def label_path(image_id: str) -> str:
    """Path of an image's label PNG named by its id (writers given no ``ImageName``; old runs)."""
    return label_file(safe_name(image_id))


@dataclass(frozen=True)
class ImageName:
    """How a run's outputs name one image. ``label``: the stem of its label PNG (safe as a file
    name); ``file_name``: the image as the COCO output's ``images[].file_name`` records it (the
    input's ``file_name`` for COCO inputs, relative to ``--images``; else the manifest's uri)."""

    label: str
    file_name: str


def file_stem(path: str) -> str:
    """``"a/b/000000000139.jpg"`` -> ``"000000000139"``: the basename without its last extension
    (also for URLs: ``s3://b/x.png`` -> ``x``)."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base


class ImageNamer:
    """Names records in manifest order (``ImageName``): the first record with a stem keeps it;
    a later record whose stem is taken (case-insensitively) gets ``id_name``. Holds one short
    string per named image, like the manifest check's set of ids."""

    def __init__(self, taken: Any = None) -> None:
        """``taken``: an empty set-like (``in``, ``add``) to hold the names in, e.g. manifest's
        ``CompactStringSet`` for a manifest of millions of images; default a ``set``."""
        self._taken = set[str]() if taken is None else taken

    def __call__(self, record: Mapping[str, Any]) -> ImageName:
        file_name = record.get("file_name") or record["uri"]
        stem = file_stem(file_name)
        label = safe_name(stem) if stem else id_name(record["id"])
        if label.lower() in self._taken:
            label = id_name(record["id"])
        self._taken.add(label.lower())
        return ImageName(label, file_name)


def image_names(records: Iterable[Mapping[str, Any]]) -> dict[str, ImageName]:
    """``ImageName`` by image id for ``records`` named together (see ``ImageNamer``)."""
    namer = ImageNamer()
    return {r["id"]: namer(r) for r in records}


def shard_id_for(index: int, image_ids: Sequence[str]) -> str:
    """Shard id from the manifest's content: the shard's position and a hash of its image ids, so
    a changed manifest never reuses a committed shard's name."""
    digest = _sha256("\n".join(image_ids).encode("utf-8", "surrogatepass"))[:12]
    return f"{index:05d}-{digest}"


def manifest_fingerprint(records: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the manifest records (canonical JSON, one per line, in order)."""
    h = hashlib.sha256()
    for record in records:
        h.update(_canonical(record) + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class RunFingerprint:
    """What identifies a run's outputs: sha256 digests of the config, the model weights and the manifest."""

    config: str
    model: str
    manifest: str

    @property
    def digest(self) -> str:
        return _sha256(f"{self.config}:{self.model}:{self.manifest}".encode())


def run_fingerprint(config_fingerprint: str, model_fingerprint: Mapping[str, Any], manifest: str) -> RunFingerprint:
    """From ``Config.fingerprint()``, ``models.model_fingerprint(cfg.model)`` and ``manifest_fingerprint``."""
    return RunFingerprint(config_fingerprint, _sha256(_canonical(model_fingerprint)), manifest)


class Store:
    """An output prefix on an fsspec filesystem. Every path is relative to the prefix and checked.
    Every method that touches storage retries transient faults (``pipeline.retry``) under
    ``retry`` (default ``retry.DEFAULT``); each attempt redoes the whole, idempotent operation."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, *, retry: RetryPolicy | None = None) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        self.retry_policy = retry or retrying.DEFAULT
        self._local = isinstance(fs, LocalFileSystem)

    @classmethod
    def open(cls, url: str, *, retry: RetryPolicy | None = None, **storage_options: Any) -> Store:
        """``url``: local path or fsspec URL; ``storage_options`` go to fsspec (endpoint, credentials)."""
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        return cls(fs, root, retry=retry)

    @property
    def url(self) -> str:
        """The prefix as a URL ("s3://bucket/run", "/data/out"); holds no credentials."""
        return self.root if self._local else self.fs.unstrip_protocol(self.root)

    def path(self, rel: str) -> str:
        """Absolute path on ``fs`` of ``rel`` ("a/b/c"); raises ValueError for unsafe parts."""
        parts = rel.split("/")
        bad = [p for p in parts if not _PART.fullmatch(p)]
        if bad:
            raise ValueError(f"unsafe path {rel!r} under the output prefix: part {bad[0]!r}")
        return "/".join([self.root, *parts])

    def _io(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` through ``retry.call``; before each retry the filesystem's listing cache is
        dropped, since a failed call may have left it stale (s3fs caches listings and sizes)."""
        attempts = itertools.count()

        def attempt() -> T:
            if next(attempts):
                self.fs.invalidate_cache()
            return fn()

        return retrying.call(attempt, f"{what} under {self.url}", self.retry_policy)

    def write_many(self, files: Mapping[str, bytes]) -> None:
        """Write ``files`` (relative path -> bytes), overwriting; in batches of ``WRITE_BATCH``
        files, each retried on its own so one fault does not resend everything."""
        paths = {self.path(rel): data for rel, data in files.items()}
        items = list(paths.items())
        for start in range(0, len(items), WRITE_BATCH):
            batch = dict(items[start : start + WRITE_BATCH])
            self._io(functools.partial(self._pipe, batch), f"write {len(batch)} file(s)")

    def _pipe(self, paths: dict[str, bytes]) -> None:
        if self._local:
            for parent in sorted({p.rsplit("/", 1)[0] for p in paths}):
                self.fs.makedirs(parent, exist_ok=True)
        self.fs.pipe(paths)

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        path = self.path(rel)
        try:
            return self._io(lambda: self.fs.cat_file(path), f"read {rel}")
        except FileNotFoundError:
            return None

    def remove_tree(self, rel: str) -> None:
        """Delete every file under ``rel`` (a file or a folder); nothing there is fine."""
        path = self.path(rel)

        def remove() -> None:  # listed again on each attempt: a failed rm may have deleted some
            found = self.fs.find(path)
            if found:
                self.fs.rm(found)

        self._io(remove, f"remove {rel}")

    def remove_files(self, rels: Iterable[str]) -> None:
        """Delete the given files where they exist."""
        paths = [self.path(r) for r in rels]

        def remove() -> None:
            found = [p for p in paths if self.fs.exists(p)]
            if found:
                self.fs.rm(found)

        if paths:
            self._io(remove, f"remove {len(paths)} file(s)")


class StorageAccessError(ValueError):
    """The output prefix cannot be used (missing bucket, no permission, unreachable endpoint):
    found by ``check_access`` before any GPU work. The message names the prefix and what to fix,
    never a credential."""


PROBE_BYTES = b"tag2mask access probe\n"
_ACCESS_HINTS = {  # S3 error code -> what it means for the user
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "permission denied; check the credentials and the bucket policy",
    "AllAccessDisabled": "all access to the bucket is disabled; check the bucket policy",
    "InvalidAccessKeyId": "the endpoint does not know the access key id; check the credentials",
    "SignatureDoesNotMatch": "the secret key does not match the access key id; check the credentials",
    "ExpiredToken": "the session token has expired; renew the credentials",
    "InvalidBucketName": "the bucket name is not valid",
    "PermanentRedirect": "the bucket is in another region; set the region or the endpoint_url",
    "301": "the bucket is in another region; set the region or the endpoint_url",
}


def _reason(err: BaseException) -> str:
    """What a failed probe step means, for the user."""
    code = retrying.error_code(err)
    if code in _ACCESS_HINTS:
        return f"{_ACCESS_HINTS[code]} ({code})"
    if isinstance(err, retrying.StorageError):
        last = err.__cause__
        return f"still failing after {err.attempts} attempts ({type(last).__name__}: {last})"
    suffix = f" ({code})" if code else ""
    if isinstance(err, PermissionError):
        return f"permission denied{suffix}; check the credentials, the bucket policy or the folder's permissions"
    if isinstance(err, FileNotFoundError):
        return f"the bucket or folder does not exist{suffix}"
    return f"{type(err).__name__}{suffix}: {err}"


def _probe_step(store: Store, verb: str, fn: Callable[[], T]) -> T:
    """``fn()``; an error that ``Store`` did not retry away becomes a StorageAccessError."""
    try:
        return fn()
    except Exception as err:  # the boundary that turns any storage fault into a message a user can act on
        hidden = redact.secret_values(getattr(store.fs, "storage_options", {}))
        raise StorageAccessError(redact.redact(f"cannot {verb} {store.url}: {_reason(err)}", hidden)) from err


def _remove_probe(store: Store, rel: str) -> None:
    """Best-effort cleanup while another error is on its way up: that error is the one to report."""
    try:
        store.remove_files([rel])
    except Exception as err:  # logged, not raised: it would hide the error that explains the failure
        log.warning("could not delete the access probe %s (%s)", store.path(rel), type(err).__name__)


def check_access(store: Store) -> None:
    """Check that the output prefix can be written, read back and deleted from, before any
    expensive work: writes ``_probe/<random hex>.txt``, reads it, deletes it. Transient faults
    are retried under the store's policy; a permanent one (missing bucket, no permission, bad
    credentials) or a fault outlasting the retries raises StorageAccessError."""
    rel = f"{PROBE_DIR}/{secrets.token_hex(8)}.txt"
    _probe_step(store, "write to", lambda: store.write_many({rel: PROBE_BYTES}))
    try:
        back = _probe_step(store, "read from", lambda: store.read(rel))
        if back != PROBE_BYTES:
            state = "was missing" if back is None else f"came back as {len(back)} other bytes"
            raise StorageAccessError(f"cannot read from {store.url}: the probe object {rel} {state} after writing it")
    except StorageAccessError:
        _remove_probe(store, rel)
        raise
    _probe_step(store, "delete from", lambda: store.remove_files([rel]))
    log.info("storage access checked: %s is writable, readable and deletable", store.url)


def shard_dir(shard_id: str) -> str:
    if not isinstance(shard_id, str) or not _PART.fullmatch(shard_id):
        raise ValueError(f"shard id {shard_id!r} must match {_PART.pattern} (letters, digits, ._=-)")
    return f"shards/{shard_id}"


def write_run(store: Store, run: RunFingerprint, config: Mapping[str, Any], model: Mapping[str, Any],
              overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write ``run.json`` (config = ``Config.to_dict()``, model = ``model_fingerprint``). An existing
    record with another fingerprint raises ValueError unless ``overwrite``; its shards then redo."""
    doc = {"schema": schemas.RUN_SCHEMA_ID, "fingerprint": run.digest,
           "parts": {"config": run.config, "model": run.model, "manifest": run.manifest},
           "config": dict(config), "model": dict(model)}  # fmt: skip
    schemas.validate("run", doc, "run record")
    old = read_run(store)
    if old is not None and old["fingerprint"] != run.digest and not overwrite:
        changed = [name for name, digest in doc["parts"].items() if old["parts"].get(name) != digest]
        from pipeline.config import identity_of  # here: config imports the model stack

        # Only settings in the identity changed the fingerprint: device and the like are not named.
        before, after = identity_of(old.get("config", {})), identity_of(config)
        keys = _changed_keys(before, after) if "config" in changed else []
        keys.sort(key=lambda k: not k.startswith("method "))  # another method changes many settings: it first
        detail = f" (settings: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" if keys else ""
        raise ValueError(
            f"{store.path(RUN_FILE)} belongs to another run: the {' and the '.join(changed)} changed{detail} "
            f"(fingerprint {old['fingerprint'][:12]}, this run {run.digest[:12]}). Use a new output "
            f"prefix, or --overwrite to redo every shard"
        )
    store.write_many({RUN_FILE: json.dumps(doc, indent=1, sort_keys=True).encode()})
    return doc


def _changed_keys(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted names of the settings that differ between two stored configs, with both values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{where}.{key}" if where else key)]  # fmt: skip
    return [] if old == new else [f"{where} {json.dumps(old)} -> {json.dumps(new)}"]


def read_run(store: Store) -> dict[str, Any] | None:
    data = store.read(RUN_FILE)
    if data is None:
        return None
    doc = json.loads(data)
    schemas.validate("run", doc, store.path(RUN_FILE))
    return doc


@dataclass(frozen=True)
class ShardFiles:
    """A shard's files before writing: deterministic ones (checksummed in the marker) and volatile ones."""

    files: dict[str, bytes]
    volatile: dict[str, bytes]
    counts: dict[str, int]


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
                         "name them with storage.image_names")  # fmt: skip
    # Sorted by id: the files do not depend on the order in which batches finished.
    return sorted(results, key=lambda r: r.image_id), sorted(fails, key=lambda f: f.image_id)


def _names_for(ids: Iterable[str], names: Mapping[str, ImageName] | None) -> dict[str, ImageName]:
    """``names`` for ``ids``; without names (old callers), labels are named by id and the COCO
    ``file_name`` is the label's path, as before label maps were named by file stem."""
    if names is None:
        return {i: ImageName(safe_name(i), label_path(i)) for i in ids}
    unnamed = [i for i in ids if i not in names]
    if unnamed:
        raise ValueError(f"images {unnamed[:5]} have no ImageName; build names with storage.image_names(records)")
    return dict(names)


def build_shard(shard_id: str, results: Sequence[LabelResult | stats.ImageEntry],
                failures: Sequence[Failure | tuple[str, str, str]], categories: Sequence[Any], fingerprint: str,
                names: Mapping[str, ImageName] | None = None) -> ShardFiles:  # fmt: skip
    """The shard's files as bytes, by path relative to the prefix (pure; no I/O). ``results``: an
    ``ImageEntry`` per image (label_shard reduces each result as it finishes) or whole
    LabelResults. ``names``: the label stem and image file name of each image (``image_names``);
    see ``_names_for`` without."""
    folder = shard_dir(shard_id)
    ids = [r.image_id for r in results] + [f[0] if isinstance(f, tuple) else f.image_id for f in failures]
    names = _names_for(ids, names)
    results, fails = _ordered(results, failures, names)
    path = {r.image_id: label_file(names[r.image_id].label) for r in results}
    entries = [r if isinstance(r, stats.ImageEntry) else stats.entry(r, shard_id, path[r.image_id])
               for r in results]  # fmt: skip
    items = [(e.image_id, e.label_map, e.class_scores, names[e.image_id].file_name) for e in entries]
    doc = coco.build_coco(items, categories, {"description": "tag2mask pseudo-labels", "fingerprint": fingerprint})
    image_rows = [e.image_row for e in entries] + [stats.failed_row(f, shard_id) for f in fails]
    class_rows = [row for e in entries for row in e.class_rows]
    timing_rows = [row for e in entries for row in e.timing_rows]
    files = {path[e.image_id]: pngs.encode_png(e.label_map) for e in entries}
    files[f"{folder}/annotations.json"] = json.dumps(doc, separators=(",", ":")).encode()
    files[f"{folder}/stats_images.parquet"] = stats.parquet_bytes(stats.to_table("stats_images", image_rows))
    files[f"{folder}/stats_classes.parquet"] = stats.parquet_bytes(stats.to_table("stats_classes", class_rows))
    volatile = {f"{folder}/timings.parquet": stats.parquet_bytes(stats.to_table("timings", timing_rows))}
    counts = {"images": len(image_rows), "ok": len(results), "failed": len(fails),
              "annotations": len(doc["annotations"]), "class_rows": len(class_rows),
              "label_maps": len(results)}  # fmt: skip
    return ShardFiles(files, volatile, counts)


def marker_doc(shard_id: str, built: ShardFiles, fingerprint: str) -> dict[str, Any]:
    """The commit marker of a built shard (no wall-clock values, so it is deterministic too)."""
    doc = {
        "schema": schemas.MARKER_SCHEMA_ID, "shard_id": shard_id, "fingerprint": fingerprint,
        "counts": built.counts,
        "files": {rel: {"sha256": _sha256(data), "bytes": len(data)} for rel, data in sorted(built.files.items())},
        "volatile_files": sorted(built.volatile),
    }  # fmt: skip
    schemas.validate("commit_marker", doc, f"commit marker of shard {shard_id}")
    return doc


def write_shard(store: Store, shard_id: str, results: Sequence[LabelResult | stats.ImageEntry],
                failures: Sequence[Failure | tuple[str, str, str]], categories: Sequence[Any],
                fingerprint: str, names: Mapping[str, ImageName] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write one shard from scratch and commit it; returns the marker.

    results: labelled images; failures: ``Failure`` or ``(image_id, status, error)`` for images
    that produced no label map; categories: ``labeler.Category`` objects or COCO category dicts;
    fingerprint: ``RunFingerprint.digest``; names: ``ImageName`` by image id (``Shard.names``),
    labels named by id without. Order: old marker and stale files deleted, files written, marker
    written last.
    """
    built = build_shard(shard_id, results, failures, categories, fingerprint, names)
    marker = marker_doc(shard_id, built, fingerprint)
    folder = shard_dir(shard_id)
    failed = [f[0] if isinstance(f, tuple) else f.image_id for f in failures]
    store.remove_files([f"{folder}/{MARKER}"])
    store.remove_tree(folder)
    failed_names = _names_for(failed, names)
    store.remove_files(label_file(failed_names[i].label) for i in failed)
    store.write_many({**built.files, **built.volatile})
    store.write_many({f"{folder}/{MARKER}": json.dumps(marker, indent=1).encode()})
    log.info("shard %s committed: %s", shard_id, built.counts)
    return marker


def read_marker(store: Store, shard_id: str) -> dict[str, Any] | None:
    """The shard's commit marker, or None when there is none or it is unreadable (not committed)."""
    data = store.read(f"{shard_dir(shard_id)}/{MARKER}")
    if data is None:
        return None
    try:
        doc = json.loads(data)
        schemas.validate("commit_marker", doc, f"commit marker of shard {shard_id}")
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        log.warning("shard %s: ignoring a broken commit marker (%s)", shard_id, err)
        return None
    return doc


def is_committed(store: Store, shard_id: str, fingerprint: str) -> bool:
    """True when the shard has a valid marker written by a run with this fingerprint."""
    marker = read_marker(store, shard_id)
    return marker is not None and marker["fingerprint"] == fingerprint and marker["shard_id"] == shard_id


def verify_shard(store: Store, shard_id: str) -> list[str]:
    """Every way the shard's files differ from its marker (missing, other size, other sha256);
    empty when the marker's promise holds. Reads every file, so it is an audit, not a resume step."""
    marker = read_marker(store, shard_id)
    if marker is None:
        return [f"shard {shard_id} has no valid commit marker"]
    problems = []
    for rel, expected in sorted(marker["files"].items()):
        data = store.read(rel)
        if data is None:
            problems.append(f"{rel}: missing")
        elif (len(data), _sha256(data)) != (expected["bytes"], expected["sha256"]):
            problems.append(f"{rel}: {len(data)} bytes, sha256 {_sha256(data)[:12]}; marker says "
                            f"{expected['bytes']} bytes, {expected['sha256'][:12]}")  # fmt: skip
    return problems


def _read_checked(store: Store, rel: str, marker: Mapping[str, Any]) -> bytes:
    data = store.read(rel)
    expected = marker["files"].get(rel)
    if data is None or expected is None or _sha256(data) != expected["sha256"]:
        raise ValueError(f"{store.path(rel)} is missing or does not match the sha256 in its shard's commit marker; "
                         f"delete the shard's {MARKER} to redo it")  # fmt: skip
    return data


def _committed_markers(store: Store, shard_ids: Sequence[str], fingerprint: str) -> list[dict[str, Any]]:
    markers = []
    for shard_id in sorted(shard_ids):
        marker = read_marker(store, shard_id)
        if marker is None or marker["fingerprint"] != fingerprint:
            raise ValueError(f"shard {shard_id} is not committed by this run (fingerprint {fingerprint[:12]}); "
                             "run it before merging")  # fmt: skip
        markers.append(marker)
    return markers


def _parquet_parts(tables: Iterable[pa.Table], file_rows: int) -> Iterator[pa.Table]:
    """Regroup a stream of tables into tables of ``file_rows`` rows (the last one shorter)."""
    buffer: list[pa.Table] = []
    rows = 0
    for table in tables:
        buffer.append(table)
        rows += table.num_rows
        while rows >= file_rows:
            whole = pa.concat_tables(buffer)
            yield whole.slice(0, file_rows)
            buffer, rows = [whole.slice(file_rows)], rows - file_rows
    if rows:
        yield pa.concat_tables(buffer)


def _merge_table(store: Store, name: str, markers: Sequence[Mapping[str, Any]], file_rows: int) -> dict[str, int]:
    """Write ``merged/<name>/part-NNNNN.parquet`` from every shard's table, in shard order."""

    def tables() -> Iterator[pa.Table]:
        for marker in markers:
            rel = f"{shard_dir(marker['shard_id'])}/{name}.parquet"
            data = store.read(rel) if name in VOLATILE_TABLES else _read_checked(store, rel, marker)
            if data is None:
                raise ValueError(f"{store.path(rel)} is missing although its shard is committed")
            table = pq.read_table(io.BytesIO(data))
            schemas.check_table(name, table)
            yield table

    store.remove_tree(f"merged/{name}")
    parts, rows = 0, 0
    for part in _parquet_parts(tables(), file_rows):
        store.write_many({f"merged/{name}/part-{parts:05d}.parquet": stats.parquet_bytes(part)})
        parts, rows = parts + 1, rows + part.num_rows
    if not parts:  # an empty table still tells readers the schema
        store.write_many({f"merged/{name}/part-00000.parquet": stats.parquet_bytes(stats.to_table(name, []))})
        parts = 1
    return {"files": parts, "rows": rows}


def merge(store: Store, shard_ids: Sequence[str], fingerprint: str, file_rows: int = FILE_ROWS) -> dict[str, Any]:
    """Merge committed shards (in sorted shard-id order) into ``merged/``; returns the summary also
    written to ``merged/_MERGED.json`` (last). Raises ValueError if a shard is not committed by
    this run or a file does not match its marker's checksum."""
    if not shard_ids:
        raise ValueError("merge needs at least one shard id")
    markers = _committed_markers(store, shard_ids, fingerprint)
    store.remove_files([MERGED_MARKER])
    docs = [json.loads(_read_checked(store, f"{shard_dir(m['shard_id'])}/annotations.json", m)) for m in markers]
    merged = coco.merge_coco(docs, {"description": "tag2mask pseudo-labels", "fingerprint": fingerprint})
    store.write_many({"merged/annotations.json": json.dumps(merged, separators=(",", ":")).encode()})
    tables = {name: _merge_table(store, name, markers, file_rows) for name in TABLES + VOLATILE_TABLES}
    counts = {key: sum(m["counts"][key] for m in markers) for key in markers[0]["counts"]}
    summary = {"fingerprint": fingerprint, "shards": [m["shard_id"] for m in markers], "counts": counts,
               "tables": tables}  # fmt: skip
    store.write_many({MERGED_MARKER: json.dumps(summary, indent=1).encode()})
    return summary
