"""A small run for the review app and export tests: six images in two shards, written with the
library's own shard, run record and merge functions. The label maps are known (each tag paints
one of the image's coloured rectangles, a thin band is 255), so exports can be checked against
them; one image fails to decode (a stats row, no label). The run's config is the tiny models',
so "try it" labels with them. Built once per test session (``review_run``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import types
from pipeline.decode import ImageDecodeError, decode_image
from pipeline.stats import Failure
from pipeline.storage import commit, merge
from pipeline.storage.store import Store
from pipeline.types import LabelResult
from tests.conftest import CATEGORIES, blob_image

# image id -> tags; "broken" is a truncated file
IMAGES = {"cat-0": (1,), "dog-1": (7,), "both-2": (1, 7), "person-3": (15,), "three-4": (1, 7, 15), "broken": (1,)}
SHARDS = (("cat-0", "dog-1", "both-2"), ("person-3", "three-4", "broken"))


def _write_images(folder: Path, images: dict[str, tuple[int, ...]], size: tuple[int, int] | None) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for k, (image_id, tags) in enumerate(images.items()):
        path = folder / f"{image_id}.png"
        if image_id == "broken":
            path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            Image.fromarray(blob_image(*(size or (48 + 8 * k, 64)), seed=k)).save(path)
        records.append({"id": image_id, "uri": str(path), "tags": list(tags)})
    return records


def painted(image_id: str, image: np.ndarray, tags: tuple[int, ...]) -> LabelResult:
    """A LabelResult whose label map paints the first tag on the red rectangle, the second on
    the blue one, the third on the top rows, with a 255 band where the red one ends."""
    h, w = image.shape[:2]
    lm = np.zeros((h, w), np.uint8)
    red, blue = (image == (220, 40, 40)).all(axis=2), (image == (30, 40, 210)).all(axis=2)
    for tag, where in zip(tags, (red, blue, np.arange(h)[:, None] < h // 6), strict=False):
        lm[where & (lm == 0)] = tag
    lm[h // 2 - 1 : h // 2 + 1, w // 6 : w // 2] = 255
    c = len(tags)
    scores = np.linspace(0.9, 0.3, c).astype(np.float32)
    maps = np.stack([(lm == t).astype(np.float32) for t in tags]) if c else np.zeros((0, h, w), np.float32)
    return LabelResult(image_id, lm, tuple(tags), maps[:, ::4, ::4].copy(), maps[:, ::2, ::2].copy(), scores * 0.9,
                       scores, tuple(tags), maps, None)  # fmt: skip


def make_run(root: Path, config, images: dict[str, tuple[int, ...]] = IMAGES,
             shards: tuple[tuple[str, ...], ...] = SHARDS, size: tuple[int, int] | None = None) -> Path:  # fmt: skip
    """Write the run under ``root / "run"`` (images under ``root / "images"``); returns the prefix.
    ``images``: id -> tags, in manifest order; ``shards``: their ids by shard; ``size``: (height,
    width) of every image (default: 48 + 8 * index by 64)."""
    records = _write_images(root / "images", images, size)
    names = types.image_names(records)
    by_id = {r["id"]: r for r in records}
    manifest = types.manifest_fingerprint(records)
    fp = types.run_fingerprint(config.fingerprint(), {"clip": {"sha256": "tiny"}}, manifest)
    store = Store.open(str(root / "run"))
    commit.write_run(store, fp, config.to_dict(), {"clip": {"sha256": "tiny"}})
    cats = [{"id": c.id, "name": c.name} for c in CATEGORIES]
    shard_ids = []
    for index, ids in enumerate(shards):
        results, failures = [], []
        for image_id in ids:
            try:
                image = decode_image(Path(by_id[image_id]["uri"]).read_bytes())
            except ImageDecodeError as err:
                failures.append(Failure(image_id, "decode_error", str(err)))
                continue
            results.append(painted(image_id, image, tuple(by_id[image_id]["tags"])))
        shard_id = types.shard_id_for(index, list(ids))
        commit.write_shard(store, shard_id, results, failures, cats, fp.digest, names)
        shard_ids.append(shard_id)
    merge.merge(store, shard_ids, fp.digest)
    return root / "run"


def interleaved(n_shards: int) -> tuple[dict[str, tuple[int, ...]], tuple[tuple[str, ...], ...]]:
    """A manifest not sorted by id: shard k holds ``im-<k>`` and ``im-<k + n_shards>``, so the
    id order visits every shard before coming back to the first. (images, shards) for ``make_run``."""
    ids = [f"im-{i:03d}" for i in range(2 * n_shards)]
    shards = tuple((ids[k], ids[k + n_shards]) for k in range(n_shards))
    return {i: ((1, 7)[n % 2],) for n, i in enumerate(i for pair in shards for i in pair)}, shards


def label_maps(prefix: Path) -> dict[str, np.ndarray]:
    """The run's label maps by image id, read from its stats rows and PNGs."""
    import pyarrow.dataset as ds

    rows = ds.dataset(prefix / "merged" / "stats_images", format="parquet").to_table().to_pylist()
    return {r["image_id"]: np.array(Image.open(prefix / r["label_file"])) for r in rows if r["status"] == "ok"}


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (to see what a test changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="session")
def review_run(tmp_path_factory, tiny_config) -> Path:
    prefix = make_run(tmp_path_factory.mktemp("review"), tiny_config)
    assert json.loads((prefix / "merged" / "_MERGED.json").read_text())["counts"]["failed"] == 1
    return prefix
