"""One shard, start to finish, with a labeler in hand: read and decode each image, label the good
ones in batches, record the bad ones, write and commit the shard. No Ray here: the runner's
actors call ``label_shard``, and so do tests.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np

from pipeline import cliper, redact, refine, retry, storage
from pipeline.config import Config
from pipeline.decode import ImageDecodeError, SizeMismatchError, decode_image
from pipeline.labeler import Labeler, LabelRequest, LabelResult
from pipeline.manifest import Shard
from pipeline.stats import Failure

log = logging.getLogger(__name__)


def _request(record: dict[str, Any], config: Config, max_pixels: int,
             storage_options: dict[str, Any]) -> LabelRequest | Failure:  # fmt: skip
    """Read, decode and (when refinement is on) segment one image: CPU work done off the GPU's path."""
    image = _load(record, max_pixels, storage_options)
    if isinstance(image, Failure):
        return image
    try:
        cliper.check_aspect_ratio(image.shape[1], image.shape[0], config.cliper.max_aspect_ratio)
    except cliper.UnusableImageError as err:
        return Failure(record["id"], "unusable", f"{record['uri']}: {err}")
    segments = refine.superpixels(image, config.refine) if config.refine.enabled else None
    return LabelRequest(record["id"], image, tuple(record["tags"]), segments)


def _load(record: dict[str, Any], max_pixels: int, storage_options: dict[str, Any], *,
          policy: retry.RetryPolicy = retry.DEFAULT) -> np.ndarray | Failure:  # fmt: skip
    """Decoded image (HWC uint8 RGB), or the Failure that says why there is none. Transient read
    faults are retried under ``policy``; one outlasting it, or a permanent one, is a ``read_error``
    row, a missing file a ``missing`` row (not retried). A record's ``width`` and ``height``, when
    given, pick the orientation (``decode_image``); an image matching them in neither is a
    ``size_mismatch`` row."""
    uri = record["uri"]
    try:
        data = retry.call(lambda: _read_bytes(uri, storage_options), f"read {uri}", policy)
    except FileNotFoundError:
        return Failure(record["id"], "missing", f"image not found: {uri}")
    except retry.StorageError as err:  # its message already names the uri
        return Failure(record["id"], "read_error", str(err))
    except OSError as err:
        return Failure(record["id"], "read_error", f"cannot read {uri}: {err}")
    size = (record["width"], record["height"]) if record.get("width") and record.get("height") else None
    try:
        return decode_image(data, max_pixels, size)
    except SizeMismatchError as err:
        return Failure(record["id"], "size_mismatch", f"{uri}: {err}")
    except ImageDecodeError as err:
        return Failure(record["id"], "decode_error", f"{uri}: {err}")


def _read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    with fsspec.open(uri, "rb", **storage_options) as f:
        return f.read()


def label_shard(
    labeler: Labeler,
    store: storage.Store,
    shard: Shard,
    fingerprint: str,
    *,
    storage_options: dict[str, Any] | None = None,
    io_threads: int = 4,
) -> dict[str, Any]:
    """Label every image of ``shard`` and commit it under ``store``; returns the marker.

    Three things overlap: ``io_threads`` threads read, decode and segment images ahead; the
    calling thread runs the models on one batch; one more thread finishes (pools scores, builds
    label maps) the previous batch.
    """
    opts = storage_options or {}
    max_pixels = labeler.config.max_pixels
    failures: list[Failure] = []
    finished: list[Future[LabelResult]] = []
    batch_size = labeler.config.batch_size
    with ThreadPoolExecutor(io_threads) as io, ThreadPoolExecutor(1) as post:
        loaded = io.map(lambda r: _request(r, labeler.config, max_pixels, opts), shard.records)  # queued at once
        batch: list[LabelRequest] = []
        for item in loaded:
            if isinstance(item, Failure):
                failures.append(item)
                continue
            batch.append(item)
            if len(batch) == batch_size:
                finished += [post.submit(labeler.finish, w) for w in labeler.infer(batch)]
                batch = []
        if batch:
            finished += [post.submit(labeler.finish, w) for w in labeler.infer(batch)]
        results = [f.result() for f in finished]
    secrets = redact.secret_values(opts)  # error texts from storage libraries must not carry credentials
    failures = [Failure(f.image_id, f.status, redact.redact(f.error, secrets)) for f in failures]
    categories = list(labeler.categories.values())
    return storage.write_shard(store, shard.shard_id, results, failures, categories, fingerprint, shard.names)
