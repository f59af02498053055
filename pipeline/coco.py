"""COCO annotations from label maps, in the COCO-Stuff convention. Pure functions.

One annotation per (image, category) present in the label map: ``segmentation`` is compressed
RLE with ``counts`` a string, ``area`` and ``bbox`` come from pycocotools, ``iscrowd`` is 0 and
``score`` is the class score. Category ids are the input's (COCO ids when the input is COCO).

Ignore policy: background (0) and ignore (255) pixels get no annotation. So that the COCO file
alone still decodes to the exact label map, an image's ignore pixels are stored on its ``images``
entry as ``ignore_segmentation`` (compressed RLE, absent when there are none); the PNG label maps
and the stats show them as well.

Image ids: the image ids themselves when every id is a canonical decimal integer (COCO inputs),
else 1..N in order; the original string id is kept as ``source_id`` on each image.
``file_name`` is the image's, as the caller names it (``ImageName.file_name``: the input's
COCO ``file_name``, or the manifest's uri), so a trainer finds the picture, not the label map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.types import IGNORE, check_class_id

SCORE_DIGITS = 6  # scores are rounded so the JSON stays short; float32 carries ~7 digits anyway


class HasIdName(Protocol):
    id: int
    name: str


def categories_json(categories: Sequence[HasIdName | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO ``categories``: ``{"id", "name", "supercategory"}`` sorted by id (1..254, unique).

    Accepts ``pipeline.types.Category`` objects or mappings with ``id``/``name`` (as in a COCO file).
    """
    out: list[dict[str, Any]] = []
    for c in categories:
        cid, name = (c["id"], c["name"]) if isinstance(c, Mapping) else (c.id, c.name)
        sup = c.get("supercategory", "") if isinstance(c, Mapping) else ""
        cid = check_class_id(cid, f"category {name!r}: id")
        out.append({"id": cid, "name": str(name), "supercategory": str(sup)})
    ids: list[int] = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"category ids must be unique, got {sorted(ids)}")
    return sorted(out, key=lambda c: c["id"])


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """[H, W, N] bool/uint8 masks -> N compressed RLEs ``{"size": [H, W], "counts": str}``."""
    if masks.ndim != 3:
        raise ValueError(f"expected [H, W, N] masks, got shape {masks.shape}")
    rles = mask_utils.encode(np.asfortranarray(masks, dtype=np.uint8))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Compressed RLE (``counts`` str or bytes) -> [H, W] uint8 mask of 0/1."""
    counts = rle["counts"]
    return mask_utils.decode(
        {"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    )


def _check_label_map(label_map: np.ndarray) -> None:
    if not isinstance(label_map, np.ndarray) or label_map.ndim != 2 or label_map.dtype != np.uint8:
        got = f"{label_map.dtype} {label_map.shape}" if isinstance(label_map, np.ndarray) else type(label_map).__name__
        raise ValueError(f"expected an [H, W] uint8 label map, got {got}")


def image_annotations(
    label_map: np.ndarray, image_id: int, scores: Mapping[int, float], known: set[int], first_id: int = 1
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """[H, W] uint8 label map -> (ignore RLE or None, annotations sorted by category id).

    ``scores``: class score per category id; ``known``: the category ids allowed in the map.
    Annotation ids run from ``first_id``.
    """
    _check_label_map(label_map)
    present = np.flatnonzero(np.bincount(label_map.ravel(), minlength=256))  # np.unique without a sort
    ids = [int(v) for v in present if v not in (0, IGNORE)]
    unknown = sorted(set(ids) - known)
    if unknown:
        raise ValueError(f"image {image_id}: label map holds ids {unknown} that are not in the categories")
    rles = encode_masks(_fortran_masks(label_map, ids + [IGNORE]))
    raw = _bytes_rles(rles)
    areas, boxes = mask_utils.area(raw), mask_utils.toBbox(raw)
    anns = [
        {"id": first_id + i, "image_id": image_id, "category_id": cid, "segmentation": rles[i],
         "area": int(areas[i]), "bbox": [float(v) for v in boxes[i]], "iscrowd": 0,
         "score": round(float(scores.get(cid, 0.0)), SCORE_DIGITS)}
        for i, cid in enumerate(ids)
    ]  # fmt: skip
    return (rles[-1] if IGNORE in present else None), anns


def _fortran_masks(label_map: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """[H, W, N] uint8 0/1 masks ``label_map == values[n]``, built in the column-major order
    pycocotools encodes from (``label_map[:, :, None] == values`` plus a Fortran copy, in one pass)."""
    height, width = label_map.shape
    out = np.empty((len(values), width, height), dtype=bool)  # C order [N, W, H] = Fortran [H, W, N]
    np.equal(label_map.T[None], np.array(values, dtype=np.uint8)[:, None, None], out=out)
    return out.view(np.uint8).transpose(2, 1, 0)


def _bytes_rles(rles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]


def coco_image_ids(source_ids: Sequence[str]) -> list[int]:
    """COCO integer image ids for string ids: the ids themselves when all are canonical decimal
    integers (so COCO inputs keep their ids), else 1..N in the given order."""
    if all(s.isascii() and s.isdigit() and str(int(s)) == s for s in source_ids):
        ints = [int(s) for s in source_ids]
        if len(set(ints)) == len(ints):
            return ints
    return list(range(1, len(source_ids) + 1))


def build_coco(
    items: Sequence[tuple[str, np.ndarray, Mapping[int, float], str]],
    categories: Sequence[HasIdName | Mapping[str, Any]],
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A COCO document from ``(source_id, [H, W] uint8 label map, scores by category, file_name)``
    items, in the given order; ``file_name``: the image's file name (see the module docstring)."""
    cats = categories_json(categories)
    known = {c["id"] for c in cats}
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for coco_id, (source_id, label_map, scores, file_name) in zip(
        coco_image_ids([it[0] for it in items]), items, strict=True
    ):
        ignore, image_anns = image_annotations(label_map, coco_id, scores, known, len(anns) + 1)
        image = {"id": coco_id, "source_id": source_id, "file_name": file_name,
                 "height": int(label_map.shape[0]), "width": int(label_map.shape[1])}  # fmt: skip
        if ignore is not None:
            image["ignore_segmentation"] = ignore
        images.append(image)
        anns.extend(image_anns)
    return {"info": dict(info or {}), "licenses": [], "images": images, "annotations": anns, "categories": cats}


def merge_coco(docs: Sequence[Mapping[str, Any]], info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Concatenate COCO documents (shards, in the given order) with renumbered image and
    annotation ids; the categories of every document must be identical."""
    if not docs:
        raise ValueError("merge_coco needs at least one COCO document")
    cats = docs[0]["categories"]
    for i, doc in enumerate(docs):
        if doc["categories"] != cats:
            raise ValueError(
                f"COCO document {i} has different categories from document 0; shards of one run share them"
            )
    images = [img for doc in docs for img in doc["images"]]
    new_ids = coco_image_ids([img["source_id"] for img in images])
    remap = {(d, img["id"]): new for (d, img), new in zip(_doc_images(docs), new_ids, strict=True)}
    out_images = [{**img, "id": new} for img, new in zip(images, new_ids, strict=True)]
    out_anns: list[dict[str, Any]] = []
    for d, doc in enumerate(docs):
        for ann in doc["annotations"]:
            out_anns.append({**ann, "id": len(out_anns) + 1, "image_id": remap[(d, ann["image_id"])]})
    return {"info": dict(info or {}), "licenses": [], "images": out_images, "annotations": out_anns, "categories": cats}


def _doc_images(docs: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    return [(d, img) for d, doc in enumerate(docs) for img in doc["images"]]


def decode_label_map(image: Mapping[str, Any], annotations: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A COCO ``images`` entry and its annotations -> the [H, W] uint8 label map they encode."""
    out = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    for ann in annotations:
        out[decode_rle(ann["segmentation"]).astype(bool)] = ann["category_id"]
    if "ignore_segmentation" in image:
        out[decode_rle(image["ignore_segmentation"]).astype(bool)] = IGNORE
    return out
