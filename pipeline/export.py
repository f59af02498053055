"""Exports of a run to the tools curators use, honouring review decisions.

    fiftyone     ImageSegmentationDirectory: data/<stem>.<ext> images, labels/<stem>.png greyscale
                 masks (pixel = category id, 255 ignore; the run's label PNGs without their
                 palette, see ``grey_png``), mask_targets.json, and fields.json with each
                 image's stats (and review decision) to set as sample fields
    labelstudio  tasks.json: one task per image with ``predictions`` (a ``brushlabels`` RLE result
                 per class present and a ``score``), and label_config.xml for the project
    cvat         "Segmentation mask 1.1" (VOC layout): SegmentationClass/<stem>.png colour-coded
                 as labelmap.txt says, ImageSets/Segmentation/default.txt

Images rejected in review are left out (``rejected="skip"``) or kept with the decision recorded
(``"tag"``: a ``review`` field / ``data.review`` / the stem listed in ``rejected.txt``). Only
labelled images (status ok) of committed shards are exported; they are visited in image-id order,
so an export is byte-identical for the same run and decisions.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow.dataset as ds

from pipeline.pngs import COMPRESS_LEVEL
from pipeline.review import render
from pipeline.review.decisions import DecisionLog
from pipeline.review.run import ReviewRun, decode_png, image_url, open_review_run
from pipeline.types import IGNORE

log = logging.getLogger(__name__)

REJECTED = ("skip", "tag")
STAT_FIELDS = ("background_fraction", "ignore_fraction", "coarse_refined_agreement", "superpixel_purity",
               "n_candidates", "n_kept", "n_superpixels")  # fmt: skip
FROM_NAME, TO_NAME = "label", "image"  # Label Studio control and object tag names (label_config.xml)


@dataclass
class ExportSummary:
    """What an export wrote: images exported, rejected ones left out or tagged, images whose
    picture could not be found (FiftyOne needs the pictures; they are left out there)."""

    format: str
    out: str
    exported: int = 0
    rejected_skipped: int = 0
    rejected_tagged: int = 0
    missing_pictures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Item:
    """One labelled image to export: its stats row, ``stem`` (its label file's), the image's
    location (or None), its label map [H, W] uint8 and the run's PNG of it (indexed), class scores
    by category id, review decision."""

    row: Mapping[str, Any]
    stem: str
    picture: str | None
    label_map: np.ndarray
    label_png: bytes
    scores: Mapping[int, float]
    decision: str | None


def _class_scores(run: ReviewRun) -> dict[str, dict[int, float]]:
    table = ds.dataset(list(run.classes_files), format="parquet", filesystem=run.store.fs).to_table(
        columns=["image_id", "category_id", "class_score"])  # fmt: skip
    out: dict[str, dict[int, float]] = {}
    for image_id, cid, score in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
        out.setdefault(image_id, {})[int(cid)] = float(score)
    return out


def _file_names(run: ReviewRun, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Image id -> ``file_name`` of each row's image, each shard's COCO file read once: rows come
    in id order while shards are manifest chunks, so going row by row through a cache of shards
    would read a shard again for most images of a manifest not sorted by id."""
    ids_by_shard: dict[str, list[str]] = {}
    for row in rows:
        ids_by_shard.setdefault(row["shard_id"], []).append(row["image_id"])
    out: dict[str, str] = {}
    for shard_id, ids in sorted(ids_by_shard.items()):
        in_shard = run.read_file_names(shard_id)
        out.update((i, in_shard[i]) for i in ids if i in in_shard)
    return out


def items(run: ReviewRun, images: str | None = None) -> Iterator[Item]:
    """The run's labelled images in image-id order, with their label maps and decisions."""
    rows = ds.dataset(list(run.images_files), format="parquet", filesystem=run.store.fs).to_table(
        filter=ds.field("status") == "ok").sort_by("image_id").to_pylist()  # fmt: skip
    decisions = {k: d.decision for k, d in DecisionLog(run).latest().items()}
    scores = _class_scores(run)
    names = _file_names(run, rows)
    for row in rows:
        name, png = names.get(row["image_id"]), run.label_png(row["label_file"])
        yield Item(row, Path(row["label_file"]).stem, image_url(name, images), decode_png(png), png,
                   scores.get(row["image_id"], {}), decisions.get(row["image_id"]))  # fmt: skip


def _kept(item: Item, rejected: str, summary: ExportSummary) -> bool:
    if item.decision != "reject":
        return True
    if rejected == "skip":
        summary.rejected_skipped += 1
        return False
    summary.rejected_tagged += 1
    return True


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a PNG file; raises ValueError when it is not one."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    at = len(PNG_SIGNATURE)
    while at < len(data):
        if at + 12 > len(data):
            raise ValueError("a PNG chunk is cut short")
        (length,) = struct.unpack(">I", data[at : at + 4])
        yield data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        at += 12 + length


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def grey_png(indexed: bytes) -> bytes | None:
    """An 8-bit indexed PNG (a run's label PNG) as an 8-bit greyscale PNG with the same pixel
    values, without decoding: both store one byte per pixel, so the compressed rows stay as they
    are; only the header's colour type changes and the palette goes. Readers that expand palettes
    to colours (OpenCV, so FiftyOne) then see the category ids. None when ``indexed`` is no 8-bit
    indexed PNG."""
    try:
        chunks = list(_chunks(indexed))
    except (ValueError, struct.error):
        return None
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        return None
    header = chunks[0][1]
    if header[8:10] != b"\x08\x03":  # bit depth 8, colour type 3 (indexed)
        return None
    out = [PNG_SIGNATURE, _chunk(b"IHDR", header[:9] + b"\x00" + header[10:])]
    out += [_chunk(kind, body) for kind, body in chunks[1:] if kind not in (b"PLTE", b"tRNS")]
    return b"".join(out)


def _names(run: ReviewRun, present: Sequence[int] = ()) -> dict[int, str]:
    names = {int(c["id"]): str(c["name"]) for c in run.categories}
    return {0: "background", **names, **({IGNORE: "ignore"} if IGNORE in present else {})}


def image_score(item: Item) -> float:
    """A task's confidence: the lowest class score among the classes present in the label map
    (the least sure class decides; 0 when only background), so sorting by it puts doubt first."""
    present = [item.scores[c] for c in np.unique(item.label_map).tolist() if c in item.scores]
    return round(min(present), 6) if present else 0.0


# --- FiftyOne -----------------------------------------------------------------------------------


def to_fiftyone(run: ReviewRun, out: Path, images: str | None, rejected: str, summary: ExportSummary) -> None:
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    fields, present = {}, set()
    for item in items(run, images):
        if not _kept(item, rejected, summary):
            continue
        fs = None if item.picture is None else run.filesystem_for(item.picture)
        if fs is None or item.picture is None or not fs.exists(item.picture):
            summary.missing_pictures.append(item.row["image_id"])
            continue
        ext = Path(item.picture).suffix.lower() or ".jpg"
        with fs.open(item.picture, "rb") as src, open(out / "data" / f"{item.stem}{ext}", "wb") as dst:
            shutil.copyfileobj(src, dst)
        mask = grey_png(item.label_png) or render.png_bytes(item.label_map, COMPRESS_LEVEL)
        (out / "labels" / f"{item.stem}.png").write_bytes(mask)
        present |= set(np.unique(item.label_map).tolist())
        fields[item.stem] = {"image_id": item.row["image_id"], "score": image_score(item),
                             **{k: item.row[k] for k in STAT_FIELDS},
                             **({"review": item.decision} if item.decision else {})}  # fmt: skip
        summary.exported += 1
    targets = {str(k): v for k, v in _names(run, sorted(present)).items()}
    (out / "mask_targets.json").write_text(json.dumps(targets, indent=1, sort_keys=True))
    (out / "fields.json").write_text(json.dumps(fields, indent=1, sort_keys=True))


# --- Label Studio -------------------------------------------------------------------------------


class _Bits:
    """An MSB-first bit writer."""

    def __init__(self) -> None:
        self.bits: list[str] = []

    def put(self, value: int, width: int) -> None:
        self.bits.append(format(value, f"0{width}b"))

    def bytes(self) -> list[int]:
        s = "".join(self.bits)
        s += "0" * (-len(s) % 8)
        return [int(s[i : i + 8], 2) for i in range(0, len(s), 8)]


RLE_SIZES = (3, 4, 8, 16)  # bits of a run length, by the 2-bit size index (rle-pack's header)


def brush_rle(mask: np.ndarray) -> list[int]:
    """[H, W] bool mask -> Label Studio's brush RLE (rle-pack of the RGBA image, H*W*4 bytes, 255
    where the mask is set, word size 8). Every chunk is a run: flag 1, a 2-bit size index, the
    run length - 1 in that many bits, the byte value."""
    flat = np.repeat(np.asarray(mask, bool).ravel(), 4).astype(np.uint8) * 255
    bits = _Bits()
    bits.put(flat.size, 32)
    bits.put(8 - 1, 5)
    for size in RLE_SIZES:
        bits.put(size - 1, 4)
    if flat.size:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate([[0], change])
        lengths = np.diff(np.concatenate([starts, [flat.size]]))
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            while length > 0:
                n = min(length, 2 ** RLE_SIZES[-1])
                index = next(i for i, size in enumerate(RLE_SIZES) if n <= 2**size)
                bits.put(1, 1)
                bits.put(index, 2)
                bits.put(n - 1, RLE_SIZES[index])
                bits.put(int(flat[start]), 8)
                length -= n
    return bits.bytes()


def label_config(names: Mapping[int, str]) -> str:
    """A Label Studio labeling config with one brush label per class (colours as in the label PNGs)."""
    labels = "".join(f'\n    <Label value={quoteattr(name)} background="{render.hex_colour(i)}"/>'
                     for i, name in sorted(names.items()) if i not in (0, IGNORE))  # fmt: skip
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">{labels}\n  </BrushLabels>\n</View>\n')  # fmt: skip


def ls_task(item: Item, names: Mapping[int, str], model_version: str) -> dict[str, Any]:
    """One Label Studio task: the image, the stats as data, and one prediction whose result has a
    ``brushlabels`` RLE per class present (ignore pixels, 255, are left unlabelled)."""
    h, w = item.label_map.shape
    results = [{
        "id": f"{item.stem}-{cid}", "type": "brushlabels", "from_name": FROM_NAME, "to_name": TO_NAME,
        "original_width": w, "original_height": h, "image_rotation": 0, "readonly": False,
        "value": {"format": "rle", "rle": brush_rle(item.label_map == cid), "brushlabels": [names[cid]]},
        **({"score": round(item.scores[cid], 6)} if cid in item.scores else {}),
    } for cid in np.unique(item.label_map).tolist() if cid not in (0, IGNORE)]  # fmt: skip
    data = {"image": item.picture or "", "image_id": item.row["image_id"], "label_file": item.row["label_file"],
            **{k: item.row[k] for k in STAT_FIELDS},
            **({"review": item.decision} if item.decision else {})}  # fmt: skip
    return {"data": data, "predictions": [{"model_version": model_version, "score": image_score(item),
                                           "result": results}]}  # fmt: skip


def to_labelstudio(run: ReviewRun, out: Path, images: str | None, rejected: str, summary: ExportSummary) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = _names(run)
    version = f"tag2mask-{(run.fingerprint or 'unknown')[:12]}"
    tasks = []
    for item in items(run, images):
        if _kept(item, rejected, summary):
            tasks.append(ls_task(item, names, version))
            summary.exported += 1
            if item.picture is None:
                summary.missing_pictures.append(item.row["image_id"])
    (out / "tasks.json").write_text(json.dumps(tasks, separators=(",", ":")))
    (out / "label_config.xml").write_text(label_config(names))


# --- CVAT ---------------------------------------------------------------------------------------


def to_cvat(run: ReviewRun, out: Path, images: str | None, rejected: str, summary: ExportSummary) -> None:
    (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    (out / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    colours = render.colours()
    stems, tagged, present = [], [], {0}
    for item in items(run, images):
        if not _kept(item, rejected, summary):
            continue
        coloured = render.png_bytes(colours[item.label_map], COMPRESS_LEVEL)
        (out / "SegmentationClass" / f"{item.stem}.png").write_bytes(coloured)
        present |= set(np.unique(item.label_map).tolist())
        stems.append(item.stem)
        tagged += [item.stem] if item.decision == "reject" else []
        summary.exported += 1
    names = _names(run, sorted(present))
    lines = ["# label:color_rgb:parts:actions"]
    lines += [f"{name}:{','.join(map(str, colours[i]))}::" for i, name in sorted(names.items())]
    (out / "labelmap.txt").write_text("\n".join(lines) + "\n")
    (out / "ImageSets" / "Segmentation" / "default.txt").write_text("".join(f"{s}\n" for s in stems))
    if rejected == "tag":
        (out / "rejected.txt").write_text("".join(f"{s}\n" for s in tagged))


EXPORTERS: dict[str, Callable[[ReviewRun, Path, str | None, str, ExportSummary], None]] = {
    "fiftyone": to_fiftyone, "labelstudio": to_labelstudio, "cvat": to_cvat,
}  # fmt: skip


def export(run: str | ReviewRun, to: str, out: str | Path, rejected: str = "skip", images: str | None = None,
           storage_options: Mapping[str, Any] | None = None) -> ExportSummary:  # fmt: skip
    """Export ``run`` (an output prefix, or an opened run) in format ``to`` (``EXPORTERS``) into
    the local folder ``out``. ``images``: the root relative image file names are under (COCO
    inputs). Raises ValueError on an unknown format or rejected policy."""
    if to not in EXPORTERS:
        raise ValueError(f"unknown export format {to!r}; choose one of {sorted(EXPORTERS)}")
    if rejected not in REJECTED:
        raise ValueError(f"--rejected must be one of {list(REJECTED)}, got {rejected!r}")
    opened = run if isinstance(run, ReviewRun) else open_review_run(run, **dict(storage_options or {}))
    summary = ExportSummary(to, str(out))
    EXPORTERS[to](opened, Path(out), images, rejected, summary)
    return summary
