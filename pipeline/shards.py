"""One shard, start to finish, with a labeler in hand: read and decode each image, label the good
ones in batches, record the bad ones, write and commit the shard. No Ray here: the runner's
actors call ``label_shard``, and so do tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np

from pipeline import storage
from pipeline.decode import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from pipeline.labeler import Labeler, LabelRequest, LabelResult
from pipeline.manifest import Shard
from pipeline.stats import Failure

log = logging.getLogger(__name__)


def _load(record: dict[str, Any], max_pixels: int, storage_options: dict[str, Any]) -> np.ndarray | Failure:
    """Decoded image, or the Failure that says why there is none."""
    try:
        with fsspec.open(record["uri"], "rb", **storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        return Failure(record["id"], "missing", f"image not found: {record['uri']}")
    except OSError as err:
        return Failure(record["id"], "read_error", f"cannot read {record['uri']}: {err}")
    try:
        return decode_image(data, max_pixels)
    except ImageDecodeError as err:
        return Failure(record["id"], "decode_error", f"{record['uri']}: {err}")


def label_shard(
    labeler: Labeler,
    store: storage.Store,
    shard: Shard,
    fingerprint: str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage_options: dict[str, Any] | None = None,
    io_threads: int = 4,
) -> dict[str, Any]:
    """Label every image of ``shard`` and commit it under ``store``; returns the marker.

    Images are read and decoded on ``io_threads`` threads while the previous batch is labeled.
    """
    opts = storage_options or {}
    results: list[LabelResult] = []
    failures: list[Failure] = []
    batch_size = labeler.config.batch_size
    records: Sequence[dict[str, Any]] = shard.records
    with ThreadPoolExecutor(io_threads) as pool:
        loaded = pool.map(lambda r: _load(r, max_pixels, opts), records)  # queued at once, used in order
        batch: list[LabelRequest] = []
        for record, image in zip(records, loaded, strict=True):
            if isinstance(image, Failure):
                failures.append(image)
                continue
            batch.append(LabelRequest(record["id"], image, tuple(record["tags"])))
            if len(batch) == batch_size:
                results += labeler.label(batch)
                batch = []
        if batch:
            results += labeler.label(batch)
    categories = list(labeler.categories.values())
    return storage.write_shard(store, shard.shard_id, results, failures, categories, fingerprint)
