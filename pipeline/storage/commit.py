"""What a run has committed: the run record (``run.json``) and each shard's commit marker.

Commit protocol: object stores have no atomic rename, so only the marker counts. It holds the
shard's counts, the sha256 and size of every deterministic file it wrote (label PNGs included)
and the run's fingerprint. A shard without a marker, or with another run's fingerprint, is not
done: ``write_shard`` deletes its marker and stale files first and rewrites it from scratch,
writing the marker last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pipeline import discovery, schemas
from pipeline.config import identity_of
from pipeline.stats import ImageEntry
from pipeline.storage import layout, outputs
from pipeline.storage.store import Store
from pipeline.types import Failure, ImageName, LabelResult, RunFingerprint, sha256_hex

log = logging.getLogger(__name__)


def write_run(store: Store, run: RunFingerprint, config: Mapping[str, Any], model: Mapping[str, Any],
              overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write ``run.json`` (config = ``Config.to_dict()``, model = ``model_fingerprint``). An existing
    record with another fingerprint raises ValueError unless ``overwrite``; its shards then redo."""
    doc = {"schema": schemas.RUN_SCHEMA_ID, "fingerprint": run.digest,
           "parts": {"config": run.config, "model": run.model, "manifest": run.manifest},
           "config": dict(config), "model": dict(model)}  # fmt: skip
    schemas.validate("run", doc, "run record")
    old = read_run(store)
    if old is not None and old["fingerprint"] != run.digest and not overwrite:
        changed = [name for name, digest in doc["parts"].items() if old["parts"].get(name) != digest]
        detail = _config_change(old.get("config", {}), config) if "config" in changed else ""
        raise ValueError(
            f"{store.path(layout.RUN_FILE)} belongs to another run: the {' and the '.join(changed)} changed{detail} "
            f"(fingerprint {old['fingerprint'][:12]}, this run {run.digest[:12]}). Use a new output "
            f"prefix, or --overwrite to redo every shard"
        )
    store.write_many({layout.RUN_FILE: json.dumps(doc, indent=1, sort_keys=True).encode()})
    return doc


def _config_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What made two stored configs' fingerprints differ, as `` (settings: ...)``. Only settings in
    the identity count (device and the like are not named). The content of a discovery vocabulary
    file enters the fingerprint but run.json keeps only its path, so an edited file, or a run.json
    of an older version that fingerprinted otherwise, changes no stored setting: said so."""
    keys = _changed_keys(identity_of(old), identity_of(new))
    keys.sort(key=lambda k: not k.startswith("method "))  # another method changes many settings: it first
    if keys:
        return f" (settings: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})"
    found = new.get("discovery") or {}
    vocabulary = found.get("vocabulary")
    if found.get("enabled") and vocabulary not in discovery.BUILTIN_VOCABULARIES:
        return (f" (no stored setting: the content of the discovery vocabulary file {vocabulary}, which "
                "the fingerprint holds by sha256, or a run.json written by an older version)")  # fmt: skip
    return " (no stored setting: a run.json written by an older version that fingerprinted configs otherwise)"


def _changed_keys(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted names of the settings that differ between two stored configs, with both values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{where}.{key}" if where else key)]  # fmt: skip
    return [] if old == new else [f"{where} {json.dumps(old)} -> {json.dumps(new)}"]


def read_run(store: Store) -> dict[str, Any] | None:
    data = store.read(layout.RUN_FILE)
    if data is None:
        return None
    doc = json.loads(data)
    schemas.validate("run", doc, store.path(layout.RUN_FILE))
    return doc


def marker_doc(shard_id: str, built: outputs.ShardFiles, fingerprint: str) -> dict[str, Any]:
    """The commit marker of a built shard (no wall-clock values, so it is deterministic too)."""
    doc = {
        "schema": schemas.MARKER_SCHEMA_ID, "shard_id": shard_id, "fingerprint": fingerprint,
        "counts": built.counts,
        "files": {rel: {"sha256": sha256_hex(data), "bytes": len(data)} for rel, data in sorted(built.files.items())},
        "volatile_files": sorted(built.volatile),
    }  # fmt: skip
    schemas.validate("commit_marker", doc, f"commit marker of shard {shard_id}")
    return doc


def write_shard(store: Store, shard_id: str, results: Sequence[LabelResult | ImageEntry],
                failures: Sequence[Failure | tuple[str, str, str]], categories: Sequence[Any],
                fingerprint: str, names: Mapping[str, ImageName] | None = None,
                formats: Iterable[str] = outputs.DEFAULT_FORMATS,
                discovery: bool = False) -> dict[str, Any]:  # fmt: skip
    """Write one shard from scratch and commit it; returns the marker.

    results: labelled images; failures: ``Failure`` or ``(image_id, status, error)`` for images
    that produced no label map; categories: ``types.Category`` objects or COCO category dicts;
    fingerprint: ``RunFingerprint.digest``; names: ``ImageName`` by image id (``Shard.names``),
    labels named by id without; formats: the writers to run (``outputs.WRITERS``; merge refuses a
    shard without ``merge.MERGE_FORMATS``); discovery: the run's ``discovery.enabled`` (its stats
    columns, region and suggestion files). Order: old marker and stale files deleted, files
    written, marker written last.
    """
    built = outputs.build_shard(shard_id, results, failures, categories, fingerprint, names, formats, discovery)
    marker = marker_doc(shard_id, built, fingerprint)
    failed = outputs.failure_ids(failures)
    store.remove_files([layout.marker_file(shard_id)])
    store.remove_tree(layout.shard_dir(shard_id))
    failed_names = outputs.names_for(failed, names)
    store.remove_files(layout.label_file(failed_names[i].label) for i in failed)
    store.write_many({**built.files, **built.volatile})
    store.write_many({layout.marker_file(shard_id): json.dumps(marker, indent=1).encode()})
    log.info("shard %s committed: %s", shard_id, built.counts)
    return marker


def read_marker(store: Store, shard_id: str) -> dict[str, Any] | None:
    """The shard's commit marker, or None when there is none or it is unreadable (not committed)."""
    data = store.read(layout.marker_file(shard_id))
    if data is None:
        return None
    try:
        doc = json.loads(data)
        schemas.validate("commit_marker", doc, f"commit marker of shard {shard_id}")
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        log.warning("shard %s: ignoring a broken commit marker (%s)", shard_id, err)
        return None
    return doc


def is_committed(store: Store, shard_id: str, fingerprint: str) -> bool:
    """True when the shard has a valid marker written by a run with this fingerprint."""
    marker = read_marker(store, shard_id)
    return marker is not None and marker["fingerprint"] == fingerprint and marker["shard_id"] == shard_id


def verify_shard(store: Store, shard_id: str) -> list[str]:
    """Every way the shard's files differ from its marker (missing, other size, other sha256);
    empty when the marker's promise holds. Reads every file, so it is an audit, not a resume step."""
    marker = read_marker(store, shard_id)
    if marker is None:
        return [f"shard {shard_id} has no valid commit marker"]
    problems = []
    for rel, expected in sorted(marker["files"].items()):
        data = store.read(rel)
        if data is None:
            problems.append(f"{rel}: missing")
        elif (len(data), sha256_hex(data)) != (expected["bytes"], expected["sha256"]):
            problems.append(f"{rel}: {len(data)} bytes, sha256 {sha256_hex(data)[:12]}; marker says "
                            f"{expected['bytes']} bytes, {expected['sha256'][:12]}")  # fmt: skip
    return problems
