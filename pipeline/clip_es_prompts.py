"""Prompt data of CLIP-ES (Lin et al., CVPR 2023), as the published code uses it (data, not code).

Source: ``linyq2117/CLIP-ES`` ``clip_text.py`` (synonym class names, background categories) and
``generate_cams_voc12.py`` / ``generate_cams_coco14.py`` (template, box threshold). The synonym
strings are kept byte for byte, odd spellings included (``sknowboard``, no space after commas in
``person with clothes,people,human``): they are what the published text features were computed from.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.prompts import COCO_CLASSES, VOC_CLASSES

TEMPLATE = "a clean origami {}."

VOC_BACKGROUND: tuple[str, ...] = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)  # fmt: skip

# BACKGROUND_CATEGORY_COCO: the VOC list without "keyboard" and "sign" (both are COCO classes or parts).
COCO_BACKGROUND: tuple[str, ...] = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))

# The datasets' category names in category-id order (the same lists CLIPer's presets use).
VOC_NAMES: tuple[str, ...] = VOC_CLASSES
VOC_SYNONYMS: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird avian", "boat", "bottle", "bus", "car", "cat", "chair seat", "cow",
    "diningtable", "dog", "horse", "motorbike", "person with clothes,people,human", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor screen",
)  # fmt: skip

# COCO's 80 official category names (the order of the published class_names_coco, which spells
# five of them the VOC way: motorbike, aeroplane, sofa, pottedplant, diningtable, tvmonitor).
COCO_NAMES: tuple[str, ...] = COCO_CLASSES
COCO_SYNONYMS: tuple[str, ...] = (
    "person with clothes,people,human", "bicycle", "car", "motorbike", "aeroplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird avian", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "backpack,bag", "umbrella,parasol", "handbag,purse", "necktie", "suitcase", "frisbee", "skis",
    "sknowboard", "sports ball", "kite", "baseball bat", "glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "dessertspoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair seat", "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor screen",
    "laptop", "mouse", "remote control", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hairdrier,blowdrier",
    "toothbrush",
)  # fmt: skip

SYNONYMS: dict[str, dict[str, str]] = {
    "voc": dict(zip(VOC_NAMES, VOC_SYNONYMS, strict=True)),
    "coco": dict(zip(COCO_NAMES, COCO_SYNONYMS, strict=True)),
}
BACKGROUNDS: dict[str, tuple[str, ...]] = {"voc": VOC_BACKGROUND, "coco": COCO_BACKGROUND}
# scoremap2bbox threshold of the CAA box mask: 0.4 in generate_cams_voc12.py, 0.7 in generate_cams_coco14.py.
BOX_THRESHOLDS: dict[str, float] = {"voc": 0.4, "coco": 0.7}


def _dataset(dataset: str) -> str:
    if dataset not in SYNONYMS:
        raise ValueError(f"CLIP-ES prompts exist for {sorted(SYNONYMS)}, not {dataset!r}")
    return dataset


def class_prompts(names: Sequence[str], dataset: str) -> list[str]:
    """The published synonym string of each dataset class name (``cat`` -> ``cat``,
    ``person`` -> ``person with clothes,people,human``). Raises ValueError for a name the
    published list does not hold: CLIP-ES has no rule for other classes."""
    table = SYNONYMS[_dataset(dataset)]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(
            f"{unknown} not among CLIP-ES's {dataset} classes; pass the dataset's own names "
            f"(e.g. {list(table)[:3]}) or give the prompts directly"
        )
    return [table[n] for n in names]


def background_prompts(dataset: str) -> tuple[str, ...]:
    """The published background category list for ``dataset`` (``voc``: 25 words, ``coco``: 23)."""
    return BACKGROUNDS[_dataset(dataset)]
