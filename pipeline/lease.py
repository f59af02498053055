"""One driver per output prefix: a lease object ``_LEASE.json`` under the prefix, holding the
driver's owner id, host, pid and an expiry (unix seconds), renewed while the run goes.

Taking it: an exclusive create where the store has one (``open(..., "xb")``: ``O_EXCL`` on a
local disk, ``If-None-Match: *`` on S3 through s3fs, the memory filesystem), else a plain write;
either way the lease is read back after ``settle_s`` and is ours only if it names us. A lease
that has expired, or whose holder is a process on this host that no longer exists, is stale and
is taken over; any other holder is refused with ``LeaseHeldError`` naming it and its expiry.

Limits: expiry compares wall clocks, so hosts need roughly synchronised clocks (NTP; keep the
time-to-live well above any skew). Taking over a stale lease deletes it and creates ours; two
drivers doing that in the same instant can both succeed once, and the renewal of one of them then
finds the other's lease and stops its run (``LeaseLostError``). Torch-free; storage through
``Store``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from fsspec.implementations.local import LocalFileSystem

from pipeline import retry
from pipeline.storage.store import Store

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
DEFAULT_TTL_S = 300.0


class LeaseHeldError(ValueError):
    """Another live driver holds the prefix."""


class LeaseLostError(RuntimeError):
    """Our lease was taken over (it had expired, or another driver raced us for it)."""


@dataclass(frozen=True)
class Lease:
    owner: str  # random id of one driver run
    host: str
    pid: int
    expires: float  # unix seconds

    def describe(self, now: float) -> str:
        try:
            when = datetime.fromtimestamp(self.expires, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (ValueError, OverflowError, OSError):  # a foreign file with an absurd expiry
            when = f"{self.expires:.0f} (unix seconds)"
        return (f"driver {self.owner[:12]} on host {self.host}, pid {self.pid}; its lease expires at {when} "
                f"(in {max(0.0, self.expires - now):.0f} s)")  # fmt: skip


def _parse(data: bytes | None) -> Lease | None:
    if data is None:
        return None
    try:
        doc = json.loads(data)
        return Lease(str(doc["owner"]), str(doc["host"]), int(doc["pid"]), float(doc["expires"]))
    except (ValueError, KeyError, TypeError):
        return Lease("unreadable", "?", 0, 0.0)  # a torn or foreign file: stale, taken over


def read(store: Store) -> Lease | None:
    """The lease under the prefix, or None when there is none."""
    return _parse(store.read(LEASE_FILE))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def is_stale(lease: Lease, now: float, host: str | None = None) -> bool:
    """Expired, or held by a process on this host (``host``) that no longer exists."""
    here = host or socket.gethostname()
    return lease.expires <= now or (lease.host == here and lease.pid != os.getpid() and not _pid_alive(lease.pid))


def _create(store: Store, lease: Lease) -> None:
    """Write the lease if no lease object exists (exclusive create), else leave the file alone.
    Stores without exclusive create get a plain write; the caller's read-back decides."""
    path, data = store.path(LEASE_FILE), json.dumps(asdict(lease)).encode()
    if isinstance(store.fs, LocalFileSystem):
        store.fs.makedirs(store.root, exist_ok=True)

    def exclusive() -> None:
        try:
            with store.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            pass  # someone holds it (or our own earlier attempt landed): the read-back tells

    try:
        retry.call(exclusive, f"create {LEASE_FILE} under {store.url}", store.retry_policy)
    except (NotImplementedError, ValueError) as err:  # no "x" mode on this filesystem
        log.info("no exclusive create on %s (%s): writing the lease and reading it back", store.url, err)
        store.write_many({LEASE_FILE: data})


def acquire(store: Store, ttl_s: float = DEFAULT_TTL_S, *, clock: Callable[[], float] = time.time,
            settle_s: float = 0.5, owner: str | None = None) -> Lease:  # fmt: skip
    """Take the prefix's lease for ``ttl_s`` seconds; raises ``LeaseHeldError`` (a ValueError)
    when a live driver holds it."""
    if ttl_s <= 0:
        raise ValueError(f"the lease time-to-live must be positive, got {ttl_s}")
    mine = Lease(owner or uuid.uuid4().hex, socket.gethostname(), os.getpid(), clock() + ttl_s)
    for _ in range(3):
        held = read(store)
        if held is not None and held.owner != mine.owner:
            if not is_stale(held, clock()):
                raise LeaseHeldError(f"{store.url} is in use by another {held.describe(clock())}. Wait for that run "
                                     "to finish; if its driver is gone, rerun after the lease expires")  # fmt: skip
            log.warning("taking over a stale lease on %s (%s)", store.url, held.describe(clock()))
            store.remove_files([LEASE_FILE])
        _create(store, mine)
        time.sleep(settle_s)  # a store without exclusive create: let a racing writer land first
        if (now_held := read(store)) is not None and now_held.owner == mine.owner:
            return now_held
    raise LeaseHeldError(f"could not take the lease on {store.url}: other drivers keep taking it; rerun later")


def renew(store: Store, lease: Lease, ttl_s: float = DEFAULT_TTL_S,
          clock: Callable[[], float] = time.time) -> Lease:  # fmt: skip
    """Push our lease's expiry to ``clock() + ttl_s``; raises ``LeaseLostError`` if it is no longer ours."""
    held = read(store)
    if held is None or held.owner != lease.owner:
        holder = held.describe(clock()) if held else "nobody"
        raise LeaseLostError(f"the lease on {store.url} is no longer ours (now: {holder})")
    fresh = replace(lease, expires=clock() + ttl_s)
    store.write_many({LEASE_FILE: json.dumps(asdict(fresh)).encode()})
    return fresh


def release(store: Store, lease: Lease) -> None:
    """Delete the lease if it is still ours."""
    held = read(store)
    if held is not None and held.owner == lease.owner:
        store.remove_files([LEASE_FILE])


class Keeper:
    """``with Keeper(store) as k:`` holds the lease, renews it every ``ttl_s / 3`` seconds on a
    daemon thread and releases it at the end. ``k.lost()`` is None while it holds, else why not:
    the runner asks it after every shard (``runner.run(stop=k.lost)``)."""

    def __init__(self, store: Store, ttl_s: float = DEFAULT_TTL_S, settle_s: float = 0.5) -> None:
        self.store, self.ttl_s, self.settle_s = store, ttl_s, settle_s
        self.lease: Lease | None = None
        self._lost: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Keeper:
        self.lease = acquire(self.store, self.ttl_s, settle_s=self.settle_s)
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._done.wait(self.ttl_s / 3):
            try:
                assert self.lease is not None  # set before the thread starts
                self.lease = renew(self.store, self.lease, self.ttl_s)
            except LeaseLostError as err:
                self._lost = str(err)
                return
            except OSError as err:  # storage down past its retries: try again next round, until expiry
                log.warning("could not renew the lease on %s: %s", self.store.url, err)
                if self.lease is not None and time.time() >= self.lease.expires:
                    self._lost = f"the lease on {self.store.url} expired: renewal kept failing ({err})"
                    return
            except Exception as err:  # a renewal that cannot work again: stop the run, do not drop the lease silently
                self._lost = f"renewing the lease on {self.store.url} failed: {type(err).__name__}: {err}"
                return

    def lost(self) -> str | None:
        return self._lost

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.lease is not None and self._lost is None:
            release(self.store, self.lease)
