"""The benchmark's inputs and models: synthetic JPEGs, random-weight models of a size, labelers
at a batch size, and synchronised clocks."""

from __future__ import annotations

import copy
import dataclasses
import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from pipeline import compensation
from pipeline.bench.architectures import clip_models, sd_models
from pipeline.config import Config, build_config
from pipeline.labeler import Labeler
from pipeline.models import DTYPES, ClipModels
from pipeline.types import Category

# size -> (open_clip architecture, SD shape, preset)
SIZES = {
    "tiny": ("tiny", "tiny", "voc-vit-b16"),
    "vit-b16": ("ViT-B-16", "sd21-base", "voc-vit-b16"),
    "vit-l14": ("ViT-L-14", "sd21-base", "voc-vit-l14"),
}
STAGES = ("decode", "clip_coarse", "vae_encode", "unet_capture", "compensation", "superpixels", "label_assembly",
          "encode_write")  # fmt: skip
CPU_STAGES = ("decode", "superpixels", "label_assembly", "encode_write")
SECTIONS = ("stages", "batch", "dtype", "chain", "busy", "cpu", "speedwork", "flops")
CLASS_NAMES = ("cat", "dog", "person", "car", "tree", "bird", "boat", "chair")
# NVIDIA H100 datasheet (SXM5, dense, i.e. without the 2:4 sparsity factor).
H100 = {"bf16_tflops": 989.4, "tf32_tflops": 494.7, "fp32_tflops": 66.9, "hbm_tb_s": 3.35}
GOAL_IMAGES_PER_S = 50.0
FINGERPRINT = "0" * 64


# ---------------------------------------------------------------- inputs and models


def synthetic_jpeg(seed: int, w: int = 500, h: int = 375) -> bytes:
    """A 500 x 375 (VOC-sized) JPEG of smooth random colour blobs."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h // 25, w // 25, 3), dtype=np.uint8)
    big = Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Models:
    """A random-weight CLIP + SD pair of one size, dtype and device."""

    size: str
    clip: ClipModels
    sd: compensation.SDModels
    dtype: str = "float32"


def build_models(size: str, device: str) -> Models:
    """float32 models of ``size`` (seed 0) on ``device``."""
    clip_name, sd_shape, _ = SIZES[size]
    return Models(size, clip_models(clip_name, device=device), sd_models(sd_shape, device=device))


def cast_models(models: Models, dtype: str) -> Models:
    """A copy of ``models`` in ``dtype`` (the same weights, rounded)."""
    if dtype == models.dtype:
        return models
    dt = DTYPES[dtype]
    clip = dataclasses.replace(models.clip, model=copy.deepcopy(models.clip.model).to(dtype=dt))
    sd = dataclasses.replace(
        models.sd, vae=copy.deepcopy(models.sd.vae).to(dtype=dt), unet=copy.deepcopy(models.sd.unet).to(dtype=dt),
        empty_embedding=models.sd.empty_embedding.to(dtype=dt),
    )  # fmt: skip
    return Models(models.size, clip, sd, dtype)


def categories(n_tags: int) -> list[Category]:
    return [Category(i + 1, name, name) for i, name in enumerate(CLASS_NAMES[:n_tags])]


def preset_config(models: Models, batch_size: int = 1) -> Config:
    """The size's preset on the models' device and dtype."""
    device = str(models.clip.model.logit_scale.device)
    return build_config(SIZES[models.size][2], {"batch_size": batch_size,
                                                "model": {"device": device, "dtype": models.dtype}})  # fmt: skip


def make_labeler(models: Models, batch_size: int, n_tags: int) -> Labeler:
    """A labeler over ``models`` with the size's preset, timing with device synchronisation.
    Construction embeds every background class (seconds to a minute on a CPU at full size)."""
    return Labeler(models.clip, models.sd, preset_config(models, batch_size), categories(n_tags), sync_timings=True)


def with_batch_size(labeler: Labeler, batch_size: int) -> Labeler:
    """A shallow copy with another batch size: models and text embeddings shared, not rebuilt."""
    other = copy.copy(labeler)
    other.config = dataclasses.replace(labeler.config, batch_size=batch_size)
    return other


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock(device: torch.device | str) -> float:
    """``time.perf_counter`` after synchronising ``device``."""
    synchronize(device)
    return time.perf_counter()


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, the device synchronised around each."""
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and convolutions ``fn`` runs (torch FlopCounterMode; a multiply-add
    counts 2; elementwise ops, norms and softmax are not counted)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def compile_unet(sd: compensation.SDModels, captured: Sequence[str]) -> list[str]:
    """``torch.compile`` (in place, ``nn.Module.compile``) every top-level UNet part that holds
    none of the ``captured`` attention layers: the capture swaps those layers' processors per call
    and stops the pass inside their block, which a compiled graph would recompile or break on; the
    parts before it run unchanged every batch. Returns the names compiled."""
    names = []
    for name, module in sd.unet.named_children():
        parts = module if isinstance(module, torch.nn.ModuleList) else [module]
        for i, part in enumerate(parts):
            full = f"{name}.{i}" if isinstance(module, torch.nn.ModuleList) else name
            if not any(c == full or c.startswith(full + ".") for c in captured) and any(
                True for _ in part.parameters()
            ):
                part.compile()
                names.append(full)
    return names
