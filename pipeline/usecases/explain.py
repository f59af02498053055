"""What the labeler sees for one image and its tags: ``explain_image`` and the ``explain`` command in
front of it (``jobs/explain.py``, ``tag2mask explain``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cli import add_discovery_arguments, add_model_arguments, config_from_args
from pipeline.config import Config
from pipeline.decode import ImageDecodeError, read_image
from pipeline.labeler import Labeler
from pipeline.models import WeightsUnavailableError
from pipeline.prompts import DATASET_CLASSES, class_prompt
from pipeline.types import IGNORE, Category, LabelRequest, LabelResult

DESCRIPTION = """Show what the labeler sees for one image and its tags.

    python jobs/explain.py --image cat.jpg --tags cat,dog --out explain/ [--dump explain/maps.npz]
    python jobs/explain.py --preset clip-es-voc --image cat.jpg --tags cat --out explain/   # CLIP-ES

The text candidates are the preset's dataset classes (VOC's 20 or COCO's 80, as the published
evaluation embeds them), or the names given with --categories; the tags must be among them.

Writes one heatmap PNG per map the method keeps (CLIPer: coarse.png, refined.png; CLIP-ES:
cam.png at token resolution, refined.png at image size, box_mask.png), overlay.png (the label map
over the image) and, with --dump, the raw arrays as .npz: those maps by the same names, plus
coarse / refined / scores / label map under fixed names for every method. With --discovery also
regions.png (each discovered region with its id and suggested class) and, in the .npz,
region_map.
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The ``explain`` command's options (jobs/explain.py and ``tag2mask explain``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--image", required=True, help="image path (local or fsspec URL)")
    p.add_argument("--tags", required=True, help="comma-separated class names present in the image")
    p.add_argument("--categories", help="comma-separated candidate classes (default: the preset's dataset classes)")
    p.add_argument("--image-id", help="id that seeds the diffusion noise (default: file name without extension)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dump", metavar="FILE.npz", help="also save the raw arrays here")
    add_model_arguments(p)
    add_discovery_arguments(p)
    return p


def _heatmaps(image: np.ndarray, maps: np.ndarray, names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 4), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image")
    h, w = image.shape[:2]
    for ax, m, name in zip(axes[0, 1:], maps, names, strict=True):
        up = np.asarray(Image.fromarray(m.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
        ax.imshow(image)
        im = ax.imshow(up, cmap="jet", alpha=0.5)
        ax.set_title(f"{title}: {name}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes[0]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _overlay(image: np.ndarray, result: LabelResult, names: dict[int, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cmap = plt.get_cmap("tab10")
    colors = {cid: np.array(cmap(i % 10)[:3]) for i, cid in enumerate(result.class_ids)}
    colors[IGNORE] = np.ones(3)
    out = image.astype(np.float32) / 255.0
    for cid, color in colors.items():
        mask = result.label_map == cid
        out[mask] = 0.45 * out[mask] + 0.55 * color
    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / image.shape[1]))
    ax.imshow(out)
    ax.axis("off")
    handles = [Patch(color=colors[c], label=f"{c}: {names[c]}") for c in result.class_ids]
    if (result.label_map == IGNORE).any():
        handles.append(Patch(color=colors[IGNORE], label="255: ignore"))
    ax.legend(handles=handles, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _regions_panel(image: np.ndarray, region_map: np.ndarray, result: LabelResult, path: Path) -> None:
    """The image with each discovered region tinted, labelled "id: suggested class (score)"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cmap = plt.get_cmap("tab20")
    out = image.astype(np.float32) / 255.0
    handles = []
    for k, (name, score) in enumerate(result.suggestions, start=1):
        mask = region_map == k
        color = cmap((k - 1) % 20)[:3]
        out[mask] = 0.4 * out[mask] + 0.6 * np.array(color)
        handles.append(Patch(color=color, label=f"{k}: {name} ({score:.2f})"))
    fig, ax = plt.subplots(figsize=(8, 8 * image.shape[0] / image.shape[1]))
    ax.imshow(out)
    ax.axis("off")
    ax.set_title(f"discovery: {len(handles)} untagged region(s), suggested classes")
    if handles:
        ax.legend(handles=handles, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def region_map_of(result: LabelResult) -> np.ndarray | None:
    """[H, W] uint16 region map of a result with discovery (kept, or drawn from its regions in
    the modes that do not keep one); None without discovery."""
    if result.regions is None:
        return None
    return result.region_map if result.region_map is not None else result.regions.region_map(result.label_map.shape)


def candidate_categories(names: str | None, prompt_set: str) -> list[Category]:
    """``--categories`` (or the prompt set's dataset classes) as categories with ids 1..C."""
    listed = [n.strip() for n in names.split(",") if n.strip()] if names else list(DATASET_CLASSES[prompt_set])
    if len(set(listed)) != len(listed):
        raise ValueError(f"--categories lists a class twice: {listed}")
    return [Category(i + 1, n, class_prompt(n, prompt_set)) for i, n in enumerate(listed)]


@dataclass(frozen=True)
class Explanation:
    """One labeled image and what was drawn of it: the result, category names by id, and the
    maps drawn as heatmaps (name -> [C, h, w] float array)."""

    result: LabelResult
    names: dict[int, str]
    maps: dict[str, np.ndarray]


def explain_image(config: Config, image_path: str, tags: Sequence[str], out: str, *,
                  categories: str | None = None, image_id: str | None = None,
                  dump: str | None = None) -> Explanation:  # fmt: skip
    """Label one image with ``tags`` (names among the candidates: ``categories``, comma-separated,
    or the preset's dataset classes) and write a heatmap PNG per map, overlay.png and, with
    ``dump``, the raw arrays (.npz). Raises ``ValueError`` (unknown tags), ``ImageDecodeError``,
    ``FileNotFoundError`` or ``WeightsUnavailableError``."""
    if not tags:
        raise ValueError("--tags needs at least one class name")
    image = read_image(image_path)
    cands = candidate_categories(categories, config.cliper.prompt_set)
    by_name = {c.name: c for c in cands}
    missing = [t for t in tags if t not in by_name]
    if missing:
        raise ValueError(f"--tags {missing} are not candidate classes; add them to --categories "
                         f"(candidates: {', '.join(by_name)})")  # fmt: skip
    labeler = Labeler.from_config(config, cands)
    key = image_id or Path(image_path).stem
    result = labeler.label([LabelRequest(key, image, tuple(by_name[t].id for t in tags))])[0]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    names = {c.id: c.name for c in cands}
    shown = [names[c] for c in result.class_ids]
    maps = result.maps or {"coarse": result.coarse, "refined": result.compensated}
    for name, m in maps.items():
        _heatmaps(image, m.astype(np.float32), shown, name, folder / f"{name}.png")
    _overlay(image, result, names, folder / "overlay.png")
    region_map = region_map_of(result)
    if region_map is not None:
        _regions_panel(image, region_map, result, folder / "regions.png")
    if dump:
        Path(dump).parent.mkdir(parents=True, exist_ok=True)
        fixed = dict(coarse=result.coarse, refined=result.compensated, coarse_scores=result.coarse_scores,
                     final_scores=result.final_scores, label_map=result.label_map,
                     class_ids=np.array(result.class_ids), class_names=np.array(shown),
                     method=np.array(config.method), maps=np.array(list(maps)))  # fmt: skip
        arrays: dict[str, Any] = {**fixed, **maps}
        if region_map is not None:
            arrays.update(region_map=region_map, suggested_classes=np.array([n for n, _ in result.suggestions]))
        np.savez_compressed(dump, **arrays)
    return Explanation(result, names, maps)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The ``explain`` command; exit status 0, or 2 on a bad image, tag or weights."""
    args = build_parser(prog).parse_args(argv)
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    if not tags:
        raise SystemExit("--tags needs at least one class name")
    try:
        config = config_from_args(args)
        done = explain_image(config, args.image, tags, args.out, categories=args.categories,
                             image_id=args.image_id, dump=args.dump)  # fmt: skip
    except (WeightsUnavailableError, ImageDecodeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result, names = done.result, done.names
    for k, cid in enumerate(result.class_ids):
        share = float((result.label_map == cid).mean())
        print(f"{cid:>3} {names[cid]:<20} final score {result.final_scores[k]:.3f}  area {share:.1%}")
    pngs = ", ".join(f"{name}.png" for name in done.maps)
    print(f"wrote {args.out}/{pngs}, overlay.png" + (f" and {args.dump}" if args.dump else ""))
    return 0
