"""Byte identity of a run's outputs across code changes: every preset labels the same six
photographs (scikit-image's samples as JPEGs of several sizes, fixed tags) with the same tiny
random-weight models, through ``shards.label_shard``, and one sha256 per preset is printed over
every output file but the wall-clock timings. Run it in two checkouts and compare the lines.

    python jobs/bench_identity.py [--work /tmp/tag2mask-identity] [--json hashes.json]

Under the work folder, models/, images/ and out/ are removed and rewritten (nothing else there is
touched); it must be the same path in both checkouts (the outputs record the images' paths).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from pipeline.bench.architectures import save_models
from pipeline.config import PRESETS, build_config
from pipeline.labeler import Labeler
from pipeline.malloc import keep_freed_memory
from pipeline.manifest import Shard
from pipeline.shards import label_shard
from pipeline.storage.store import Store
from pipeline.types import Category

CATEGORIES = [Category(1, "cat", "cat"), Category(7, "dog", "dog"), Category(15, "person", "person")]
PHOTOS = (("astronaut", (375, 500), [1]), ("coffee", (333, 500), [7, 15]), ("chelsea", (300, 451), [15]),
          ("rocket", (240, 320), [1, 7]), ("camera", (512, 512), [7]), ("cat", (300, 451), [1, 15]))  # fmt: skip


def _records(folder: Path) -> list[dict]:
    folder.mkdir(parents=True)
    records = []
    for i, (name, (h, w), tags) in enumerate(PHOTOS):
        photo = getattr(skimage.data, name)()
        photo = np.repeat(photo[..., None], 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
        buffer = io.BytesIO()
        Image.fromarray(photo).resize((w, h)).save(buffer, "JPEG", quality=85)
        (folder / f"{name}.jpg").write_bytes(buffer.getvalue())
        records.append({"id": f"im{i}", "uri": str(folder / f"{name}.jpg"), "tags": tags})
    return records


def tiny_overrides(paths: dict) -> dict:
    """Config overrides that load ``save_models``' tiny models on the CPU."""
    clip = {"model": str(paths["clip_config"]), "pretrained": None, "checkpoint": str(paths["clip_checkpoint"])}
    return {"model": {"clip": clip, "sd": {"checkpoint": str(paths["sd_dir"])}, "device": "cpu"}}


PARTS = ("models", "images", "out")  # what output_hashes writes under its work folder, and removes first


def output_hashes(work: Path) -> dict[str, dict[str, str]]:
    """{preset: {output file: sha256}} for every preset, timings left out. Removes and rewrites only
    ``PARTS`` under ``work``, nothing else there."""
    for part in PARTS:
        shutil.rmtree(work / part, ignore_errors=True)
    paths = save_models(work / "models")
    shard = Shard("00000-identity", tuple(_records(work / "images")))
    hashes = {}
    for preset in sorted(PRESETS):
        labeler = Labeler.from_config(build_config(preset, tiny_overrides(paths)), CATEGORIES)
        out = work / "out" / preset
        label_shard(labeler, Store.open(str(out)), shard, "0" * 64, io_threads=2)
        hashes[preset] = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(out.rglob("*")) if p.is_file() and "timings" not in p.name}  # fmt: skip
    return hashes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tag2mask-identity"),
                        help="its models/, images/ and out/ are removed, then rewritten")
    parser.add_argument("--json", type=Path, help="also write every file's sha256 here")
    args = parser.parse_args(argv)
    keep_freed_memory()
    hashes = output_hashes(args.work)
    print(f"{'preset':14s} {'files':>5s}  sha256 of the outputs (timings left out)")
    for preset, files in hashes.items():
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        print(f"{preset:14s} {len(files):5d}  {digest}")
    if args.json:
        args.json.write_text(json.dumps(hashes, indent=1, sort_keys=True))
