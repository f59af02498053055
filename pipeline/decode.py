"""Image decoding: bytes -> upright HWC uint8 RGB. Pure; raises ``ImageDecodeError`` on bad data."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit


class ImageDecodeError(ValueError):
    """The bytes are not an image this labeler can use; the message says why."""


class SizeMismatchError(ImageDecodeError):
    """The image matches the size its manifest record states in neither orientation."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 expected_size: tuple[int, int] | None = None) -> np.ndarray:  # fmt: skip
    """Encoded image bytes -> [H, W, 3] uint8 RGB.

    Orientation: with ``expected_size`` (width, height), as a manifest record (COCO) states it,
    the orientation that has that size wins: the stored pixels when they match (ground truth
    such as COCO's is drawn on them, and the published CLIPer code reads them without EXIF),
    else the EXIF-rotated pixels; a size neither matches raises ``SizeMismatchError``. Without
    it, the image is rotated upright per its EXIF orientation.
    Palette, grayscale, alpha, 16-bit and CMYK inputs are converted; images over ``max_pixels``
    pixels are refused before their pixels are decoded.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise ImageDecodeError(f"{im.width}x{im.height} exceeds the pixel limit of {max_pixels}")
            im.load()
            return _to_rgb(_oriented(im, expected_size))
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        # PIL's own message names a memory address: a stable message keeps stats deterministic.
        raise ImageDecodeError("cannot decode image: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image: {err}") from None


def _oriented(im: Image.Image, expected_size: tuple[int, int] | None) -> Image.Image:
    if expected_size is not None and tuple(im.size) == tuple(expected_size):
        return im
    upright = ImageOps.exif_transpose(im)
    if expected_size is not None and tuple(upright.size) != tuple(expected_size):
        raise SizeMismatchError(
            f"the image is {im.width}x{im.height} (upright per EXIF: {upright.width}x{upright.height}), but its "
            f"manifest record says {expected_size[0]}x{expected_size[1]}: fix the record or the file"
        )
    return upright


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping.
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    # One copy: convert() copies even an RGB image, and asarray() of it was copied again.
    return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


def read_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a local or fsspec path (``s3://...``) to [H, W, 3] uint8 RGB."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        return decode_image(f.read(), max_pixels)
