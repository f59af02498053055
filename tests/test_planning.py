"""Planning at scale without changing what it reports: the plain-Python fast path for manifest
records accepts only what the JSON Schema validator accepts (the validator still words every
problem), and the compact id set behaves as a set."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline import manifest, schemas
from pipeline.manifest import CompactStringSet, ManifestError, _BadJson, _Checker
from pipeline.types import Category

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0.0, 3.0, 2.5]),
                    st.text(max_size=3), st.lists(st.integers(0, 5), max_size=2), st.just({"a": 1}))  # fmt: skip
_TAGS = st.lists(st.one_of(st.integers(-1, 256), st.text(max_size=2), st.booleans(), st.just(3.0)), max_size=4)


@st.composite
def near_records(draw: st.DrawFn) -> Any:
    """Mostly valid manifest records with a few fields changed, dropped or added."""
    record: dict[str, Any] = {"id": draw(st.sampled_from(["a", "", "x" * 1024, "x" * 1025])),
                              "uri": draw(st.sampled_from(["s3://b/a.jpg", ""])), "tags": draw(_TAGS)}  # fmt: skip
    for key in draw(st.lists(st.sampled_from(["width", "height", "file_name", "ground_truth", "extra"]), max_size=3)):
        record[key] = draw(st.one_of(st.integers(-1, 3), st.text(max_size=2), _VALUES))
    for key in draw(st.lists(st.sampled_from(["id", "uri", "tags"]), max_size=1)):
        if draw(st.booleans()):
            del record[key]
        else:
            record[key] = draw(_VALUES)
    return draw(st.sampled_from([record, record, record, [record], "record"]))


@settings(max_examples=400, deadline=None)
@given(near_records())
def test_fast_path_accepts_only_what_the_validator_accepts(record: Any) -> None:
    if schemas._valid_manifest_record(record):
        assert schemas.errors("manifest_record", record) == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 254), st.text(min_size=1, max_size=3)), max_size=5, unique=True),
       st.text(min_size=1, max_size=20), st.integers(1, 5000))  # fmt: skip
def test_fast_path_takes_ordinary_records(tags: list, rid: str, width: int) -> None:
    """Valid records of the usual shapes pass the fast path (not only the slow validator)."""
    record = {"id": rid, "uri": "s3://bucket/x.jpg", "tags": tags, "width": width, "height": 3, "file_name": "a/b.jpg"}
    assert schemas._valid_manifest_record(record)


def test_compact_set_across_merges() -> None:
    """Membership holds for strings in the recent batch and in the merged array alike."""
    seen = CompactStringSet(batch=4)
    words = [f"img{i}" for i in range(11)] + ["", "é", "\udcff"]
    assert all(seen.add(w) for w in words)
    assert not any(seen.add(w) for w in words)  # every one found again, before and after merges
    assert all(w in seen for w in words)
    assert "img11" not in seen and "IMG1" not in seen


# --- the JSONL scan: blocks, orjson, hashed ids; every outcome as the line-by-line exact reading ---

CATS = [Category(1, "cat", "a cat"), Category(2, "dog", "a dog")]


def _exact_reading(path: str, categories: list[Category] | None) -> tuple[list[dict], list[str]]:
    """The reference: the text file line by line, ``json`` and an exact ``set`` of ids (the reading
    before blocks, orjson and hashes)."""
    check, problems, records = _Checker(categories, None), [], []
    check.problems = problems
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
            except json.JSONDecodeError as err:
                record = _BadJson(err.msg)
            rid = record.get("id") if isinstance(record, dict) else None
            checked = check(record, f"manifest {path} line {i + 1} (id {rid!r})")
            if checked is not None:
                records.append(checked)
    return records, problems


def _line(rid: Any, **extra: Any) -> str:
    return json.dumps({"id": rid, "uri": f"s3://b/{rid}.jpg", "tags": ["cat", 2], **extra}, ensure_ascii=False)


# Plain lines (orjson), lines that are not (non-ASCII, escapes, CR), true repeats, bad records.
LINES = [_line("a"), _line("bb"), _line("c"), "", _line("a"), _line("dd", width=10**30), "   ",
         _line("é"), _line("e\\\\f"), _line("bb", tags=["cow"]), "{not json", _line("ff", file_name="../x.jpg"),
         _line("gg", tags=[3]), _line("c"), _line("hh") + "\r" + _line("ii"), _line("ii"), _line("jj", width=0),
         _line("kk"), _line("é"), json.dumps({"id": "zz", "uri": "u", "tags": [1.0]}), _line("ll")]  # fmt: skip


def _write(path: Any, lines: list[str]) -> str:
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return str(path)


@pytest.mark.parametrize("block", [64, 300, 1 << 20])
@pytest.mark.parametrize("hash_bits", [None, 1])
def test_jsonl_reading_equals_the_exact_reading(tmp_path, monkeypatch, block: int, hash_bits: int | None) -> None:
    """Records, problems (text and order) and the count equal the exact line-by-line reading, in
    blocks of one line or many, and with a hash so small that different ids share it."""
    path = _write(tmp_path / "m.jsonl", LINES)
    monkeypatch.setattr(manifest, "_BLOCK_BYTES", block)
    if hash_bits is not None:  # two hash values: nearly every id collides with different ones
        monkeypatch.setattr(manifest, "_hashes", lambda texts: np.array([len(t) % 2 for t in texts], np.uint64))
    want_records, want_problems = _exact_reading(path, CATS)
    assert [p.split(" (id")[0].rsplit(" ", 1)[1] for p in want_problems if "repeats" in p] == [
        "5",
        "10",
        "14",
        "17",
        "20",
    ]  # a CR splits line 15
    problems: list[str] = []
    assert list(manifest.read_jsonl(path, CATS, problems)) == want_records
    assert problems == want_problems
    scanned: list[str] = []
    scan = manifest.scan_jsonl(path, CATS, scanned, shard_size=3)
    assert scanned == want_problems
    assert scan.count == len(want_records)  # its fingerprint serves no run: a manifest with problems is refused


@pytest.mark.parametrize("hash_bits", [None, 1])
def test_a_clean_manifest_scans_as_the_exact_reading(tmp_path, monkeypatch, hash_bits: int | None) -> None:
    """No problems: the scan's fingerprint is the one of runs before it (canonical JSON of each
    checked record), also when different ids collide in the hash, and ids of names resolved."""
    lines = [_line(f"img{i}", width=640, height=480, file_name=f"d/{i}.jpg") for i in range(50)] + [_line("ü")]
    path = _write(tmp_path / "m.jsonl", lines)
    monkeypatch.setattr(manifest, "_BLOCK_BYTES", 500)
    if hash_bits is not None:
        monkeypatch.setattr(manifest, "_hashes", lambda texts: np.array([len(t) % 2 for t in texts], np.uint64))
    problems: list[str] = []
    scan = manifest.scan_jsonl(path, CATS, problems, shard_size=7)
    want, _ = _exact_reading(path, CATS)
    assert problems == [] and scan.count == 51 and want[0]["tags"] == [1, 2]
    assert scan.fingerprint == manifest.fingerprint(want, CATS)
    assert scan.shard_ids == tuple(s.shard_id for s in manifest.shards(want, 7))
    with pytest.raises(ManifestError, match=r"line 3 \(id 'img0'\): field 'id' repeats"):
        list(manifest.read_jsonl(_write(tmp_path / "r.jsonl", lines[:2] + lines[:1]), CATS))


_PLAIN_TAGS = st.lists(
    st.sampled_from([1, 2, "cat", "dog"] * 3 + [254, True, False, 1.0, 2.5, 0, 255, 3, "", "x"]), max_size=3
)  # mostly the categories' ids and names


@st.composite
def plain_candidates(draw: st.DrawFn) -> Any:
    """Records of the usual shape, each field now and then of a wrong kind; sometimes anything."""
    if draw(st.integers(0, 4)) == 0:
        return draw(near_records())
    record: dict[str, Any] = {
        "id": draw(st.sampled_from(["a", "a", "a", "x" * 1024, "x" * 1025, "", 7])),
        "uri": draw(st.sampled_from(["s3://b/a.jpg"] * 4 + ["", None])),
        "tags": draw(_PLAIN_TAGS),
    }
    optional = {"file_name": (["a/b.jpg"], ["../x.jpg", "C:x.jpg", "/abs.jpg", "s3://b/x", "a..b", "", 3]),
                "ground_truth": (["gt/a.png"], ["", 1]), "width": ([640], [0, -1, 2.0, True, "640"]),
                "height": ([480], [0, 3.5, False]), "extra": ([], [1])}  # fmt: skip
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        good, bad = optional[key]
        record[key] = draw(st.sampled_from(good * 2 * len(bad) + bad))  # as often good as bad
    if "extra" in record and draw(st.booleans()):
        del record["extra"]
    return record


_BASE = {"id": "a", "uri": "s3://b/a.jpg", "tags": ["cat", 2]}


@settings(max_examples=500, deadline=None)
@given(plain_candidates(), st.booleans())
@example({**_BASE, "tags": [True]}, True)
@example({**_BASE, "tags": [1.0]}, True)
@example({**_BASE, "tags": [1.0]}, False)
@example({**_BASE, "file_name": "../x.jpg"}, True)
@example({**_BASE, "file_name": "C:x.jpg", "width": 3}, True)
@example({**_BASE, "width": True}, True)
@example({**_BASE, "height": 2.0}, True)
@example({**_BASE, "id": ""}, True)
@example({**_BASE, "id": "x" * 1025}, True)
def test_fused_plain_check_accepts_only_what_the_exact_checks_accept(record: Any, named: bool) -> None:
    """What the block reader's fused check accepts, the schema, file-name and tag checks accept,
    with the same tags resolved."""
    cats = CATS if named else None
    check = manifest._JsonlChecker("m.jsonl", cats, {}, defer=True)
    copy = json.loads(json.dumps(record))
    if check._plain(copy):
        exact = _Checker(cats, None)
        exact._schema(record, "here")
        assert exact._rest(record, "here") == copy
