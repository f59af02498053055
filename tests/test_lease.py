"""pipeline/lease.py: one driver per output prefix. A second driver is refused with a message
naming the holder; a stale lease (expired, or its process gone) is taken over; racing drivers
get exactly one lease, on stores with an exclusive create and on stores without one."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import uuid

import pytest

from pipeline import lease
from pipeline.storage.store import Store


def _store(tmp_path=None) -> Store:
    if tmp_path is not None:
        return Store.open(str(tmp_path / "out"))
    return Store.open(f"memory://lease-{uuid.uuid4().hex[:8]}")


def _foreign(store: Store, expires: float, host: str = "gpu-node-7", pid: int = 4242) -> None:
    doc = {"owner": "f" * 32, "host": host, "pid": pid, "expires": expires}
    store.write_many({lease.LEASE_FILE: json.dumps(doc).encode()})


@pytest.mark.parametrize("local", [False, True])
def test_a_second_driver_is_refused_with_the_holder_and_its_expiry(tmp_path, local):
    store = _store(tmp_path if local else None)
    first = lease.acquire(store, 300, clock=lambda: 1_000_000.0, settle_s=0)
    with pytest.raises(lease.LeaseHeldError) as err:
        lease.acquire(store, 300, clock=lambda: 1_000_100.0, settle_s=0, owner="second")
    text = str(err.value)
    assert f"in use by another driver {first.owner[:12]} on host {first.host}, pid {first.pid}" in text
    assert "its lease expires at 1970-01-12 13:51:40 UTC (in 200 s)" in text
    assert lease.read(store) == first  # untouched


def test_an_expired_lease_is_taken_over():
    store = _store()
    _foreign(store, expires=999.0)
    mine = lease.acquire(store, 60, clock=lambda: 1000.0, settle_s=0)
    assert lease.read(store) == mine and mine.expires == 1060.0


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over():
    import socket

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = _store()
    _foreign(store, expires=4_000_000_000, host=socket.gethostname(), pid=int(gone.stdout))
    assert lease.acquire(store, 60, settle_s=0).owner != "f" * 32
    _foreign(store, expires=4_000_000_000, host="another-host", pid=int(gone.stdout))  # cannot check: refused
    with pytest.raises(lease.LeaseHeldError, match="on host another-host"):
        lease.acquire(store, 60, settle_s=0)


def test_renewal_extends_and_notices_a_takeover():
    store, now = _store(), [1000.0]
    mine = lease.acquire(store, 60, clock=lambda: now[0], settle_s=0)
    now[0] = 1050.0
    mine = lease.renew(store, mine, 60, clock=lambda: now[0])
    assert lease.read(store).expires == 1110.0
    now[0] = 1200.0  # we stalled past our expiry and another driver took over
    other = lease.acquire(store, 60, clock=lambda: now[0], settle_s=0, owner="other")
    with pytest.raises(lease.LeaseLostError, match="no longer ours"):
        lease.renew(store, mine, 60, clock=lambda: now[0])
    lease.release(store, mine)  # not ours: left alone
    assert lease.read(store) == other
    lease.release(store, other)
    assert lease.read(store) is None


def _race(store: Store, monkeypatch: pytest.MonkeyPatch, n: int = 6) -> list[str]:
    """``n`` drivers take the lease at once; every driver's first look finds it free (a barrier
    after each first read), so the store's create and the read-back must settle it."""
    barrier, won, seen = threading.Barrier(n), [], threading.local()
    real_read = store.read

    def read(rel: str):
        data = real_read(rel)
        if rel == lease.LEASE_FILE and not getattr(seen, "first", False):
            seen.first = True
            barrier.wait()
        return data

    monkeypatch.setattr(store, "read", read)
    seen.first = True  # the test's own thread reads freely

    def driver(i: int) -> None:
        with contextlib.suppress(lease.LeaseHeldError):
            won.append(lease.acquire(store, 300, settle_s=0.2, owner=f"d{i}").owner)

    threads = [threading.Thread(target=driver, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_racing_drivers_get_exactly_one_lease(tmp_path, monkeypatch):
    store = _store(tmp_path)
    won = _race(store, monkeypatch)
    assert len(won) == 1 and lease.read(store).owner == won[0]


def test_without_exclusive_create_the_read_back_still_lets_one_driver_in(monkeypatch):
    store = _store()
    real = store.fs.open

    def no_x(path, mode="rb", *args, **kwargs):
        if "x" in mode:
            raise NotImplementedError("File mode not supported")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(store.fs, "open", no_x)
    won = _race(store, monkeypatch)
    assert len(won) == 1 and lease.read(store).owner == won[0]
    with pytest.raises(lease.LeaseHeldError):
        lease.acquire(store, 300, settle_s=0)


def test_the_keeper_renews_reports_a_lost_lease_and_releases():
    store = _store()
    with lease.Keeper(store, ttl_s=0.3, settle_s=0) as keeper:
        first = lease.read(store).expires
        threading.Event().wait(0.25)  # more than one renewal period (ttl / 3)
        assert lease.read(store).expires > first and keeper.lost() is None
    assert lease.read(store) is None
    with lease.Keeper(store, ttl_s=0.3, settle_s=0) as keeper:
        _foreign(store, expires=4_000_000_000)  # another driver took it over
        threading.Event().wait(0.25)
        assert "no longer ours" in keeper.lost()
    assert lease.read(store).owner == "f" * 32  # a lost lease is not released


def test_an_unexpected_renewal_error_stops_the_run_instead_of_ending_renewal_silently(monkeypatch):
    store = _store()

    def broken(*args, **kwargs):
        raise ValueError("lease object holds no JSON")

    with lease.Keeper(store, ttl_s=0.3, settle_s=0) as keeper:
        monkeypatch.setattr(lease, "renew", broken)
        threading.Event().wait(0.25)
        assert "ValueError: lease object holds no JSON" in (keeper.lost() or "")
