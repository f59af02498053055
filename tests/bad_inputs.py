"""A corpus of awkward inputs, made on the fly (no binary blobs in the repository): each file is
named by what it is, and ``CORPUS`` says what a user should get for it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import blob_image

# Images a user expects to be labeled (converted and upright), and those that must become a row
# with a status and a message: (file name, status, words of the message).
USABLE = ["palette.png", "gray.png", "gray_alpha.png", "gray16.png", "cmyk.jpg", "exif_rotated.jpg",
          "one_by_one.png", "eight_by_eight.png", "café_ü.jpg", "图像.png"]  # fmt: skip
REFUSED = [
    ("zero_bytes.jpg", "decode_error", "empty file (0 bytes)"),
    ("truncated.jpg", "decode_error", "truncated"),
    ("text.jpg", "decode_error", "not a recognised image format"),
    ("bomb_header.png", "decode_error", "decompression bomb"),
    ("over_limit.png", "decode_error", "exceeds the pixel limit of 20000"),
    ("does_not_exist.jpg", "missing", "image not found"),
]
PIXEL_LIMIT = 20_000  # the configured max_pixels of the corpus run: over_limit.png has 40_000
UPRIGHT = (48, 64)  # (h, w) of the EXIF-rotated image once turned upright


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_header_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 60-byte PNG that claims 10^10 pixels: only the header can be read."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def upright_image() -> np.ndarray:
    return blob_image(*UPRIGHT, seed=5)


def exif_rotated_jpeg() -> bytes:
    """The upright image stored turned 90 degrees clockwise with EXIF orientation 6 ("rotate 90 CW
    to display"): a viewer, and we, must show ``upright_image``."""
    stored = Image.fromarray(upright_image()).transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(stored, "JPEG", quality=100, subsampling=0, exif=exif.tobytes())


def corpus_files() -> dict[str, bytes]:
    """File name -> bytes of every corpus file that exists (``does_not_exist.jpg`` does not)."""
    rgb = Image.fromarray(blob_image(40, 56, seed=1))
    jpeg = _save(rgb, "JPEG", quality=90)
    gray16 = Image.fromarray(blob_image(40, 56, seed=2)[..., 0].astype(np.uint16) * 257)  # mode I;16
    gray_alpha = rgb.convert("LA")
    return {
        "palette.png": _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG"),
        "gray.png": _save(rgb.convert("L"), "PNG"),
        "gray_alpha.png": _save(gray_alpha, "PNG"),
        "gray16.png": _save(gray16, "PNG"),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG", quality=90),
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "one_by_one.png": _save(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "eight_by_eight.png": _save(Image.fromarray(blob_image(8, 8, seed=3)), "PNG"),
        "café_ü.jpg": jpeg,
        "图像.png": _save(rgb, "PNG"),
        "zero_bytes.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.jpg": b"this is a text file, not a JPEG\n",
        "bomb_header.png": bomb_header_png(),
        "over_limit.png": _save(Image.fromarray(blob_image(200, 200, seed=4)), "PNG"),
    }


def write_corpus(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in corpus_files().items():
        (folder / name).write_bytes(data)
