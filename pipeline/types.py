"""The records every stage shares, and the names and fingerprints of a run. No torch, no model
import: reading a manifest, writing or auditing outputs imports this module, never the model stack.

    IGNORE, MAX_CLASS_ID, check_class_id   label-map values: 0 background, ids 1..254, 255 ignore
    Category, LabelRequest, LabelResult    a class; an image to label; what the labeler computed
    OK and the failure statuses, Failure   an image that produced no label map (a stats row)
    safe_name, id_name, ImageName, ImageNamer, image_names   how outputs name each image
    shard_id_for                           a shard's content-derived id
    manifest_fingerprint, RunFingerprint, run_fingerprint    what identifies a run's outputs

Names: ``<name>`` is the image file's stem (``000000000139`` for ``000000000139.jpg``), so label
maps pair with their images the way COCO-Stuff, VOC and mmsegmentation expect (``image_names``).
The stem is taken from the record's ``file_name`` (COCO inputs) or the basename of its ``uri``
and passed through ``safe_name``: kept when it is a plain file name, else a sanitised stem plus 12
hex digits of its sha256, so no name ("../x", "/abs", NUL, ...) can leave the prefix. When two
records of a run share a stem (compared case-insensitively, as on case-insensitive disks), the
first in manifest order keeps it and each later one is named ``<sanitised id>-<12 hex digits>``
(``id_name``), which no plain stem can look like. The rule depends on the manifest order only,
never on shard boundaries. Writers that pass no names (runs before stems) name labels by
``safe_name(image_id)``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pipeline.discovery import Regions

IGNORE = 255  # label-map value of uncertain pixels
MAX_CLASS_ID = 254  # foreground ids are 1..254: 0 is background, 255 ignore

# Values of the ``status`` column of ``stats_images``: "ok", or why an image has no label map.
OK = "ok"
MISSING = "missing"  # the image file does not exist
READ_ERROR = "read_error"  # it could not be read (permanent fault, or retries exhausted)
DECODE_ERROR = "decode_error"  # its bytes are no image we decode
SIZE_MISMATCH = "size_mismatch"  # its size matches the record's width/height in neither orientation
UNUSABLE = "unusable"  # decoded, but the method cannot use it (aspect ratio)

_PLAIN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]{0,99}")
_ESCAPED = re.compile(r".*-[0-9a-f]{12}")  # what an escaped name ends with; plain ids never look like it


def check_class_id(cid: Any, what: str = "category id") -> int:
    """``cid`` as an int when it is an integer in 1..254 (a foreground value of a uint8 label
    map), else ValueError naming ``what``. The one check of category ids: manifests, categories,
    label assembly and the COCO writer all call it."""
    if isinstance(cid, bool) or not isinstance(cid, int | np.integer) or not 1 <= int(cid) <= MAX_CLASS_ID:
        raise ValueError(
            f"{what} must be an integer in 1..{MAX_CLASS_ID}, got {cid!r} (0 is background, {IGNORE} ignore)"
        )
    return int(cid)


def check_class_ids(ids: Iterable[Any], what: str = "class ids") -> list[int]:
    """``check_class_id`` for each id; the error lists them all."""
    ids = list(ids)
    try:
        return [check_class_id(i) for i in ids]
    except ValueError:
        shown = [int(i) if isinstance(i, int | np.integer) else i for i in ids]
        raise ValueError(
            f"{what} must lie in 1..{MAX_CLASS_ID} to fit a uint8 label map (0 is background, {IGNORE} "
            f"ignore), got {shown}"
        ) from None


@dataclass(frozen=True)
class Category:
    """A foreground class: ``id`` is the value it takes in label maps (1..254)."""

    id: int
    name: str
    prompt: str


@dataclass(frozen=True)
class LabelRequest:
    """One decoded image (HWC uint8 RGB) with its tags (category ids)."""

    image_id: str
    image: np.ndarray
    tags: tuple[int, ...]
    segments: np.ndarray | None = None  # superpixels, when computed ahead (off the GPU's path)


@dataclass
class LabelResult:
    """Everything the labeler computed for one image.

    label_map: [H, W] uint8 (0 background, category ids, 255 ignore).
    class_ids: the C categories whose maps are held below (the image's tags, or every category
        in open-vocabulary mode). For CLIPer the softmax ran over every candidate (``cliper.candidates``).
    coarse: [C, h, w] float32 first-stage map on the ViT grid (CLIPer's coarse map, CLIP-ES's CAM).
    compensated: [C, s, s] float32 map the label map is built from: CLIPer's SD-compensated map
        (s = 64 for SD 2.1; the coarse map when compensation is off), CLIP-ES's CAA map at image
        size. (Felzenszwalb refinement, ``refine.py``, comes after it, on ``decision``.)
    coarse_scores, final_scores: [C] float32 class scores.
    kept_ids: the categories allowed in the label map (all tags, or in open-vocabulary mode
        those scoring above ``score_threshold``).
    decision: [K, H, W] float32 scores of the kept classes that the threshold and argmax saw.
    segments: [H, W] int32 superpixels, or None when refinement is off.
    timings: seconds per stage (wall clock; not part of any deterministic output).
    maps: the method's own diagnostic maps by name (``jobs/explain.py --dump``).
    regions: potential objects in the untagged area (``pipeline.discovery.Regions``), None when
        discovery is off; region_map: [H, W] uint16 (0 none, 1..R) when ``discovery.unknown`` is "regions".
    suggestions: (class name, score) per region, in region id order (``discovery.score_regions``).
    """

    image_id: str
    label_map: np.ndarray
    class_ids: tuple[int, ...]
    coarse: np.ndarray
    compensated: np.ndarray
    coarse_scores: np.ndarray
    final_scores: np.ndarray
    kept_ids: tuple[int, ...]
    decision: np.ndarray
    segments: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    regions: Regions | None = None
    region_map: np.ndarray | None = None
    suggestions: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Failure:
    """An image that produced no label map: ``status`` names the failure kind (not "ok"); it
    becomes a ``stats_images`` row with that status and ``error``."""

    image_id: str
    status: str
    error: str

    def __post_init__(self) -> None:
        if not isinstance(self.image_id, str) or not self.image_id:
            raise ValueError(f"a failure needs a non-empty string image id, got {self.image_id!r}")
        if not isinstance(self.status, str) or not self.status or self.status == OK:
            raise ValueError(f"image {self.image_id}: a failure's status must be a non-empty kind other than 'ok'")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(doc: Any) -> bytes:
    """Sorted keys, no spaces, ASCII: the bytes every fingerprint hashes."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def safe_name(image_id: str) -> str:
    """A file stem for ``image_id`` that cannot leave its directory: the id when it is a plain
    name (letters, digits, ``._=-``, not starting with ``.``), else a sanitised stem plus 12 hex
    digits of the id's sha256. Injective up to sha256 collisions."""
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"image ids must be non-empty strings, got {image_id!r}")
    if _PLAIN_ID.fullmatch(image_id) and not _ESCAPED.fullmatch(image_id):
        return image_id
    stem = re.sub(r"[^A-Za-z0-9._=-]", "_", image_id)[:64].lstrip(".=-") or "id"
    digest = sha256_hex(image_id.encode("utf-8", "surrogatepass"))[:12]
    return f"{stem}-{digest}"


def id_name(image_id: str) -> str:
    """The label stem of an image whose file stem another image of the run already took: the
    sanitised id plus 12 hex digits of a sha256 kept apart from ``safe_name``'s, so it equals no
    stem ``safe_name`` gives and no other id's name."""
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"image ids must be non-empty strings, got {image_id!r}")
    stem = re.sub(r"[^A-Za-z0-9._=-]", "_", image_id)[:64].lstrip(".=-") or "id"
    return f"{stem}-{sha256_hex(('id:' + image_id).encode('utf-8', 'surrogatepass'))[:12]}"


@dataclass(frozen=True)
class ImageName:
    """How a run's outputs name one image. ``label``: the stem of its label PNG (safe as a file
    name); ``file_name``: the image as the COCO output's ``images[].file_name`` records it (the
    input's ``file_name`` for COCO inputs, relative to ``--images``; else the manifest's uri)."""

    label: str
    file_name: str


def file_stem(path: str) -> str:
    """``"a/b/000000000139.jpg"`` -> ``"000000000139"``: the basename without its last extension
    (also for URLs: ``s3://b/x.png`` -> ``x``)."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base


class ImageNamer:
    """Names records in manifest order (``ImageName``): the first record with a stem keeps it;
    a later record whose stem is taken (case-insensitively) gets ``id_name``, and where that is
    taken too, ``id_name`` plus ``-2``, ``-3``, ... until one is free. So no two records share a
    name, whatever the set: a 12-digit ``id_name`` digest shared by two ids, or a set-like that
    answers "taken" for a name it never held (``CompactStringSet``'s 8-byte digests) costs a
    renamed image, never an overwritten one; and the names depend on the manifest's order only.
    Holds one short string per named image, like the manifest check's set of ids."""

    def __init__(self, taken: Any = None) -> None:
        """``taken``: an empty set-like (``in``, ``add``) to hold the names in, e.g. manifest's
        ``CompactStringSet`` for a manifest of millions of images; default a ``set``."""
        self._taken = set[str]() if taken is None else taken

    def __call__(self, record: Mapping[str, Any]) -> ImageName:
        file_name = record.get("file_name") or record["uri"]
        stem = file_stem(file_name)
        label = safe_name(stem) if stem else id_name(record["id"])
        if label.lower() in self._taken:
            label = id_name(record["id"])
        suffix = 1
        while label.lower() in self._taken:  # its id_name taken too (see the class docstring)
            suffix += 1
            label = f"{id_name(record['id'])}-{suffix}"
        self._taken.add(label.lower())
        return ImageName(label, file_name)


def image_names(records: Iterable[Mapping[str, Any]]) -> dict[str, ImageName]:
    """``ImageName`` by image id for ``records`` named together (see ``ImageNamer``)."""
    namer = ImageNamer()
    return {r["id"]: namer(r) for r in records}


def shard_id_for(index: int, image_ids: Sequence[str]) -> str:
    """Shard id from the manifest's content: the shard's position and a hash of its image ids, so
    a changed manifest never reuses a committed shard's name."""
    digest = sha256_hex("\n".join(image_ids).encode("utf-8", "surrogatepass"))[:12]
    return f"{index:05d}-{digest}"


def manifest_fingerprint(records: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of the manifest records (canonical JSON, one per line, in order)."""
    h = hashlib.sha256()
    for record in records:
        h.update(canonical_json(record) + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class RunFingerprint:
    """What identifies a run's outputs: sha256 digests of the config, the model weights and the manifest."""

    config: str
    model: str
    manifest: str

    @property
    def digest(self) -> str:
        return sha256_hex(f"{self.config}:{self.model}:{self.manifest}".encode())


def run_fingerprint(config_fingerprint: str, model_fingerprint: Mapping[str, Any], manifest: str) -> RunFingerprint:
    """From ``Config.fingerprint()``, ``models.model_fingerprint(cfg.model)`` and ``manifest_fingerprint``."""
    return RunFingerprint(config_fingerprint, sha256_hex(canonical_json(model_fingerprint)), manifest)
