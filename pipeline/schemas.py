"""Versioned data schemas: JSON Schema for JSON documents, Arrow schemas for the Parquet tables.

The JSON Schema files live in ``schemas/`` at the repository root (one file per document kind,
the version in the file name and in each schema's ``$id``). Arrow schemas are defined here, with
their version in the schema metadata, so the Parquet files say which layout they follow.

    manifest_record.v1   one JSONL manifest line: id, uri, tags, optional width/height/file_name/ground_truth
    config.v1            Config.to_dict()
    run.v1               <prefix>/run.json: fingerprint, config, model fingerprint
    commit_marker.v1     <prefix>/shards/<shard>/_COMMITTED.json
    STATS_IMAGES, STATS_CLASSES, TIMINGS   the Parquet tables (see pipeline/stats.py)
    STATS_IMAGES_DISCOVERY   stats_images of a run with discovery on: two more columns
    SUGGESTIONS, MISSING_TAGS   discovery's per-shard suggestions and the run's untagged classes
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow as pa
from referencing import Registry, Resource

from pipeline.types import MAX_CLASS_ID

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
JSON_SCHEMAS = {
    "manifest_record": "manifest_record.v1.schema.json",
    "config": "config.v1.schema.json",
    "run": "run.v1.schema.json",
    "commit_marker": "commit_marker.v1.schema.json",
}
MARKER_SCHEMA_ID = "tag2mask/commit-marker/v1"
RUN_SCHEMA_ID = "tag2mask/run/v1"


@functools.cache
def _registry() -> Registry:
    resources = []
    for file in JSON_SCHEMAS.values():
        doc = json.loads((SCHEMA_DIR / file).read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


@functools.cache
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    if kind not in JSON_SCHEMAS:
        raise ValueError(f"unknown schema {kind!r}; choose one of {sorted(JSON_SCHEMAS)}")
    doc = json.loads((SCHEMA_DIR / JSON_SCHEMAS[kind]).read_text())
    return jsonschema.Draft202012Validator(doc, registry=_registry())


def _field(error: jsonschema.ValidationError) -> str:
    """The offending field as a JSON path ("tags/1"); for a missing field, that field's name."""
    path = "/".join(str(p) for p in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, Mapping):
        missing = [k for k in error.validator_value if k not in error.instance]
        path = "/".join([path, missing[0]]) if path else missing[0]
    return path or "(whole document)"


def errors(kind: str, doc: Any) -> list[str]:
    """Every violation of schema ``kind`` in ``doc``, as "field 'x': message" strings, sorted."""
    found = sorted(_validator(kind).iter_errors(doc), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"field {_field(e)!r}: {_message(e)}" for e in found]


def _message(error: jsonschema.ValidationError) -> str:
    """The error's message; for a failed oneOf/anyOf, what each alternative said."""
    if error.validator in ("oneOf", "anyOf") and error.context:
        return f"{error.instance!r} is none of the allowed forms ({'; '.join(e.message for e in error.context)})"
    return error.message


# The fields manifest_record.v1 allows (also manifest.py's fast path).
RECORD_KEYS = frozenset({"id", "uri", "tags", "width", "height", "file_name", "ground_truth"})
_RECORD_STRINGS = ("uri", "file_name", "ground_truth")


def _valid_manifest_record(doc: Any) -> bool:
    """True only for a record ``manifest_record.v1`` accepts, checked in plain Python (a few
    microseconds, against ~0.3 ms for the validator). False sends the record to the validator,
    which finds and words the problems; so anything unusual (a float 3.0 tag, which the schema
    takes as an integer) may be False."""
    if type(doc) is not dict or not doc.keys() <= RECORD_KEYS:
        return False
    rid, tags = doc.get("id"), doc.get("tags")
    if type(rid) is not str or not 1 <= len(rid) <= 1024 or type(tags) is not list or "uri" not in doc:
        return False
    for key in _RECORD_STRINGS:
        value = doc.get(key, "-")
        if type(value) is not str or not value:
            return False
    for key in ("width", "height"):
        value = doc.get(key, 1)
        if type(value) is not int or value < 1:
            return False
    for tag in tags:
        if not ((type(tag) is int and 1 <= tag <= MAX_CLASS_ID) or (type(tag) is str and tag)):
            return False
    return len(set(tags)) == len(tags)  # uniqueItems (ints and strings never compare equal)


# Fast paths that say "valid" without the validator; a document they do not accept is validated
# in full, so the messages are the validator's.
_PLAIN_CHECKS = {"manifest_record": _valid_manifest_record}


def validate(kind: str, doc: Any, where: str) -> None:
    """Raise ValueError naming ``where`` (e.g. the file) and the first offending field."""
    plain = _PLAIN_CHECKS.get(kind)
    if plain is not None and plain(doc):
        return
    problems = errors(kind, doc)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{where} does not match schema {JSON_SCHEMAS[kind]}: {problems[0]}{more}")


def validate_manifest(records: Iterable[Any]) -> None:
    """Check every manifest record and that ids are unique.

    Raises ValueError naming the record (0-based line number and id) and the field.
    """
    seen: dict[Any, int] = {}
    for i, record in enumerate(records):
        rid = record.get("id") if isinstance(record, Mapping) else None
        validate("manifest_record", record, f"manifest record {i} (id {rid!r})")
        if rid in seen:
            raise ValueError(
                f"manifest record {i} (id {rid!r}): field 'id' repeats record {seen[rid]}; ids must be unique"
            )
        seen[rid] = i


def _arrow(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"tag2mask.schema": f"tag2mask/{name}/v1"})


STATS_IMAGES = _arrow("stats-images", [
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # "ok", or the failure kind
    pa.field("error", pa.string()),  # message of a failed image
    pa.field("label_file", pa.string()),  # PNG path relative to the output prefix
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("n_candidates", pa.int32()),
    pa.field("n_kept", pa.int32()),
    pa.field("background_fraction", pa.float64()),
    pa.field("ignore_fraction", pa.float64()),
    pa.field("coarse_refined_agreement", pa.float64()),
    pa.field("superpixel_purity", pa.float64()),
    pa.field("n_superpixels", pa.int32()),
])  # fmt: skip

STATS_CLASSES = _arrow("stats-classes", [
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("category_id", pa.int32(), nullable=False),
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("pixel_area", pa.int64(), nullable=False),
    pa.field("pixel_fraction", pa.float64(), nullable=False),
    pa.field("coarse_score", pa.float64(), nullable=False),
    pa.field("class_score", pa.float64(), nullable=False),
    pa.field("win_score_mean", pa.float64()),  # decision score inside the class's mask
    pa.field("win_score_std", pa.float64()),
])  # fmt: skip

TIMINGS = _arrow("timings", [
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("seconds", pa.float64(), nullable=False),
])  # fmt: skip

# Discovery on (docs/DISCOVERY.md): only then, so runs without it keep their bytes.
STATS_IMAGES_DISCOVERY = _arrow("stats-images-discovery", [
    *STATS_IMAGES,
    pa.field("unknown_fraction", pa.float64()),  # ViT-grid fraction inside discovered regions
    pa.field("n_unknown_regions", pa.int32()),
])  # fmt: skip

SUGGESTIONS = _arrow("suggestions", [
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("region", pa.int32(), nullable=False),  # id in the region map, 1..R
    pa.field("suggested_class", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),  # softmax over the vocabulary
    pa.field("area", pa.float64(), nullable=False),  # fraction of the ViT grid
    pa.field("coherence", pa.float64(), nullable=False),
])  # fmt: skip

MISSING_TAGS = _arrow("missing-tags", [
    pa.field("suggested_class", pa.string(), nullable=False),
    pa.field("regions", pa.int64(), nullable=False),
    pa.field("mean_score", pa.float64(), nullable=False),
])  # fmt: skip

ARROW_SCHEMAS = {"stats_images": STATS_IMAGES, "stats_classes": STATS_CLASSES, "timings": TIMINGS,
                 "stats_images_discovery": STATS_IMAGES_DISCOVERY, "suggestions": SUGGESTIONS,
                 "missing_tags": MISSING_TAGS}  # fmt: skip
# Tables whose file name holds one of several schemas (the variant is the run's choice).
VARIANTS = {"stats_images": ("stats_images", "stats_images_discovery")}


def check_table(name: str, table: pa.Table) -> None:
    """Raise ValueError unless ``table`` has exactly the Arrow schema ``name``, or one of its
    ``VARIANTS`` (fields and types)."""
    schema = table.schema.remove_metadata()
    if not any(schema.equals(ARROW_SCHEMAS[v].remove_metadata()) for v in VARIANTS.get(name, (name,))):
        raise ValueError(f"table {name} does not match its schema:\nexpected {ARROW_SCHEMAS[name]}\ngot {table.schema}")
