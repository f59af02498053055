"""One shard, start to finish, with a labeler in hand: read and decode each image, label the good
ones in batches, record the bad ones, write and commit the shard. No Ray here: the runner's
actors call ``label_shard``, and so do tests.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
import numpy as np

from pipeline import cliper, redact, refine, retry, stats
from pipeline.config import Config
from pipeline.decode import ImageDecodeError, SizeMismatchError, decode_image
from pipeline.labeler import Labeler
from pipeline.manifest import Shard
from pipeline.storage import commit, layout
from pipeline.storage.store import Store
from pipeline.types import DECODE_ERROR, MISSING, READ_ERROR, SIZE_MISMATCH, UNUSABLE, Failure, LabelRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


def _request(record: dict[str, Any], config: Config, max_pixels: int,
             storage_options: dict[str, Any]) -> LabelRequest | Failure:  # fmt: skip
    """Read, decode and (when refinement is on) segment one image: CPU work done off the GPU's path."""
    image = _load(record, max_pixels, storage_options)
    if isinstance(image, Failure):
        return image
    try:
        cliper.check_aspect_ratio(image.shape[1], image.shape[0], config.cliper.max_aspect_ratio)
    except cliper.UnusableImageError as err:
        return Failure(record["id"], UNUSABLE, f"{record['uri']}: {err}")
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
        return Failure(record["id"], MISSING, f"image not found: {uri}")
    except retry.StorageError as err:  # its message already names the uri
        return Failure(record["id"], READ_ERROR, str(err))
    except OSError as err:
        return Failure(record["id"], READ_ERROR, f"cannot read {uri}: {err}")
    size = (record["width"], record["height"]) if record.get("width") and record.get("height") else None
    try:
        return decode_image(data, max_pixels, size)
    except SizeMismatchError as err:
        return Failure(record["id"], SIZE_MISMATCH, f"{uri}: {err}")
    except ImageDecodeError as err:
        return Failure(record["id"], DECODE_ERROR, f"{uri}: {err}")


def _read_bytes(uri: str, storage_options: dict[str, Any]) -> bytes:
    with fsspec.open(uri, "rb", **storage_options) as f:
        return f.read()


def _prefetched(io: ThreadPoolExecutor, fn: Callable[[dict[str, Any]], T], records: Iterable[dict[str, Any]],
                window: int) -> Iterator[T]:  # fmt: skip
    """``fn(record)`` for each record, in order, computed on ``io`` at most ``window`` records
    ahead of the consumer (``Executor.map`` would queue the whole shard at once)."""
    it = iter(records)
    pending = deque(io.submit(fn, r) for r in itertools.islice(it, window))
    while pending:
        item = pending.popleft().result()
        for r in itertools.islice(it, 1):
            pending.append(io.submit(fn, r))
        yield item


def label_shard(
    labeler: Labeler,
    store: Store,
    shard: Shard,
    fingerprint: str,
    *,
    storage_options: dict[str, Any] | None = None,
    io_threads: int = 4,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Label every image of ``shard`` and commit it under ``store``; returns the marker.

    Three things overlap: ``io_threads`` threads read, decode and segment images ahead (at most
    ``prefetch_window`` records ahead); the calling thread runs the models on one batch; one more
    thread finishes the previous batch (pools scores, builds label maps) and reduces each result
    to its ``stats.ImageEntry`` at once, so the float maps of at most two batches are alive.

    Batches are fixed by record position (records ``[k * B, (k + 1) * B)``, ``B`` = ``batch_size``,
    default the config's), whatever fails: an image that fails leaves its own batch one short and
    moves no other image to another batch, so a redone shard batches its images as before.
    """
    opts = storage_options or {}
    max_pixels = labeler.config.max_pixels
    size = batch_size or labeler.config.batch_size
    failures: list[Failure] = []
    entries: list[stats.ImageEntry] = []

    def finish(work: Any) -> stats.ImageEntry:
        result = labeler.finish(work)
        return stats.entry(result, shard.shard_id, layout.label_file(shard.names[result.image_id].label))

    with ThreadPoolExecutor(io_threads) as io, ThreadPoolExecutor(1) as post:
        loaded = _prefetched(io, lambda r: _request(r, labeler.config, max_pixels, opts), shard.records,
                             prefetch_window(size, io_threads))  # fmt: skip
        previous: list[Future[stats.ImageEntry]] = []
        for chunk in _batches(loaded, size):
            failures += [x for x in chunk if isinstance(x, Failure)]
            batch = [x for x in chunk if not isinstance(x, Failure)]
            if batch:
                work = labeler.infer(batch)  # the post thread finishes the previous batch meanwhile
                entries += [f.result() for f in previous]
                previous = [post.submit(finish, w) for w in work]
        entries += [f.result() for f in previous]
    secrets = redact.secret_values(opts)  # error texts from storage libraries must not carry credentials
    failures = [Failure(f.image_id, f.status, redact.redact(f.error, secrets)) for f in failures]
    categories = list(labeler.categories.values())
    return commit.write_shard(store, shard.shard_id, entries, failures, categories, fingerprint, shard.names,
                              discovery=labeler.config.discovery.enabled)  # fmt: skip


def prefetch_window(batch_size: int, io_threads: int) -> int:
    """Records read ahead of the models: two batches, and enough to keep every reader busy."""
    return max(2 * batch_size, io_threads)


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
