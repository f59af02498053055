"""Queries over a run's stats for the review pages, in DuckDB over the Parquet files (scanned per
query, never loaded whole), so a 1M-image run costs the rows a page shows.

A gallery view is a ``GalleryQuery``: filters, ranges on numeric columns, a sort, a page. It
round-trips through URL parameters (``from_params`` / ``to_params``), so the URL holds the view.
Column names are checked against the tables' own columns before they reach SQL; values are
always bound parameters.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from pipeline.review.decisions import DECISIONS
from pipeline.review.run import ReviewRun

PAGE_SIZES = (24, 48, 96)
AUDIT_COLUMNS = ("miou", "miou_fg", "pixel_accuracy", "ignored_fraction")  # from the audit's images.parquet
CLASS_COLUMNS = ("class_score", "class_fraction")  # of the class picked in the filter
HIDDEN = {"shard_id", "image_id", "status", "error", "label_file"}
_NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "FLOAT", "DOUBLE", "DECIMAL", "HUGEINT")


@dataclass(frozen=True)
class GalleryQuery:
    """One gallery view. ``ranges``: column -> (low, high), either end None for open;
    ``category``: only images where this class has pixels; ``decision``: one of ``DECISIONS``,
    "none" (not reviewed yet) or None (any)."""

    status: str | None = None
    category: int | None = None
    decision: str | None = None
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()
    sort: str = "image_id"
    descending: bool = False
    page: int = 1
    per_page: int = PAGE_SIZES[0]

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> GalleryQuery:
        """From URL parameters (``status``, ``cat``, ``decision``, ``min_<col>``, ``max_<col>``,
        ``sort``, ``desc``, ``page``, ``per_page``); raises ValueError on values that are not numbers."""
        bounds: dict[str, list[float | None]] = {}
        for key, value in params.items():
            if key[:4] in ("min_", "max_") and value not in ("", None):
                bounds.setdefault(key[4:], [None, None])[key[:4] == "max_"] = _number(key, value)
        per_page = int(_number("per_page", params.get("per_page") or PAGE_SIZES[0]))
        return cls(
            status=params.get("status") or None,
            category=int(_number("cat", params["cat"])) if params.get("cat") else None,
            decision=params.get("decision") or None,
            ranges=tuple((col, lo, hi) for col, (lo, hi) in sorted(bounds.items())),
            sort=params.get("sort") or "image_id",
            descending=params.get("desc") in ("1", "true", "on"),
            page=max(1, int(_number("page", params.get("page") or 1))),
            per_page=per_page if per_page in PAGE_SIZES else PAGE_SIZES[0],
        )

    def to_params(self, **changes: Any) -> str:
        """The URL query string of this view (with ``changes`` applied, e.g. ``page=2``)."""
        q = replace(self, **changes) if changes else self
        params: dict[str, Any] = {}
        for key, value in (("status", q.status), ("cat", q.category), ("decision", q.decision)):
            if value is not None:
                params[key] = value
        for col, lo, hi in q.ranges:
            if lo is not None:
                params[f"min_{col}"] = lo
            if hi is not None:
                params[f"max_{col}"] = hi
        if q.sort != "image_id":
            params["sort"] = q.sort
        if q.descending:
            params["desc"] = 1
        if q.page != 1:
            params["page"] = q.page
        if q.per_page != PAGE_SIZES[0]:
            params["per_page"] = q.per_page
        return urlencode(params)

    def bound(self, column: str) -> tuple[float | None, float | None]:
        return next(((lo, hi) for col, lo, hi in self.ranges if col == column), (None, None))


def _number(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"URL parameter {key}={value!r} must be a number") from None


@dataclass
class Page:
    rows: list[dict[str, Any]]
    total: int
    query: GalleryQuery
    columns: list[str] = field(default_factory=list)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.query.per_page))


class RunIndex:
    """DuckDB views over one run: ``images`` (stats_images, plus the audit's per-image columns
    when an audit folder is given), ``classes`` (stats_classes) and ``decisions`` (the latest
    decision per image, replaced with ``set_decisions``). One connection, one query at a time."""

    def __init__(self, run: ReviewRun, audit: str | None = None) -> None:
        self.run = run
        self._lock = threading.Lock()
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET threads TO 2")
        paths = self._paths(run.images_files), self._paths(run.classes_files)
        self.con.execute(f"CREATE VIEW raw_images AS SELECT * FROM read_parquet({_list(paths[0])})")
        self.con.execute(f"CREATE VIEW classes AS SELECT * FROM read_parquet({_list(paths[1])})")
        self.audit_classes: list[dict[str, Any]] = []
        self._counts: dict[tuple[str, tuple[Any, ...]], int] = {}  # a view's size, until decisions change
        self.audit_key = self._attach_audit(audit) if audit else None
        self.set_decisions({})
        self.columns = self._numeric_columns()
        self.categories = {int(c["id"]): str(c["name"]) for c in run.categories}

    def _paths(self, files: Sequence[str]) -> list[str]:
        fs = self.run.store.fs
        if isinstance(fs, LocalFileSystem):  # local paths go to DuckDB as they are
            return list(files)
        if not self.con.filesystem_is_registered(fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]):
            self.con.register_filesystem(fs)
        return [fs.unstrip_protocol(f) for f in files]

    def _attach_audit(self, folder: str) -> str:
        """Join the audit's ``images.parquet`` on the key that pairs more images (manifest id or
        label file stem, as ``audit_masks.py --pred-key auto`` chose); keep its ``classes.parquet``."""
        import fsspec
        import pyarrow.parquet as pq

        fs, root = fsspec.core.url_to_fs(folder)
        root = root.rstrip("/")
        if not fs.exists(f"{root}/images.parquet"):
            raise ValueError(f"--audit {folder} holds no images.parquet; give the --out folder of audit_masks.py")
        with fs.open(f"{root}/images.parquet", "rb") as f:
            table = pq.read_table(f, columns=["image_id", "status", *AUDIT_COLUMNS])
        if fs.exists(f"{root}/classes.parquet"):
            with fs.open(f"{root}/classes.parquet", "rb") as f:
                self.audit_classes = pq.read_table(f).to_pylist()
        audit = table.filter(pc.equal(table["status"], "ok")).drop(["status"])
        self.con.register("audit_rows", audit)
        stem = "regexp_extract(label_file, '([^/]+)\\.png$', 1)"
        pairs = "SELECT count(*) AS n FROM raw_images r JOIN audit_rows a ON a.image_id = "
        keys = ("r.image_id", stem.replace("label_file", "r.label_file"))
        counts = {key: self._sql(pairs + key)[0]["n"] for key in keys}
        key = max(counts, key=lambda k: (counts[k], k == "r.image_id")).replace("r.", "i.")
        cols = ", ".join(f"a.{c} AS {c}" for c in AUDIT_COLUMNS if c != "ignored_fraction")
        self.con.execute(f"CREATE VIEW images AS SELECT i.*, {cols} FROM raw_images i "
                         f"LEFT JOIN audit_rows a ON a.image_id = {key}")  # fmt: skip
        return key

    def _images_view(self) -> None:
        self.con.execute("CREATE OR REPLACE VIEW images AS SELECT * FROM raw_images")

    def _numeric_columns(self) -> list[str]:
        if self.audit_key is None:
            self._images_view()
        described = self.con.execute("DESCRIBE images").fetchall()
        return [name for name, kind, *_ in described if name not in HIDDEN and kind.startswith(_NUMERIC)]

    def set_decisions(self, latest: Mapping[str, str]) -> None:
        """Replace the ``decisions`` view: image id -> its latest decision."""
        table = pa.table({"image_id": pa.array(list(latest), pa.string()),
                          "decision": pa.array(list(latest.values()), pa.string())})  # fmt: skip
        with self._lock:
            self.con.register("decisions", table)
            self._counts.clear()

    def _sql(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:  # one connection: registered Arrow tables are visible to it alone
            return self._locked_sql(sql, params)

    def _locked_sql(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """``_sql`` for a caller that holds ``_lock``."""
        result = self.con.execute(sql, list(params))
        names = [d[0] for d in result.description]
        return [dict(zip(names, row, strict=True)) for row in result.fetchall()]

    def _count(self, tail: str, params: Sequence[Any]) -> int:
        """How many images the view holds; cached until ``set_decisions``, counted and kept under
        the lock, so a count made before decisions changed is never kept after."""
        key = (tail, tuple(params))
        with self._lock:
            if key not in self._counts:  # the stats never change; decisions clear this
                self._counts[key] = self._locked_sql(f"SELECT count(*) AS n FROM images i{tail}", params)[0]["n"]
            return self._counts[key]

    # --- the gallery -----------------------------------------------------------------------

    def sortable(self, query: GalleryQuery) -> list[str]:
        """Columns the view can filter and sort on (class columns only with a class picked)."""
        return ["image_id", *self.columns, *(CLASS_COLUMNS if query.category is not None else ())]

    def _where(self, q: GalleryQuery) -> tuple[str, list[Any]]:
        allowed = set(self.sortable(q))
        if q.sort not in allowed:
            raise ValueError(f"cannot sort by {q.sort!r}; choose one of {sorted(allowed)}")
        joins, where, params = "", [], list[Any]()
        if q.category is not None:
            if q.category not in self.categories:
                raise ValueError(f"class {q.category} is not one of the run's categories {sorted(self.categories)}")
            joins += (" JOIN (SELECT image_id, class_score, pixel_fraction AS class_fraction FROM classes "
                      "WHERE category_id = ? AND pixel_area > 0) c ON c.image_id = i.image_id")  # fmt: skip
            params.append(q.category)
        joins += " LEFT JOIN decisions d ON d.image_id = i.image_id"
        if q.status:
            where.append("i.status = ?")
            params.append(q.status)
        if q.decision == "none":
            where.append("d.decision IS NULL")
        elif q.decision:
            if q.decision not in DECISIONS:
                raise ValueError(f"decision {q.decision!r} must be one of {[*DECISIONS, 'none']}")
            where.append("d.decision = ?")
            params.append(q.decision)
        for col, lo, hi in q.ranges:
            if col not in allowed or col == "image_id":
                raise ValueError(f"cannot filter on {col!r}; choose one of {sorted(allowed - {'image_id'})}")
            ref = f"c.{col}" if col in CLASS_COLUMNS else f"i.{col}"
            for op, value in ((">=", lo), ("<=", hi)):
                if value is not None:
                    where.append(f"{ref} {op} ?")
                    params.append(value)
        return joins + (" WHERE " + " AND ".join(where) if where else ""), params

    def _order(self, q: GalleryQuery) -> str:
        ref = f"c.{q.sort}" if q.sort in CLASS_COLUMNS else f"i.{q.sort}"
        return f"{ref} {'DESC' if q.descending else 'ASC'} NULLS LAST, i.image_id"

    def _select(self, q: GalleryQuery) -> str:
        """The columns a gallery card shows (fewer columns through the sort: faster pages)."""
        cols = ["i.image_id", "i.status", "d.decision"]
        if q.sort not in ("image_id", *CLASS_COLUMNS):
            cols.append(f"i.{q.sort}")
        if q.category is not None:
            cols += ["c.class_score", "c.class_fraction"]
        return f"SELECT {', '.join(cols)} FROM images i"

    def gallery(self, q: GalleryQuery) -> Page:
        """The rows of the view's page, in its order, and how many images the view holds."""
        tail, params = self._where(q)
        total = self._count(tail, params)
        rows = self._sql(f"{self._select(q)}{tail} ORDER BY {self._order(q)} LIMIT ? OFFSET ?",
                         [*params, q.per_page, (q.page - 1) * q.per_page])  # fmt: skip
        return Page(rows, total, q, self.sortable(q))

    def around(self, q: GalleryQuery, image_id: str, position: int | None) -> tuple[str | None, str | None, int | None]:
        """(previous id, next id, position of ``image_id``) in the view's order. ``position`` is a
        hint (the gallery passes each image's place): one query reads the three ids around it;
        only when the hint is stale is the place looked up with a window function."""
        tail, params = self._where(q)
        order = self._order(q)
        if position is not None and position >= 0:
            ids = self._window(tail, params, order, position)
            if ids[position - max(0, position - 1) : position - max(0, position - 1) + 1] == [image_id]:
                return self._neighbours(ids, position)
        found = self._sql(f"SELECT n FROM (SELECT i.image_id, row_number() OVER (ORDER BY {order}) - 1 AS n "
                          f"FROM images i{tail}) WHERE image_id = ?", [*params, image_id])  # fmt: skip
        if not found:
            return None, None, None
        position = int(found[0]["n"])
        return self._neighbours(self._window(tail, params, order, position), position)

    def _window(self, tail: str, params: list[Any], order: str, position: int) -> list[str]:
        """Ids at positions ``position - 1 .. position + 1`` of the view (fewer at its ends)."""
        start = max(0, position - 1)
        rows = self._sql(f"SELECT i.image_id FROM images i{tail} ORDER BY {order} LIMIT ? OFFSET ?",
                         [*params, position + 2 - start, start])  # fmt: skip
        return [r["image_id"] for r in rows]

    @staticmethod
    def _neighbours(ids: list[str], position: int) -> tuple[str | None, str | None, int]:
        at = position - max(0, position - 1)
        return (ids[at - 1] if at > 0 else None), (ids[at + 1] if len(ids) > at + 1 else None), position

    @functools.cached_property
    def _ranges(self) -> dict[str, tuple[float, float]]:
        return self.ranges()

    def slider_ranges(self) -> dict[str, tuple[float, float]]:
        """``ranges``, computed once (a run's stats do not change while it is reviewed)."""
        return self._ranges

    def ranges(self) -> dict[str, tuple[float, float]]:
        """(min, max) of each numeric column over the run, for the sliders (columns never null)."""
        if not self.columns:
            return {}
        parts = ", ".join(f'min({c}) AS "min_{c}", max({c}) AS "max_{c}"' for c in self.columns)
        row = self._sql(f"SELECT {parts} FROM images")[0]
        out = {c: (float(row[f"min_{c}"]), float(row[f"max_{c}"])) for c in self.columns if row[f"min_{c}"] is not None}
        out.update({"class_score": (0.0, 1.0), "class_fraction": (0.0, 1.0)})
        return out

    def statuses(self) -> list[dict[str, Any]]:
        return self._sql("SELECT status, count(*) AS n FROM images GROUP BY status ORDER BY status")

    # --- single images, classes, failures ---------------------------------------------------

    def image(self, image_id: str) -> dict[str, Any] | None:
        rows = self._sql("SELECT i.*, d.decision FROM images i LEFT JOIN decisions d ON d.image_id = i.image_id "
                         "WHERE i.image_id = ?", [image_id])  # fmt: skip
        return rows[0] if rows else None

    def image_classes(self, image_id: str) -> list[dict[str, Any]]:
        return self._sql("SELECT * FROM classes WHERE image_id = ? ORDER BY category_id", [image_id])

    def class_summary(self, bins: int = 10) -> list[dict[str, Any]]:
        """Per class: images tagged, images with pixels, share of all labelled pixels, mean class
        score and a ``bins``-bin histogram of class scores over [0, 1]."""
        rows = self._sql(
            "SELECT category_id, count(*) AS tagged, count(*) FILTER (WHERE pixel_area > 0) AS present, "
            "sum(pixel_area) AS pixels, avg(class_score) AS mean_score, "
            f"list(least(floor(class_score * {bins}), {bins - 1})::INTEGER) AS score_bins "
            "FROM classes GROUP BY category_id ORDER BY category_id"
        )
        total = self._sql("SELECT coalesce(sum(height::BIGINT * width), 0) AS n FROM images WHERE status = 'ok'")[0][
            "n"
        ]
        iou = {int(r["category_id"]): r.get("iou") for r in self.audit_classes}
        for row in rows:
            counts = [0] * bins
            for b in row.pop("score_bins"):
                counts[max(0, min(bins - 1, b))] += 1
            row.update(name=self.categories.get(row["category_id"], str(row["category_id"])), histogram=counts,
                       pixel_share=(row["pixels"] or 0) / total if total else None,
                       audit_iou=iou.get(int(row["category_id"])))  # fmt: skip
        return rows

    def failed(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        total = self._sql("SELECT count(*) AS n FROM images WHERE status <> 'ok'")[0]["n"]
        rows = self._sql("SELECT image_id, shard_id, status, error FROM images WHERE status <> 'ok' "
                         "ORDER BY status, image_id LIMIT ? OFFSET ?", [limit, offset])  # fmt: skip
        return rows, total

    def close(self) -> None:
        self.con.close()


def _list(paths: Sequence[str]) -> str:
    if not paths:
        raise ValueError("no Parquet files to read")
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"
