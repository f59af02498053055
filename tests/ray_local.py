"""A local Ray cluster for end-to-end tests: `ray start --head` on 127.0.0.1 only, token auth on."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """`ray start --head` on 127.0.0.1 with token auth (Ray's job API runs any code it is sent);
    ``stop`` is `ray stop --force`, the whole local cluster at once, and ``start`` brings it back."""

    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.tmp, self.port, self.dash = tmp, _free_port(), _free_port()
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16), **(extra_env or {})}  # fmt: skip
        self.address = f"http://127.0.0.1:{self.dash}"

    @property
    def gcs_address(self) -> str:
        """What a driver started outside `ray job submit` joins (as RAY_ADDRESS)."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [*RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dash), "--num-cpus", "2",
               "--temp-dir", str(self.tmp), "--disable-usage-stats"]  # fmt: skip
        subprocess.run(cmd, check=True, env=self.env, capture_output=True, timeout=180)
        deadline = time.time() + 60
        while subprocess.run([*RAY, "job", "list", "--address", self.address], env=self.env,
                             capture_output=True).returncode:  # fmt: skip
            if time.time() > deadline:
                raise RuntimeError("Ray's job server did not come up")
            time.sleep(1)

    def stop(self) -> None:
        subprocess.run([*RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)

    def restart_on_new_ports(self) -> None:
        self.port, self.dash = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dash}"
        self.start()
