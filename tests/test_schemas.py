import pyarrow as pa
import pytest

from pipeline import schemas
from pipeline.config import PRESETS, Config, build_config

GOOD = [
    {"id": "2008_000123", "uri": "s3://voc/JPEGImages/2008_000123.jpg", "tags": [15, 12]},
    {"id": "b", "uri": "/data/b.jpg", "tags": [], "width": 500, "height": 375, "ground_truth": "/gt/b.png"},
]


def test_good_manifest_passes():
    schemas.validate_manifest(GOOD)  # the failing cases below show the validator is not a no-op
    assert schemas.errors("manifest_record", GOOD[1]) == []


@pytest.mark.parametrize(
    "record, field, words",
    [
        ({"id": "x7", "uri": "a.jpg", "tags": [1.5]}, "tags/0", "not of type 'integer'"),
        ({"id": "x7", "uri": "a.jpg", "tags": [""]}, "tags/0", "should be non-empty"),
        ({"id": "x7", "tags": [1]}, "uri", "required"),
        ({"id": "x7", "uri": "a.jpg", "tags": [255]}, "tags/0", "maximum"),
        ({"id": "x7", "uri": "a.jpg", "tags": [1], "width": 0}, "width", "minimum"),
        ({"id": "x7", "uri": "a.jpg", "tags": [1], "wdth": 5}, "(whole document)", "'wdth' was unexpected"),
        ({"id": "x7", "uri": "a.jpg", "tags": [1, 1]}, "tags", "non-unique"),
    ],
)
def test_malformed_record_is_named_with_its_field(record, field, words):
    with pytest.raises(ValueError) as err:
        schemas.validate_manifest([*GOOD, record])
    message = str(err.value)
    assert message.startswith("manifest record 2 (id 'x7')")
    assert f"field {field!r}" in message and words in message


def test_duplicate_ids_are_rejected():
    with pytest.raises(ValueError, match=r"record 2 \(id 'b'\): field 'id' repeats record 1"):
        schemas.validate_manifest([*GOOD, {"id": "b", "uri": "c.jpg", "tags": []}])


def test_non_object_record_is_named():
    with pytest.raises(ValueError, match=r"manifest record 0 \(id None\).*not of type 'object'"):
        schemas.validate_manifest(["just a string"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_config_matches_the_config_schema(preset):
    assert schemas.errors("config", build_config(preset).to_dict()) == []


def test_bad_config_is_rejected():
    doc = Config().to_dict()
    doc["batch_size"] = "8"
    doc["refine"]["pooling"] = "max"
    problems = schemas.errors("config", doc)
    assert len(problems) == 2
    assert problems[0].startswith("field 'batch_size'") and problems[1].startswith("field 'refine/pooling'")


def test_marker_schema_requires_counts():
    marker = {"schema": schemas.MARKER_SCHEMA_ID, "shard_id": "00001-ab", "fingerprint": "0" * 64,
              "files": {}, "volatile_files": []}  # fmt: skip
    with pytest.raises(ValueError, match="field 'counts'"):
        schemas.validate("commit_marker", marker, "marker")


def test_unknown_schema_name():
    with pytest.raises(ValueError, match="unknown schema"):
        schemas.errors("manifest", {})


def test_arrow_tables_are_checked():
    good = pa.Table.from_pylist([], schema=schemas.TIMINGS)
    schemas.check_table("timings", good)
    bad = good.set_column(3, "seconds", pa.array([], pa.float32()))
    with pytest.raises(ValueError, match="does not match its schema"):
        schemas.check_table("timings", bad)
