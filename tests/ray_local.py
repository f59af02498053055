"""A local Ray cluster for end-to-end tests: `ray start --head` on 127.0.0.1 only, token auth on."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray turns `--node-ip-address 127.0.0.1` into the machine's routable address ("so other nodes can
# reach it"), and its GCS, raylet and client server then listen there. With this set (the switch Ray
# uses on laptops), the node's address stays the loopback one and no Ray server leaves 127.0.0.1.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class LocalCluster:
    """`ray start --head` on 127.0.0.1 with token auth (Ray's job API runs any code it is sent).

    ``stop`` kills this cluster's processes only (SIGKILL, like `ray stop --force`, but chosen by
    this cluster's temp dir and GCS port), so a Ray cluster a developer runs beside the tests
    survives them; ``start`` brings it back."""

    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.tmp, self.port, self.dash = tmp, _free_port(), _free_port()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), **LOOPBACK_ENV, **(extra_env or {})}  # fmt: skip
        self.address = f"http://127.0.0.1:{self.dash}"

    @property
    def gcs_address(self) -> str:
        """What a driver started outside `ray job submit` joins (as RAY_ADDRESS)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [*RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash), "--num-cpus", "2",
               "--temp-dir", str(self.tmp), "--disable-usage-stats"]  # fmt: skip
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode:
            raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        deadline = time.time() + 60
        while subprocess.run([*RAY, "job", "list", "--address", self.address], env=self.env,
                             capture_output=True).returncode:  # fmt: skip
            if time.time() > deadline:
                raise RuntimeError("Ray's job server did not come up")
            time.sleep(1)

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: those naming its temp dir or its GCS address on their
        command line (GCS, raylet, dashboard, monitors, client server), and all their descendants
        (workers, actors, job drivers)."""
        marks = (str(self.tmp), f"127.0.0.1:{self.port}")
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                line = " ".join(proc.info["cmdline"] or [])
                if proc.pid != os.getpid() and any(m in line for m in marks):
                    found[proc.pid] = proc
                    found.update({c.pid: c for c in proc.children(recursive=True)})
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        """SIGKILL this cluster's processes, twice over to catch workers forked meanwhile."""
        for _ in range(2):
            procs = self.processes()
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            psutil.wait_procs(procs, timeout=30)

    def restart_on_new_ports(self) -> None:
        self.port, self.dash = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dash}"
        self.start()
