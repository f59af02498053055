"""Merge: every committed shard of a run into ``merged/`` (one COCO file, one Parquet dataset
per table), each file checked against its shard's marker; ``merged/_MERGED.json`` last.
With discovery, also the regions' COCO file, the suggestions and the run's missing tags
(``merged/missing_tags.parquet``: classes most often suggested but never tagged).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import coco, discovery, schemas, stats
from pipeline.storage import commit, layout, outputs
from pipeline.storage.store import Store
from pipeline.types import sha256_hex

FILE_ROWS = 8 * stats.ROW_GROUP_ROWS  # rows per file of a merged Parquet dataset


# What merge reads from every shard, by the output format (``outputs.WRITERS``) that writes it.
MERGE_FORMATS = ("coco", "stats")


def _merge_files(shard_id: str) -> dict[str, list[str]]:
    """The deterministic files of each of ``MERGE_FORMATS`` that merge reads from a shard."""
    return {"coco": [layout.shard_file(shard_id, layout.ANNOTATIONS)],
            "stats": [layout.table_file(shard_id, name) for name in outputs.TABLES]}  # fmt: skip


def _check_formats(store: Store, marker: Mapping[str, Any]) -> None:
    """ValueError naming the formats a shard was written without (``write_shard(formats=...)``):
    its marker then lists none of their files, and merge cannot read them."""
    sid = marker["shard_id"]
    missing = {fmt: rels for fmt, rels in _merge_files(sid).items() if any(r not in marker["files"] for r in rels)}
    if missing:
        raise ValueError(f"shard {sid} was written without the {' and '.join(map(repr, missing))} output format(s) "
                         f"(its commit marker {store.path(layout.marker_file(sid))} lists no "
                         f"{', '.join(r for rels in missing.values() for r in rels)}); merge reads "
                         f"{' and '.join(MERGE_FORMATS)} from every shard: write the shard with the default formats "
                         "to merge it")  # fmt: skip


def _read_checked(store: Store, rel: str, marker: Mapping[str, Any]) -> bytes:
    expected = marker["files"].get(rel)
    if expected is None:
        raise ValueError(f"{store.path(rel)} is not among the files of its shard's commit marker: the shard was "
                         "written without it")  # fmt: skip
    data = store.read(rel)
    if data is None or sha256_hex(data) != expected["sha256"]:
        found = "is missing" if data is None else "does not match the sha256 in its shard's commit marker"
        raise ValueError(f"{store.path(rel)} {found}; delete the shard's {layout.MARKER} to redo it")
    return data


def _committed_markers(store: Store, shard_ids: Sequence[str], fingerprint: str) -> list[dict[str, Any]]:
    markers = []
    for shard_id in sorted(shard_ids):
        marker = commit.read_marker(store, shard_id)
        if marker is None or marker["fingerprint"] != fingerprint:
            raise ValueError(f"shard {shard_id} is not committed by this run (fingerprint {fingerprint[:12]}); "
                             "run it before merging")  # fmt: skip
        _check_formats(store, marker)
        markers.append(marker)
    return markers


def _parquet_parts(tables: Iterable[pa.Table], file_rows: int) -> Iterator[pa.Table]:
    """Regroup a stream of tables into tables of ``file_rows`` rows (the last one shorter)."""
    buffer: list[pa.Table] = []
    rows = 0
    for table in tables:
        buffer.append(table)
        rows += table.num_rows
        while rows >= file_rows:
            whole = pa.concat_tables(buffer)
            yield whole.slice(0, file_rows)
            buffer, rows = [whole.slice(file_rows)], rows - file_rows
    if rows:
        yield pa.concat_tables(buffer)


def _merge_table(store: Store, name: str, markers: Sequence[Mapping[str, Any]], file_rows: int,
                 each: Callable[[pa.Table], None] | None = None) -> dict[str, int]:  # fmt: skip
    """Write ``merged/<name>/part-NNNNN.parquet`` from every shard's table, in shard order (one
    empty file when no shard has a row). ``each`` sees every shard's table as it is read, so a
    caller that needs the tables too reads and checks each file once."""

    def tables() -> Iterator[pa.Table]:
        for marker in markers:
            rel = layout.table_file(marker["shard_id"], name)
            data = store.read(rel) if name in outputs.VOLATILE_TABLES else _read_checked(store, rel, marker)
            if data is None:
                raise ValueError(f"{store.path(rel)} is missing although its shard is committed")
            table = pq.read_table(io.BytesIO(data))
            schemas.check_table(name, table)
            if each is not None:
                each(table)
            yield table

    store.remove_tree(layout.merged_table_dir(name))
    parts, rows = 0, 0
    for part in _parquet_parts(tables(), file_rows):
        store.write_many({layout.merged_part(name, parts): stats.parquet_bytes(part)})
        parts, rows = parts + 1, rows + part.num_rows
    if not parts:  # an empty table still tells readers the schema
        store.write_many({layout.merged_part(name, 0): stats.parquet_bytes(stats.to_table(name, []))})
        parts = 1
    return {"files": parts, "rows": rows}


def merge(store: Store, shard_ids: Sequence[str], fingerprint: str, file_rows: int = FILE_ROWS) -> dict[str, Any]:
    """Merge committed shards (in sorted shard-id order) into ``merged/``; returns the summary also
    written to ``merged/_MERGED.json`` (last). Raises ValueError if a shard is not committed by
    this run, was written without a format merge reads (``MERGE_FORMATS``), or a file is missing or
    does not match its marker's checksum."""
    if not shard_ids:
        raise ValueError("merge needs at least one shard id")
    markers = _committed_markers(store, shard_ids, fingerprint)
    store.remove_files([layout.MERGED_MARKER])
    docs = [json.loads(_read_checked(store, layout.shard_file(m["shard_id"], layout.ANNOTATIONS), m)) for m in markers]
    merged = coco.merge_coco(docs, {"description": "tag2mask pseudo-labels", "fingerprint": fingerprint})
    store.write_many({layout.MERGED_ANNOTATIONS: json.dumps(merged, separators=(",", ":")).encode()})
    tagged: set[int] = set()  # category ids of every shard's candidate classes, for discovery's missing tags
    note = (lambda t: tagged.update(t.column("category_id").to_pylist())) if any(map(_suggests, markers)) else None
    tables = {name: _merge_table(store, name, markers, file_rows, note if name == "stats_classes" else None)
              for name in outputs.TABLES + outputs.VOLATILE_TABLES}  # fmt: skip
    counts = {key: sum(m["counts"][key] for m in markers) for key in markers[0]["counts"]}
    summary = {"fingerprint": fingerprint, "shards": [m["shard_id"] for m in markers], "counts": counts,
               "tables": tables}  # fmt: skip
    found = _merge_discovery(store, markers, docs[0]["categories"], tagged, fingerprint, file_rows)
    tables.update(found.pop("tables", {}))
    summary.update(found)
    store.write_many({layout.MERGED_MARKER: json.dumps(summary, indent=1).encode()})
    return summary


MISSING_SHOWN = 10  # missing tags kept in the merge summary (the label job prints them)


def _has(marker: Mapping[str, Any], name: str) -> bool:
    return layout.shard_file(marker["shard_id"], name) in marker["files"]


def _suggests(marker: Mapping[str, Any]) -> bool:
    return _has(marker, f"{layout.SUGGESTIONS}.parquet")


def _merge_discovery(store: Store, markers: Sequence[Mapping[str, Any]], categories: Sequence[Mapping[str, Any]],
                     tagged_ids: Collection[int], fingerprint: str, file_rows: int) -> dict[str, Any]:  # fmt: skip
    """Discovery's merged files, when its shards wrote them (nothing otherwise): ``merged/
    regions.json``, ``merged/suggestions/``, ``merged/missing_tags.parquet``. ``tagged_ids``: the
    category ids in every shard's ``stats_classes`` (``merge`` collects them while merging that
    table). Returns the summary's ``missing_tags`` ([class, regions, mean score], most suggested
    first, at most ``MISSING_SHOWN``) and ``tables``."""
    out: dict[str, Any] = {}
    with_regions = [m for m in markers if _has(m, layout.REGIONS_COCO)]
    if with_regions:
        docs = [json.loads(_read_checked(store, layout.shard_file(m["shard_id"], layout.REGIONS_COCO), m))
                for m in with_regions]  # fmt: skip
        merged = coco.merge_coco(docs, {"description": "tag2mask discovered regions", "fingerprint": fingerprint})
        store.write_many({layout.MERGED_REGIONS: json.dumps(merged, separators=(",", ":")).encode()})
    suggesting = [m for m in markers if _suggests(m)]
    if not suggesting:
        return out
    read: list[pa.Table] = []  # the two columns run_suggestions counts, as each shard's file is read
    table = _merge_table(store, layout.SUGGESTIONS, suggesting, file_rows,
                         lambda t: read.append(t.select(["suggested_class", "score"])))  # fmt: skip
    names = {int(c["id"]): c["name"] for c in categories}
    tagged = {names[cid] for cid in tagged_ids if cid in names}
    missing = discovery.run_suggestions((t.to_pydict() for t in read), tagged)
    rows = [{"suggested_class": n, "regions": k, "mean_score": round(s, discovery.DIGITS)} for n, k, s in missing]
    store.write_many({layout.MERGED_MISSING_TAGS: stats.parquet_bytes(stats.to_table("missing_tags", rows))})
    out["tables"] = {layout.SUGGESTIONS: table}
    out["missing_tags"] = [[r["suggested_class"], r["regions"], r["mean_score"]] for r in rows[:MISSING_SHOWN]]
    return out
