import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from pipeline import pngs


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_png_round_trip(label_map):
    assert np.array_equal(pngs.decode_png(pngs.encode_png(label_map)), label_map)


def test_png_is_indexed_with_voc_palette():
    m = np.array([[0, 1, 2], [3, 255, 15]], np.uint8)
    image = Image.open(io.BytesIO(pngs.encode_png(m)))
    assert image.mode == "P" and image.size == (3, 2)
    pal = image.getpalette()
    colour = {i: tuple(pal[3 * i : 3 * i + 3]) for i in (0, 1, 2, 3, 15, 255)}
    assert colour == {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        15: (192, 128, 128),
        255: (224, 224, 192),
    }
    assert np.array_equal(np.array(image), m)  # what a trainer reads: the indices


def test_png_bytes_are_deterministic_and_carry_no_metadata():
    m = np.random.default_rng(0).integers(0, 4, (37, 53)).astype(np.uint8)
    first, second = pngs.encode_png(m), pngs.encode_png(m.copy())
    assert first == second
    assert b"tIME" not in first and b"tEXt" not in first


def test_non_contiguous_input_is_written_correctly():
    m = np.arange(60, dtype=np.uint8).reshape(6, 10)[:, ::2]
    assert np.array_equal(pngs.decode_png(pngs.encode_png(m)), m)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.int64), np.zeros((4, 4, 3), np.uint8), [[0, 1]]])
def test_bad_label_maps_are_rejected(bad):
    with pytest.raises(ValueError, match=r"\[H, W\] uint8"):
        pngs.encode_png(bad)


def test_rgb_png_is_rejected_on_decode():
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="mode P"):
        pngs.decode_png(buf.getvalue())
