"""Indexed (palette) PNG label maps. Pure functions.

A label PNG is mode "P": each pixel's index is its label (0 background, class ids, 255 ignore),
so ``np.array(Image.open(f))`` gives back the label map and a trainer reads the indices directly;
the palette only makes the file viewable (the PASCAL VOC colour map: 0 black, 255 cream).
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

COMPRESS_LEVEL = 6  # zlib level; pinned so the bytes do not depend on Pillow's default


@functools.cache
def palette() -> bytes:
    """768 bytes, RGB for indices 0..255: the bits of the index spread over R, G, B from the
    most significant bit down, so neighbouring ids get clearly different colours."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, rgb = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        colours[index] = rgb
    return colours.tobytes()


def encode_png(label_map: np.ndarray) -> bytes:
    """[H, W] uint8 label map -> bytes of an indexed PNG with the palette above (no metadata)."""
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 2 or label_map.dtype != np.uint8:
        got = f"{label_map.dtype} {label_map.shape}" if isinstance(label_map, np.ndarray) else type(label_map).__name__
        raise ValueError(f"expected an [H, W] uint8 label map, got {got}")
    height, width = label_map.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(label_map).tobytes())
    image.putpalette(palette())
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=COMPRESS_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Bytes of an indexed label PNG -> [H, W] uint8 label map (the palette indices)."""
    image = Image.open(io.BytesIO(data))
    if image.mode != "P":
        raise ValueError(f"expected an indexed (mode P) label PNG, got mode {image.mode}")
    return np.array(image, dtype=np.uint8)
