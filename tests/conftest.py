"""Shared fixtures: tiny models built from configs, saved with the real save code, and loaded back
through the loaders production uses."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

from tests.ray_local import LOOPBACK_ENV

# Jobs that tests run as subprocesses (python jobs/x.py) import this checkout's pipeline: jobs/
# hold no sys.path edits, so the path is set here, for every child process.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

# Any Ray a test starts in-process (ray.init()) keeps its servers on 127.0.0.1 too (see ray_local).
for _key, _value in LOOPBACK_ENV.items():
    os.environ.setdefault(_key, _value)

from pipeline.bench.architectures import save_models  # noqa: E402
from pipeline.config import Config, build_config  # noqa: E402
from pipeline.labeler import Labeler  # noqa: E402
from pipeline.types import Category  # noqa: E402


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return save_models(tmp_path_factory.mktemp("tiny"))


def tiny_overrides(paths: dict, **cliper: object) -> dict:
    return {
        "model": {
            "clip": {
                "model": str(paths["clip_config"]),
                "pretrained": None,
                "checkpoint": str(paths["clip_checkpoint"]),
            },
            "sd": {"checkpoint": str(paths["sd_dir"])},
            "device": "cpu",
        },
        "cliper": dict(cliper),
    }


@pytest.fixture(scope="session")
def tiny_config(tiny_paths: dict) -> Config:
    return build_config("voc-vit-b16", tiny_overrides(tiny_paths))


CATEGORIES = [Category(1, "cat", "cat"), Category(7, "dog", "dog"), Category(15, "person", "person")]


@pytest.fixture(scope="session")
def labeler(tiny_config: Config) -> Labeler:
    return Labeler.from_config(tiny_config, CATEGORIES)


def blob_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """HWC uint8 RGB: a textured background with two flat coloured rectangles."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
    img[h // 5 : h // 2, w // 6 : w // 2] = (220, 40, 40)
    img[h // 2 : 4 * h // 5, w // 2 : 5 * w // 6] = (30, 40, 210)
    return img


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 API: moto's server on 127.0.0.1 (a free port), as s3fs's own tests use it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
