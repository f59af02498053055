"""Storage I/O: an output prefix on any fsspec filesystem (a local path, ``s3://``, ``gs://``,
``memory://``), and the access probe. Knows no file of a run (``layout`` does).

Faults: every ``Store`` method retries transient storage faults (``pipeline.retry``: resets,
timeouts, 503 SlowDown) by redoing the whole idempotent operation, under the store's
``RetryPolicy`` (attempts, backoff; ``retry.DEFAULT`` unless given, settable from the CLI with
``--storage-retries`` / ``--storage-backoff``); permanent ones (no permission, missing bucket)
raise at once. ``check_access`` writes, reads and deletes a probe object so a run can stop with a
clear ``StorageAccessError`` before any GPU work. Storage options (credentials) are handed to
fsspec and never written anywhere.
"""

from __future__ import annotations

import functools
import itertools
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline import redact
from pipeline import retry as retrying
from pipeline.retry import RetryPolicy
from pipeline.storage import layout

log = logging.getLogger(__name__)

WRITE_BATCH = 64  # files per retried write: bounds what one fault makes us send again

T = TypeVar("T")


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
        bad = layout.unsafe_part(rel)
        if bad is not None:
            raise ValueError(f"unsafe path {rel!r} under the output prefix: part {bad!r}")
        return f"{self.root}/{rel}"

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
    rel = layout.probe_file(secrets.token_hex(8))
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
