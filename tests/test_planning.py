"""Planning at scale without changing what it reports: the plain-Python fast path for manifest
records accepts only what the JSON Schema validator accepts (the validator still words every
problem), and the compact id set behaves as a set."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import schemas
from pipeline.manifest import CompactStringSet

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
