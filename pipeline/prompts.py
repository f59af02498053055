"""Prompt data used by the published CLIPer settings (data, not code).

Source: ``shared/docs/cliper-method.md`` section 5. Templates are format strings with one ``{}``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

# The "car" template list, verbatim (no final period where the source shows none).
CAR_TEMPLATES: tuple[str, ...] = (
    "a clean origami {}.",
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def _as_format_string(template: Callable[[str], str] | str) -> str:
    # open_clip ships its templates as lambdas; evaluating one on "{}" gives the format string.
    return template if isinstance(template, str) else template("{}")


def _imagenet80() -> tuple[str, ...]:
    # open_clip imports torch: loaded when a run asks for these templates, not when config is read.
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(_as_format_string(t) for t in OPENAI_IMAGENET_TEMPLATES)


TEMPLATE_SETS: dict[str, Callable[[], tuple[str, ...]]] = {
    "car": lambda: CAR_TEMPLATES,
    "imagenet80": _imagenet80,
}

_VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road",
    "rock", "street", "valley", "bridge", "sign",
)  # fmt: skip

BACKGROUND_SETS: dict[str, tuple[str, ...]] = {
    "voc": _VOC_BACKGROUND,
    "coco": tuple(w for w in _VOC_BACKGROUND if w not in ("keyboard", "sign")),
}

# Dataset class name -> the prompt string the published settings use for it (checked line by line
# against the published class files data/voc/cls_voc21.txt and data/coco14/cls_coco81.txt).
CLASS_PROMPTS: dict[str, dict[str, str]] = {
    "voc": {
        "bird": "bird avian",
        "chair": "chair seat",
        "person": "person with clothes, people, human",
        "tvmonitor": "tvmonitor screen",
    },
    "coco": {
        "person": "person with cloth people human",
        "chair": "chair seat",
        "couch": "sofa",
        "potted plant": "pottedplant",
        "dining table": "diningtable",
        "tv": "tvmonitor",
        "airplane": "aeroplane",
        "motorcycle": "motorbike",
    },
}

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


# The 80 COCO category names in category-id order (instances_*.json), as the COCO presets'
# default class list where no manifest gives one (jobs/explain.py).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

DATASET_CLASSES: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES, "coco": COCO_CLASSES}


@functools.cache
def templates(name: str) -> tuple[str, ...]:
    """The template list registered under ``name`` (``car`` or ``imagenet80``)."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; choose one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]()


def background_classes(lines: Sequence[str]) -> tuple[str, ...]:
    """Background classes from config lines: a line listing words with commas gives one class
    per word (foreground lines with commas, by contrast, stay one prompt string)."""
    out: list[str] = []
    for line in lines:
        out.extend(word.strip() for word in line.split(",") if word.strip())
    return tuple(out)


def class_prompt(name: str, prompt_set: str) -> str:
    """The prompt string for a foreground class name under a dataset's prompt set."""
    if prompt_set not in CLASS_PROMPTS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose one of {sorted(CLASS_PROMPTS)}")
    return CLASS_PROMPTS[prompt_set].get(name, name)
