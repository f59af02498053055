"""How consensus labels trade coverage for accuracy, on a synthetic split with known truth.

    python jobs/bench_consensus.py --images 200 --out /tmp/bench_consensus

Ground truth: each image holds 1-3 ellipses of tagged classes on background. Each simulated run
labels it with its own errors (``ERRORS``): object boundaries grown or shrunk, an object given
another tagged class, an object missed, a false blob in the background, an ignore band of 255
around its boundaries. The runs are written with the real storage code, the consensus with
``pipeline.consensus``, and every output is audited with ``pipeline.audit`` against the truth.
Prints one row per output: ignored share of the valid pixels, accuracy on labelled pixels,
pixel accuracy (ignored = miss), mIoU. The figures describe this error model only: the errors of
the simulated runs are independent, which is the case where a consensus helps most.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline import audit, consensus, types
from pipeline.config import Config
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import IGNORE, LabelResult

CATS = [{"id": i, "name": f"class{i}"} for i in range(1, 6)]
SIZE = (96, 128)
SHARD = 50  # images per shard


@dataclass(frozen=True)
class Errors:
    grow: int  # pixels objects grow (> 0) or shrink (< 0)
    confuse: float  # chance an object gets another class of the image's tags
    miss: float  # chance an object is labelled background
    blob: float  # chance of a false blob of a tagged class in the background
    band: int  # width of a 255 band along the run's object boundaries (0: none)


ERRORS = {
    "A": Errors(3, 0.15, 0.10, 0.30, 0),
    "B": Errors(-2, 0.15, 0.10, 0.30, 1),
    "C": Errors(1, 0.20, 0.05, 0.40, 0),
}


def _ellipse(rng: np.random.Generator) -> np.ndarray:
    h, w = SIZE
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ry, rx = rng.uniform(0.12, 0.35) * h, rng.uniform(0.12, 0.35) * w
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def ground_truth(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[np.ndarray, int]]]:
    """[H, W] uint8 truth and its objects (mask, class), painted in order."""
    classes = rng.choice([c["id"] for c in CATS], size=rng.integers(1, 4), replace=False)
    objects = [(_ellipse(rng), int(c)) for c in classes]
    gt = np.zeros(SIZE, np.uint8)
    for mask, cid in objects:
        gt[mask] = cid
    return gt, objects


def simulate(objects: list[tuple[np.ndarray, int]], err: Errors, rng: np.random.Generator) -> np.ndarray:
    """One run's [H, W] uint8 label map of an image (see ``Errors``)."""
    tags = [cid for _, cid in objects]
    out = np.zeros(SIZE, np.uint8)
    for mask, cid in objects:
        if rng.random() < err.miss:
            continue
        shaped = ndimage.binary_dilation(mask, iterations=err.grow) if err.grow > 0 else (
            ndimage.binary_erosion(mask, iterations=-err.grow) if err.grow < 0 else mask)  # fmt: skip
        wrong = [t for t in tags if t != cid] or [c["id"] for c in CATS if c["id"] != cid]
        out[shaped] = int(rng.choice(wrong)) if rng.random() < err.confuse else cid
    if rng.random() < err.blob:
        blob = _ellipse(rng) & ndimage.binary_erosion(out == 0, iterations=2)
        out[blob] = int(rng.choice(tags))
    if err.band:
        edges = ndimage.morphological_gradient(out, size=2 * err.band + 1) > 0
        out[edges] = IGNORE
    return out


def _result(image_id: str, label_map: np.ndarray, tags: list[int]) -> LabelResult:
    n = len(tags)
    scores = np.full(n, 0.5, np.float32)
    decision = np.stack([(label_map == t).astype(np.float32) for t in tags])
    empty = np.zeros((n, 1, 1), np.float32)
    return LabelResult(image_id, label_map, tuple(tags), empty, empty, scores, scores, tuple(tags), decision, None)


def write_runs(out: Path, images: int, seed: int) -> dict[str, np.ndarray]:
    """Write runs A, B, C under ``out``; returns the truth by image id."""
    rng = np.random.default_rng(seed)
    truth, maps = {}, {name: {} for name in ERRORS}
    tags = {}
    for i in range(images):
        key = f"img{i:05d}"
        truth[key], objects = ground_truth(rng)
        tags[key] = sorted({cid for _, cid in objects})
        for name, err in ERRORS.items():
            maps[name][key] = simulate(objects, err, rng)
    for name in ERRORS:
        store = Store.open(str(out / name))
        model = {"simulated": name}
        run = types.run_fingerprint(Config().fingerprint(), model, types.manifest_fingerprint([{"seed": seed}]))
        commit.write_run(store, run, Config().to_dict(), model, overwrite=True)
        keys = sorted(truth)
        for start in range(0, len(keys), SHARD):
            part = keys[start : start + SHARD]
            results = [_result(k, maps[name][k], tags[k]) for k in part]
            commit.write_shard(store, types.shard_id_for(start // SHARD, part), results, [], CATS, run.digest)
    return truth


def score(prefix: Path, truth: dict[str, np.ndarray]) -> dict[str, float]:
    run = audit.open_run(str(prefix))
    result = audit.Audit(tuple(c["id"] for c in CATS))
    for labels in run.shards.values():
        for key in labels.image_ids():
            result.add(key, truth[key], labels.read(key))
    return audit.summary(result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="scratch folder (emptied first)")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    truth = write_runs(out, args.images, args.seed)
    outputs = {name: out / name for name in ERRORS}
    for combo in ("AB", "AC", "BC", "ABC"):
        inputs = consensus.open_inputs([str(out / n) for n in combo])
        consensus.write_consensus(inputs, Store.open(str(out / f"consensus-{combo}")))
        outputs[f"consensus {'+'.join(combo)}"] = out / f"consensus-{combo}"
    print(f"{args.images} synthetic images {SIZE[0]}x{SIZE[1]}, seed {args.seed}; errors: "
          + "; ".join(f"{k} {v}" for k, v in ERRORS.items()))  # fmt: skip
    print(f"{'output':<16}{'ignored':>9}{'labelled_acc':>14}{'pixel_acc':>11}{'miou':>8}")
    for name, prefix in outputs.items():
        s = score(prefix, truth)
        print(f"{name:<16}{s['ignored_fraction']:>9.4f}{s['labelled_accuracy']:>14.4f}{s['pixel_accuracy']:>11.4f}"
              f"{s['miou']:>8.4f}")  # fmt: skip
    return 0

