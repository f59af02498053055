"""The run as the review app and the exports read it: the one module of ``pipeline.review`` that
imports the storage layer, so the names it needs can be re-pointed in one place.

Only shards committed under ``run.json``'s fingerprint count (as ``audit.open_run`` reads a run).
Stats come from ``merged/`` when its ``_MERGED.json`` carries the run's fingerprint, else from
the committed shards' own Parquet files; either way they are listed, never loaded here.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline import discovery
from pipeline.pngs import decode_png, palette
from pipeline.storage import layout
from pipeline.storage.commit import read_marker, read_run
from pipeline.storage.store import Store

log = logging.getLogger(__name__)

__all__ = ["ReviewRun", "open_review_run", "decode_png", "palette"]

REVIEW_DIR = layout.REVIEW_DIR


@dataclass(frozen=True, eq=False)  # identity hash: file_names caches per run
class ReviewRun:
    """A run opened for review. ``images_files`` / ``classes_files``: Parquet files of the
    ``stats_images`` / ``stats_classes`` tables (paths on ``store.fs``); ``categories``: COCO
    ``{id, name}`` dicts sorted by id; ``config``: the run's stored ``Config.to_dict()``."""

    store: Store
    fingerprint: str | None
    shards: tuple[str, ...]
    images_files: tuple[str, ...]
    classes_files: tuple[str, ...]
    categories: tuple[Mapping[str, Any], ...]
    config: Mapping[str, Any]

    @property
    def url(self) -> str:
        return self.store.url

    def read(self, rel: str) -> bytes | None:
        """Bytes of a file under the prefix (``Store.path`` refuses any part that could leave it)."""
        return self.store.read(rel)

    def write(self, rel: str, data: bytes) -> None:
        self.store.write_many({rel: data})

    @property
    def appends(self) -> bool:
        """Whether files under the prefix can be appended to: a local filesystem can; object
        stores cannot (an object is only ever written whole)."""
        return isinstance(self.store.fs, LocalFileSystem)

    def append(self, rel: str, data: bytes) -> None:
        """Append ``data`` to the local file ``rel`` under the prefix (made, with its folder, when
        missing) and sync it to disk. A write that fails is cut back off, so the next one does not
        continue a half line. Only where ``appends``; not retried (a retry could append twice)."""
        if not self.appends:
            raise ValueError(f"{self.url} is on an object store, which cannot append; write whole files there")
        path = self.store.path(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "ab", buffering=0) as f:
            start = f.tell()
            try:
                view = memoryview(data)
                while view:
                    view = view[f.write(view) :]
                os.fsync(f.fileno())
            except OSError:
                f.truncate(start)
                raise

    def list_review(self, pattern: str) -> list[str]:
        """Names of the files in ``review/`` matching a glob ``pattern`` (no folders), sorted."""
        folder = self.store.path(REVIEW_DIR)
        return sorted(p.rsplit("/", 1)[-1] for p in self.store.fs.glob(f"{folder}/{pattern}"))

    def filesystem_for(self, url: str) -> Any:
        """The fsspec filesystem to read ``url`` (an image) with: the run's own when the protocol
        is the same (so a bucket's storage options serve it too), else fsspec's default."""
        import fsspec

        fs = self.store.fs
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        return fs if fsspec.utils.get_protocol(url) in protocols else fsspec.core.url_to_fs(url)[0]

    def label_png(self, label_file: str) -> bytes:
        """Bytes of the indexed label PNG at ``label_file`` (a stats row's path under the prefix)."""
        data = self.read(label_file)
        if data is None:
            raise FileNotFoundError(f"{self.store.path(label_file)} is missing although its shard is committed")
        return data

    def label_map(self, label_file: str) -> Any:
        """[H, W] uint8 label map stored at ``label_file`` (a stats row's path under the prefix)."""
        return decode_png(self.label_png(label_file))

    def region_map(self, shard_id: str, label_file: str) -> Any:
        """[H, W] uint16 region map of the image whose label is ``label_file`` (discovery with
        ``unknown: regions``), or None when the run has none for it."""
        data = self.read(layout.region_file(shard_id, layout.label_name(label_file)))
        return None if data is None else discovery.decode_region_png(data)

    def has_region_map(self, shard_id: str, label_file: str) -> bool:
        """Whether the run has a region map for the image whose label is ``label_file`` (looked up, not read)."""
        return bool(self.store.fs.exists(self.store.path(layout.region_file(shard_id, layout.label_name(label_file)))))

    def suggestions(self, shard_id: str, image_id: str) -> list[dict[str, Any]]:
        """The image's rows of its shard's ``suggestions.parquet`` (discovery), by region id; [] without."""
        data = self.read(layout.table_file(shard_id, layout.SUGGESTIONS))
        if data is None:
            return []
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data), filters=[("image_id", "=", image_id)])
        return sorted(table.to_pylist(), key=lambda r: r["region"])

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one run per app; shards are small
    def file_names(self, shard_id: str) -> dict[str, str]:
        """``read_file_names``, the last 64 shards' kept (the app's pages ask image by image)."""
        return self.read_file_names(shard_id)

    def read_file_names(self, shard_id: str) -> dict[str, str]:
        """Manifest id -> the image's ``file_name`` from the shard's COCO file (read and parsed on
        each call: callers that visit many shards read each once, see ``export.items``)."""
        data = self.read(layout.shard_file(shard_id, layout.ANNOTATIONS))
        doc = json.loads(data) if data else {"images": []}
        return {str(im.get("source_id", im["id"])): im["file_name"] for im in doc["images"]}


def _committed(store: Store, fingerprint: str | None) -> list[str]:
    found = store.fs.glob(f"{store.root}/{layout.marker_glob()}")
    shards = []
    for shard_id in sorted(layout.shard_id_of_marker(p) for p in found):
        marker = read_marker(store, shard_id)
        if marker is not None and (fingerprint is None or marker["fingerprint"] == fingerprint):
            shards.append(shard_id)
    return shards


def _merged_files(store: Store, fingerprint: str | None, name: str) -> list[str] | None:
    data = store.read(layout.MERGED_MARKER)
    if data is None or (fingerprint is not None and json.loads(data).get("fingerprint") != fingerprint):
        return None
    return sorted(store.fs.glob(f"{store.path(layout.merged_table_dir(name))}/*.parquet"))


def open_review_run(url: str, **storage_options: Any) -> ReviewRun:
    """Open the run under ``url`` (local path or fsspec URL). Raises ValueError when nothing
    under it is committed by the run in its ``run.json``."""
    store = Store.open(url, **storage_options)
    record = read_run(store)
    fingerprint = record["fingerprint"] if record else None
    shards = _committed(store, fingerprint)
    if not shards:
        raise ValueError(f"{url}: no shards committed by the run in {layout.RUN_FILE} ({layout.marker_glob()}); "
                         "give the --output prefix of a labeling run")  # fmt: skip
    tables = {}
    for name in ("stats_images", "stats_classes"):
        merged = _merged_files(store, fingerprint, name)
        tables[name] = merged or [store.path(layout.table_file(s, name)) for s in shards]
    first = store.read(layout.shard_file(shards[0], layout.ANNOTATIONS))
    cats = json.loads(first)["categories"] if first else []
    categories = tuple({"id": int(c["id"]), "name": str(c["name"])} for c in sorted(cats, key=lambda c: int(c["id"])))
    return ReviewRun(store, fingerprint, tuple(shards), tuple(tables["stats_images"]), tuple(tables["stats_classes"]),
                     categories, (record or {}).get("config", {}))  # fmt: skip


def image_url(file_name: str | None, images: str | None) -> str | None:
    """Where an image's file is, from the ``file_name`` the run's COCO file records: a URL or an
    absolute path as it is; a relative name under ``images`` (None when it climbs out with
    ``..``, or no root is given); None when unknown."""
    if not file_name:
        return None
    if "://" in file_name or file_name.startswith("/"):
        return file_name
    if images is None or ".." in file_name.split("/"):
        return None
    return f"{images.rstrip('/')}/{file_name}"
