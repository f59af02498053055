"""Decoding and orientation: the manifest's width/height pick the orientation, EXIF otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import shards
from pipeline.decode import SizeMismatchError, decode_image


def _jpeg_40x20_rotated_by_exif() -> tuple[bytes, np.ndarray]:
    """A 40 x 20 (W x H) JPEG whose EXIF orientation 6 says: rotate 90 degrees clockwise to view;
    with the stored pixels as PIL decodes them, ignoring EXIF."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        stored = np.asarray(im.convert("RGB")).copy()
    return buf.getvalue(), stored


def test_exif_orientation_applies_when_the_record_gives_no_size():
    data, stored = _jpeg_40x20_rotated_by_exif()
    out = decode_image(data)
    assert out.shape == (40, 20, 3)
    # Orientation 6 = rotate 90 degrees clockwise: np.rot90 with k=-1, computed apart from PIL.
    assert np.array_equal(out, np.rot90(stored, k=-1))


def test_the_orientation_matching_the_record_wins():
    data, stored = _jpeg_40x20_rotated_by_exif()
    assert np.array_equal(decode_image(data, expected_size=(40, 20)), stored)  # stored pixels: COCO's
    assert np.array_equal(decode_image(data, expected_size=(20, 40)), np.rot90(stored, k=-1))
    with pytest.raises(SizeMismatchError, match="manifest record says 30x30"):
        decode_image(data, expected_size=(30, 30))


def test_a_record_matching_neither_orientation_is_a_size_mismatch_row(tmp_path):
    data, stored = _jpeg_40x20_rotated_by_exif()
    path = tmp_path / "rotated_40x20.jpg"
    path.write_bytes(data)
    record = {"id": "7", "uri": str(path), "tags": [1], "width": 41, "height": 20}
    failure = shards._load(record, 10**8, {})
    assert failure.status == "size_mismatch" and "41x20" in failure.error
    assert np.array_equal(shards._load({**record, "width": 40}, 10**8, {}), stored)
    sizeless = {k: v for k, v in record.items() if k not in ("width", "height")}
    assert shards._load(sizeless, 10**8, {}).shape == (40, 20, 3)  # EXIF applies


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")])
def test_decoded_pixels_equal_the_old_convert_and_copy_and_are_writable(mode, fmt):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (13, 17, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        im.load()
        want = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    got = decode_image(buf.getvalue())
    assert got.tobytes() == want.tobytes() and got.shape == (13, 17, 3) and got.flags.writeable
    got[0, 0] = 0  # the caller owns the pixels
