"""The test cluster stays on the loopback interface and stops only its own processes."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time

import psutil
import pytest

from tests.ray_local import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture
def decoy():
    """A process that `ray stop --force` would take for a Ray worker (its arguments name
    default_worker.py): it stands for a developer's own cluster running beside the tests."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "default_worker.py"])
    yield proc
    proc.kill()
    proc.wait()


def _loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    mapped = getattr(ip, "ipv4_mapped", None)  # '::ffff:127.0.0.1'
    return (mapped or ip).is_loopback


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(proc.name(), c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_cluster_listens_on_loopback_only_and_stop_spares_other_ray_processes(tmp_path_factory, decoy):
    cluster = LocalCluster(tmp_path_factory.mktemp("ray"))  # short: Ray's socket paths are limited
    cluster.start()
    try:
        procs = cluster.processes()
        names = " ".join(p.name() for p in procs)
        assert "gcs_server" in names and "raylet" in names, names
        listening = _listening(procs)
        assert listening, "the cluster's processes listen on no port?"
        outside = [entry for entry in listening if not _loopback(entry[1])]
        assert not outside, f"Ray servers reachable beyond loopback: {outside}"
    finally:
        cluster.stop()
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    time.sleep(0.5)
    assert decoy.poll() is None, "stopping the test cluster killed an unrelated Ray-looking process"
