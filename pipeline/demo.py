"""A self-contained demo dataset: a few photographs that scikit-image ships, tagged and outlined
by hand in a COCO instances file, plus tiny random-weight models built from configs.

It exists so a newcomer can run the whole job (label, resume, merge, audit) in a couple of minutes
with no GPU and no downloaded weights. Random weights exercise the pipeline, not label quality:
the masks and the audit's scores mean nothing until real weights are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# COCO category ids, so the demo's files look like a COCO split.
CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 19, "name": "horse", "supercategory": "animal"},
    {"id": 47, "name": "cup", "supercategory": "kitchen"},
]

# (skimage.data function, category id, ground truth): a box (x0, y0, x1, y1) drawn by eye around the
# object, or "silhouette" where the picture is itself the object's mask (skimage's horse).
PHOTOS = [
    ("astronaut", 1, (140, 30, 460, 512)),
    ("chelsea", 17, (60, 0, 420, 300)),
    ("coffee", 47, (150, 20, 500, 340)),
    ("camera", 1, (110, 40, 360, 430)),
    ("horse", 19, "silhouette"),
]


@dataclass(frozen=True)
class DemoInputs:
    images: Path  # folder of JPEGs
    annotations: Path  # COCO instances JSON: tags and (rough) ground truth
    clip_config: Path
    clip_checkpoint: Path
    sd_dir: Path


def _photo(name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(HWC uint8 RGB picture, the object's mask when the picture is a silhouette)."""
    from skimage import data

    picture = getattr(data, name)()
    if picture.dtype == bool:  # the horse: True is background, False the animal
        mask = ~picture
        return np.repeat(np.where(picture, 235, 40).astype(np.uint8)[..., None], 3, axis=2), mask
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    return np.ascontiguousarray(picture[..., :3]), None


def _annotation(ann_id: int, image_id: int, category: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return {"id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": 0, "segmentation": rle,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)]}  # fmt: skip


def write_dataset(root: str | Path) -> tuple[Path, Path]:
    """Write ``root/images/*.jpg`` and ``root/instances.json`` (COCO instances); returns both paths.
    Deterministic: the same files on every call."""
    root = Path(root)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, (name, category, truth) in enumerate(PHOTOS, start=1):
        picture, silhouette = _photo(name)
        h, w = picture.shape[:2]
        Image.fromarray(picture).save(images_dir / f"{name}.jpg", quality=90)
        if truth == "silhouette":
            mask = silhouette
        else:
            x0, y0, x1, y1 = truth
            mask = np.zeros((h, w), bool)
            mask[y0:y1, x0:x1] = True
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": h, "width": w})
        annotations.append(_annotation(image_id, image_id, category, mask))
    doc = {"info": {"description": "tag2mask demo: scikit-image sample photographs, rough hand-drawn truth"},
           "images": images, "annotations": annotations, "categories": CATEGORIES}  # fmt: skip
    path = root / "instances.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return images_dir, path


def prepare(root: str | Path) -> DemoInputs:
    """The dataset and tiny random-weight models (open_clip config + state dict, diffusers folder),
    written with the real save code under ``root``."""
    from pipeline.bench.architectures import save_models

    root = Path(root)
    images, annotations = write_dataset(root / "dataset")
    models = root / "models"
    if not (models / "sd" / "unet" / "config.json").is_file():
        save_models(models)
    return DemoInputs(images, annotations, models / "cliper-tiny.json", models / "clip.pt", models / "sd")
