"""Model weights in object storage: staging with a manifest of sha256 digests, and a per-node cache.

A staged weights folder (``s3://bucket/weights/sd/``, ``gs://...``, any fsspec URL) holds the
files and, written last, ``weights_manifest.json``: each file's relative path, size and sha256.
A checkpoint URL names either such a folder or one file inside one. ``fetch`` copies it once per
node into ``$TAG2MASK_WEIGHTS_CACHE`` (default ``~/.cache/tag2mask/weights``) under a folder named
by the content's hash, checking every byte against the manifest on the way; several actors on one
node may fetch at once (each writes a private temporary folder and renames it into place; the
first rename wins). A file whose bytes do not match is refused, naming it and both digests.

Pure fsspec and hashlib: nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

MANIFEST_NAME = "weights_manifest.json"
MANIFEST_SCHEMA = "tag2mask/weights_manifest/v1"
CACHE_ENV = "TAG2MASK_WEIGHTS_CACHE"
_CHUNK = 1 << 20


class WeightsUnavailableError(RuntimeError):
    """Model weights are neither given locally, nor cached, nor downloadable."""


class WeightsIntegrityError(WeightsUnavailableError):
    """A weights file's bytes differ from the digest its manifest records."""


def is_remote(path: str | os.PathLike[str] | None) -> bool:
    """True for an fsspec URL other than a local file (``s3://``, ``gs://``, ``memory://``, ...)."""
    if path is None:
        return False
    text = str(path)
    return "://" in text and not text.startswith("file://")


def cache_dir() -> Path:
    """The node-local weights cache: ``$TAG2MASK_WEIGHTS_CACHE`` or ``~/.cache/tag2mask/weights``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tag2mask" / "weights").expanduser()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def content_key(digests: Mapping[str, str]) -> str:
    """One sha256 for a set of files: over ``relative/path:sha256`` lines in path order."""
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}:{digests[rel]}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Staged:
    """A staged checkpoint as its manifest describes it, before any weight byte is read.

    ``root``: the folder URL holding the manifest; ``files``: relative path -> sha256 of the files
    this checkpoint is made of (one for a file URL, all for a folder URL); ``single``: the relative
    path when the URL named one file, else None."""

    root: str
    files: dict[str, str]
    sizes: dict[str, int]
    single: str | None

    @property
    def key(self) -> str:
        """The cache folder's name: the file's own sha256, or the folder's ``content_key``."""
        return self.files[self.single] if self.single else content_key(self.files)


def _load_manifest(fs: fsspec.AbstractFileSystem, path: str, url: str) -> dict[str, Any]:
    try:
        doc = json.loads(fs.cat_file(path))
    except json.JSONDecodeError as err:
        raise WeightsUnavailableError(f"{url}: {MANIFEST_NAME} is not valid JSON ({err.msg})") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if doc.get("schema") != MANIFEST_SCHEMA or not isinstance(files, dict):
        raise WeightsUnavailableError(f"{url}: {MANIFEST_NAME} is not a {MANIFEST_SCHEMA} manifest")
    for rel in files:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise WeightsUnavailableError(f"{url}: {MANIFEST_NAME} names an unsafe path {rel!r}")
    return files


def describe(url: str, storage_options: Mapping[str, Any] | None = None) -> Staged:
    """Read the manifest of the staged checkpoint ``url`` (a folder holding ``weights_manifest.json``,
    or a file beside one). Reads only the manifest; raises WeightsUnavailableError when none is found."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    path = path.rstrip("/")
    here = f"{path}/{MANIFEST_NAME}"
    if fs.exists(here):
        files = _load_manifest(fs, here, url)
        return Staged(url.rstrip("/"), {k: v["sha256"] for k, v in files.items()},
                      {k: int(v["size"]) for k, v in files.items()}, None)  # fmt: skip
    parent, _, name = path.rpartition("/")
    beside = f"{parent}/{MANIFEST_NAME}"
    if parent and fs.exists(beside):
        files = _load_manifest(fs, beside, url)
        if name not in files:
            raise WeightsUnavailableError(f"{url} is not listed in {MANIFEST_NAME} beside it; listed: {sorted(files)}")
        return Staged(url.rstrip("/").rpartition("/")[0], {name: files[name]["sha256"]},
                      {name: int(files[name]["size"])}, name)  # fmt: skip
    raise WeightsUnavailableError(
        f"no {MANIFEST_NAME} at {url} or beside it: stage weights with jobs/stage_weights.py, which "
        f"writes the files and their sha256 digests"
    )


def _copy_verified(src: Any, dest: Path, url: str, expected: str) -> None:
    """Stream ``src`` (an open binary file) to ``dest``, hashing on the way; refuse a mismatch."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != expected:
        raise WeightsIntegrityError(
            f"weights file {url} was tampered with or corrupted: its sha256 is {h.hexdigest()}, but "
            f"{MANIFEST_NAME} records {expected}. Stage the weights again with jobs/stage_weights.py"
        )


def fetch(url: str, storage_options: Mapping[str, Any] | None = None, cache: Path | None = None) -> Path:
    """Local path of the staged checkpoint ``url``: a file, or a folder, inside the node cache.

    Copied once per node and content hash; a later call (any process) finds it and reads nothing
    but the manifest. Raises WeightsIntegrityError naming a file whose bytes differ from the
    manifest, and WeightsUnavailableError when the URL holds no staged weights."""
    staged = describe(url, storage_options)
    root = Path(cache) if cache is not None else cache_dir()
    final = root / staged.key
    if not final.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".partial-{staged.key[:16]}-{uuid.uuid4().hex}"
        try:
            _download(staged, tmp, storage_options)
            try:
                os.rename(tmp, final)  # atomic on one filesystem; the first finisher wins
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / staged.single if staged.single else final


def _download(staged: Staged, tmp: Path, storage_options: Mapping[str, Any] | None) -> None:
    fs, root = fsspec.core.url_to_fs(staged.root, **dict(storage_options or {}))
    log.info("copying %d weights file(s) from %s to the node cache", len(staged.files), staged.root)
    for rel, digest in sorted(staged.files.items()):
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/{rel}", "rb") as src:
            _copy_verified(src, dest, f"{staged.root}/{rel}", digest)


def manifest_for(files: Mapping[str, str | os.PathLike[str]]) -> dict[str, Any]:
    """The manifest document of local ``files`` (relative path -> local file)."""
    entries = {rel: {"sha256": file_sha256(p), "size": os.path.getsize(p)} for rel, p in sorted(files.items())}
    return {"schema": MANIFEST_SCHEMA, "files": entries}


def stage(files: Mapping[str, str | os.PathLike[str]], dest: str,
          storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Copy local ``files`` (relative path -> local file) under the URL ``dest`` and write their
    manifest there last, so a folder with a manifest is complete. Returns the manifest."""
    for rel in files:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"unsafe relative path {rel!r} for a staged weights file")
    doc = manifest_for(files)
    fs, root = fsspec.core.url_to_fs(dest, **dict(storage_options or {}))
    root = root.rstrip("/")
    for rel, local in sorted(files.items()):
        if isinstance(fs, LocalFileSystem):  # object stores have no folders to make
            fs.makedirs(f"{root}/{rel}".rpartition("/")[0], exist_ok=True)
        fs.put_file(str(local), f"{root}/{rel}")
    with fs.open(f"{root}/{MANIFEST_NAME}", "wb") as f:
        f.write(json.dumps(doc, indent=1, sort_keys=True).encode())
    return doc
