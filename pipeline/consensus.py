"""Consensus labels of several runs: a pixel keeps the class every run gives it and becomes 255
(ignore) where the runs disagree or any run marks it 255, so a trainer can learn from the agreed
pixels only. Written like a run, through ``commit.write_shard`` and ``merge``: label PNGs,
COCO annotations, ``stats_images`` / ``stats_classes``, commit markers and ``merged/``.

Inputs are read through ``compare.open_images`` (each run's shards committed under its
``run.json`` fingerprint; every input needs its ``run.json``). Images pair by manifest id.

- Shards mirror run A's (the first input's) committed shards: same shard ids, same images (those
  A labelled and those A failed), same label file names and COCO ``file_name``. Images only
  other runs recorded are not in the consensus; they are counted (``not_in_a``) and logged.
- An image some input failed or lacks is a failed row (status ``input_failed`` or
  ``input_missing``, the error naming the run); maps of different sizes, or an image a run
  recorded no candidate classes for, are ``input_mismatch`` rows. Nothing is dropped silently.
- Categories: the ids every input has; an id the inputs name differently raises ValueError.
- What a consensus image fills in (``LabelResult``): ``class_ids`` are the candidate classes
  every input's ``stats_classes`` lists for the image; ``coarse_scores`` / ``final_scores`` are
  the mean over the inputs of their ``coarse_score`` / ``class_score`` (so a COCO annotation's
  ``score`` is the inputs' mean class score); ``decision`` holds, per class, the share of inputs
  giving the pixel that class (1 inside a consensus mask, by construction); there are no coarse
  or compensated maps and no superpixels, so those statistics are null; no timings.
- ``run.json``: the fingerprint's config part hashes the rule and the inputs' run fingerprints
  in order, its model part the inputs' model parts, its manifest part is run A's; the record's
  ``config`` is run A's (the schema asks for one; A sets the layout), ``model`` lists the inputs.
  Resume: rerun the same command; committed shards are skipped. Inputs that change (another
  fingerprint) make ``write_run`` refuse the prefix unless ``overwrite``. An input run that was
  still running when a consensus shard was committed: its missing images stay ``input_missing``
  rows until the consensus is rerun with ``overwrite``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.compare import RunImages, open_images
from pipeline.storage import commit, layout
from pipeline.storage.merge import merge
from pipeline.storage.store import Store
from pipeline.types import IGNORE, Failure, ImageName, LabelResult, RunFingerprint, id_name, safe_name

log = logging.getLogger(__name__)

RULE = "unanimous-v1"  # changing how pixels are combined must change the fingerprint
INPUT_FAILED, INPUT_MISSING, INPUT_MISMATCH = "input_failed", "input_missing", "input_mismatch"


def consensus_map(maps: Sequence[np.ndarray]) -> np.ndarray:
    """[H, W] uint8 label maps of the same image -> [H, W] uint8: the shared value where every map
    holds the same id, ``IGNORE`` (255) elsewhere (a 255 in any map stays 255)."""
    if len(maps) < 2:
        raise ValueError(f"a consensus needs at least two label maps, got {len(maps)}")
    first = maps[0]
    for m in maps:
        if not isinstance(m, np.ndarray) or m.ndim != 2 or m.dtype != np.uint8 or m.shape != first.shape:
            raise ValueError("consensus label maps must be [H, W] uint8 arrays of one size")
    agree = np.ones(first.shape, dtype=bool)
    for m in maps[1:]:
        agree &= m == first
    return np.where(agree, first, np.uint8(IGNORE)).astype(np.uint8)


def shared_categories(runs: Sequence[RunImages]) -> list[dict[str, Any]]:
    """The categories (``{"id", "name"}``, sorted by id) every run has; raises ValueError when an
    id is named differently by two runs."""
    names = [{int(c["id"]): str(c["name"]) for c in r.categories} for r in runs]
    ids = sorted(set.intersection(*(set(n) for n in names)))
    renamed = [f"{i} ({', '.join(repr(n[i]) for n in names)})" for i in ids if len({n[i] for n in names}) > 1]
    if renamed:
        raise ValueError(f"the runs name category ids differently: {'; '.join(renamed[:5])}; a consensus needs "
                         "runs labelled with the same categories")  # fmt: skip
    return [{"id": i, "name": names[0][i]} for i in ids]


# --- fingerprint and run.json -----------------------------------------------------------------


def _sha(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Inputs:
    """The input runs (A first) and their ``run.json`` records."""

    runs: list[RunImages]
    records: list[dict[str, Any]]
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # never written anywhere

    def fingerprint(self) -> RunFingerprint:
        config = _sha({"rule": RULE, "inputs": [r["fingerprint"] for r in self.records]})
        model = _sha([r["parts"]["model"] for r in self.records])
        return RunFingerprint(config, model, self.records[0]["parts"]["manifest"])

    def model_doc(self) -> dict[str, Any]:
        inputs = [{"url": s.url, "fingerprint": r["fingerprint"]}
                  for s, r in zip(self.stores, self.records, strict=True)]  # fmt: skip
        return {"consensus": {"rule": RULE, "inputs": inputs}}

    @property
    def stores(self) -> list[Store]:
        return [Store.open(r.url, **self.storage_options) for r in self.runs]


def open_inputs(urls: Sequence[str], **storage_options: Any) -> Inputs:
    """Open the input runs; each needs a ``run.json`` (its fingerprint goes into ours)."""
    if len(urls) < 2:
        raise ValueError(f"a consensus needs at least two runs, got {len(urls)}")
    runs, records = [], []
    for url in urls:
        record = commit.read_run(Store.open(url, **storage_options))
        if record is None:
            raise ValueError(f"{url} has no {layout.RUN_FILE}: a consensus only reads runs it can fingerprint")
        runs.append(open_images(url, **storage_options))
        records.append(record)
    return Inputs(runs, records, dict(storage_options))


# --- one image --------------------------------------------------------------------------------


class ClassScores:
    """Each run's ``stats_classes`` rows by image: {category id: (coarse_score, class_score)}.
    A shard's table is read the first time one of its images is asked for."""

    def __init__(self, run: RunImages, **storage_options: Any) -> None:
        self.run, self.store = run, Store.open(run.url, **storage_options)
        self._by_image: dict[str, dict[int, tuple[float, float]]] = {}
        self._read: set[str] = set()

    def get(self, image_id: str) -> dict[int, tuple[float, float]]:
        shard_id = self.run.where[image_id]
        if shard_id not in self._read:
            self._read.add(shard_id)
            data = self.store.read(layout.table_file(shard_id, "stats_classes"))
            rows = [] if data is None else pq.read_table(io.BytesIO(data)).to_pylist()
            for r in rows:
                self._by_image.setdefault(r["image_id"], {})[r["category_id"]] = (r["coarse_score"], r["class_score"])
        return self._by_image.get(image_id, {})


def _result(image_id: str, label_map: np.ndarray, maps: Sequence[np.ndarray],
            scores: Sequence[Mapping[int, tuple[float, float]]]) -> LabelResult:  # fmt: skip
    """The consensus ``LabelResult`` of one image (see the module docstring for each field)."""
    ids = tuple(sorted(set.intersection(*(set(s) for s in scores))))
    coarse = np.array([np.mean([s[c][0] for s in scores]) for c in ids], dtype=np.float32)
    final = np.array([np.mean([s[c][1] for s in scores]) for c in ids], dtype=np.float32)
    votes = np.stack([np.mean([m == c for m in maps], axis=0) for c in ids]).astype(np.float32) if ids else (
        np.zeros((0, *label_map.shape), np.float32))  # fmt: skip
    empty = np.zeros((0, 1, 1), np.float32)
    return LabelResult(image_id, label_map, ids, empty, empty, coarse, final, ids, votes, None, {})


def image_consensus(image_id: str, runs: Sequence[RunImages], scores: Sequence[ClassScores]) -> Any:
    """The consensus ``LabelResult`` of one image, or the ``Failure`` that says why there is none."""
    for k, run in enumerate(runs):
        if image_id in run.failed:
            return Failure(image_id, INPUT_FAILED, f"run {k + 1} ({run.url}) failed this image: {run.failed[image_id]}")
        if image_id not in run.where:
            return Failure(image_id, INPUT_MISSING, f"run {k + 1} ({run.url}) has no committed label map of it")
    maps = [run.read(image_id) for run in runs]
    sizes = {m.shape for m in maps}
    if len(sizes) > 1:
        return Failure(image_id, INPUT_MISMATCH, f"the runs' label maps differ in size: {sorted(sizes)}")
    per_run = [s.get(image_id) for s in scores]
    label_map = consensus_map(maps)
    present = set(np.unique(label_map).tolist()) - {0, IGNORE}
    lacking = [k + 1 for k, s in enumerate(per_run) if not present <= set(s)]
    if lacking:
        return Failure(image_id, INPUT_MISMATCH, f"runs {lacking} record no class scores (stats_classes) for "
                       f"classes {sorted(present)} of this image")  # fmt: skip
    return _result(image_id, label_map, maps, per_run)


# --- shards -----------------------------------------------------------------------------------


def _names(run: RunImages, image_ids: Sequence[str]) -> dict[str, ImageName]:
    """Run A's names of its images: label stem from its stats' ``label_file``, COCO ``file_name``."""
    label_files = {}
    if run.run.stats is not None:
        for r in run.run.stats.select(["image_id", "label_file"]).to_pylist():
            if r["label_file"]:
                label_files[r["image_id"]] = layout.label_name(r["label_file"])
    names = {}
    for key in image_ids:
        if key in run.where:
            file_name = str(run.labels(key).image(key)["file_name"])
            names[key] = ImageName(label_files.get(key, safe_name(key)), file_name)
        else:
            names[key] = ImageName(id_name(key), key)
    return names


def shard_images(run: RunImages) -> dict[str, list[str]]:
    """Run A's committed shards: shard id -> its image ids (labelled and failed), sorted."""
    shards: dict[str, set[str]] = {sid: set(labels.image_ids()) for sid, labels in run.run.shards.items()}
    if run.run.stats is not None:
        for r in run.run.stats.select(["shard_id", "image_id"]).to_pylist():
            if r["shard_id"] in shards:
                shards[r["shard_id"]].add(r["image_id"])
    return {sid: sorted(ids) for sid, ids in sorted(shards.items())}


def write_consensus(inputs: Inputs, out: Store, overwrite: bool = False) -> dict[str, Any]:
    """Write (or finish) the consensus of ``inputs`` under ``out``: ``run.json``, one shard per
    shard of run A (committed ones skipped), then ``merged/``. Returns {"written", "skipped",
    "merged", "not_in_a"}: the shard ids written and skipped, ``merge``'s summary, and how
    many images other runs recorded that run A did not (a consensus holds run A's images only)."""
    if any(s.url == out.url for s in inputs.stores):
        raise ValueError(f"--out {out.url} is one of the input runs; write the consensus under a new prefix")
    categories = shared_categories(inputs.runs)
    run = inputs.fingerprint()
    commit.write_run(out, run, inputs.records[0]["config"], inputs.model_doc(), overwrite)
    scores = [ClassScores(r, **inputs.storage_options) for r in inputs.runs]
    written, skipped = [], []
    shards = shard_images(inputs.runs[0])
    for shard_id, image_ids in shards.items():
        if commit.is_committed(out, shard_id, run.digest):
            skipped.append(shard_id)
            continue
        items = [image_consensus(key, inputs.runs, scores) for key in image_ids]
        results = [x for x in items if not isinstance(x, Failure)]
        failures = [x for x in items if isinstance(x, Failure)]
        commit.write_shard(out, shard_id, results, failures, categories, run.digest,
                            _names(inputs.runs[0], image_ids))  # fmt: skip
        written.append(shard_id)
    merged = merge(out, list(shards), run.digest)
    in_a = {key for ids in shards.values() for key in ids}
    not_in_a = len({key for r in inputs.runs[1:] for key in r.image_ids()} - in_a)
    if not_in_a:
        log.warning("%d image(s) of the other runs are not in run A's committed shards: not in the consensus", not_in_a)
    return {"written": written, "skipped": skipped, "merged": merged, "not_in_a": not_in_a}
