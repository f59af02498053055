"""Loading CLIP (open_clip) and Stable Diffusion (diffusers), and the models' fingerprint.

Weights are resolved to local files first, for both models, before anything is loaded: a missing
checkpoint gives one ``WeightsUnavailableError`` that names every missing piece, where it was
looked for and how to provide it, and leaves nothing half-loaded. Checkpoints load with
``weights_only=True`` (open_clip) or from safetensors (diffusers), never as arbitrary pickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.compensation import SDModels
from pipeline.config import ClipConfig, ModelConfig, SDConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What compensation needs from a diffusers checkpoint, and nothing else.
SD_FILES = (
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json",
    "text_encoder/model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
)  # fmt: skip


class WeightsUnavailableError(RuntimeError):
    """Model weights are neither given locally, nor cached, nor downloadable."""


@dataclass
class ClipModels:
    """An open_clip model with its own preprocessing facts."""

    model: Any  # open_clip CLIP
    tokenizer: Any
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class _ClipWeights:
    name: str
    path: str
    tag_cfg: dict[str, Any]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's per-retry warnings; a failure is reported once, by us."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _clip_name(model: str) -> str:
    import open_clip

    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"CLIP model config {model} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {model!r}: give a name from open_clip.list_models() or a config .json path"
        )
    return model


def _resolve_clip(cfg: ClipConfig) -> _ClipWeights:
    import open_clip

    name = _clip_name(cfg.model)
    tag_cfg = dict(open_clip.get_pretrained_cfg(name, cfg.pretrained)) if cfg.pretrained else {}
    if cfg.pretrained and not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"open_clip has no pretrained tag {cfg.pretrained!r} for {name}; known tags: {tags}")
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise WeightsUnavailableError(f"CLIP checkpoint file {cfg.checkpoint} does not exist.")
        return _ClipWeights(name, cfg.checkpoint, tag_cfg)
    if not tag_cfg:
        raise ValueError(f"CLIP {name}: give a pretrained tag (--clip-pretrained) or a checkpoint (--clip-checkpoint)")
    try:
        with _quiet_hub():
            path = open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # any download failure becomes one actionable message
        raise WeightsUnavailableError(
            f"CLIP weights {name} / {cfg.pretrained} (hub: {tag_cfg.get('hf_hub') or tag_cfg.get('url')}) "
            f"are not in the Hugging Face cache {_hub_cache()} and could not be downloaded "
            f"({type(err).__name__}). Provide them with --clip-checkpoint FILE (an open_clip state "
            f"dict or .safetensors), or point HF_HOME at a cache that holds them."
        ) from None
    if not path:
        raise WeightsUnavailableError(f"CLIP weights {name} / {cfg.pretrained} have no download source")
    return _ClipWeights(name, path, tag_cfg)


def _resolve_sd(cfg: SDConfig) -> Path:
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not (path / "unet" / "config.json").is_file():
            raise WeightsUnavailableError(
                f"Stable Diffusion checkpoint {path} is not a diffusers-format directory "
                f"(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/ inside)."
            )
        return path
    from huggingface_hub import snapshot_download

    try:
        with _quiet_hub():
            return Path(snapshot_download(cfg.model, allow_patterns=list(SD_FILES)))
    except Exception as err:  # any download failure becomes one actionable message
        raise WeightsUnavailableError(
            f"Stable Diffusion weights {cfg.model} (safetensors of unet, vae, text_encoder, plus "
            f"tokenizer and scheduler) are not in the Hugging Face cache {_hub_cache()} and could "
            f"not be downloaded ({type(err).__name__}). Provide them with --sd-checkpoint DIR (a "
            f"diffusers-format directory), or point HF_HOME at a cache that holds them."
        ) from None


def resolve_weights(cfg: ModelConfig) -> tuple[_ClipWeights, Path]:
    """Local paths of both models' weights, downloading where allowed; raises one error that lists
    everything missing."""
    problems: list[str] = []
    resolved: list[Any] = []
    for resolve, part in ((_resolve_clip, cfg.clip), (_resolve_sd, cfg.sd)):
        try:
            resolved.append(resolve(part))  # type: ignore[operator]
        except WeightsUnavailableError as err:
            problems.append(str(err))
    if problems:
        raise WeightsUnavailableError("Missing model weights:\n  - " + "\n  - ".join(problems))
    return resolved[0], resolved[1]


def build_clip(weights: _ClipWeights, device: torch.device, dtype: torch.dtype) -> ClipModels:
    import open_clip

    tag = weights.tag_cfg
    model, _, _ = open_clip.create_model_and_transforms(
        weights.name,
        pretrained=weights.path,
        force_quick_gelu=bool(tag.get("quick_gelu", False)),
        weights_only=True,
    )
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pre = model.visual.preprocess_cfg
    patch = model.visual.conv1.stride[0]
    return ClipModels(
        model=model,
        tokenizer=open_clip.get_tokenizer(weights.name),
        patch_size=int(patch),
        mean=tuple(tag.get("mean") or pre["mean"]),
        std=tuple(tag.get("std") or pre["std"]),
    )


def build_sd(path: Path, device: torch.device, dtype: torch.dtype) -> SDModels:
    """VAE encoder, UNet and scheduler from a diffusers directory; the text encoder is used once
    for the empty-prompt embedding and then released."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    scheduler_cls = getattr(diffusers, sched_cfg["_class_name"], None)
    if scheduler_cls is None:
        raise ValueError(f"{path}/scheduler names an unknown diffusers scheduler {sched_cfg['_class_name']!r}")
    scheduler = scheduler_cls.from_config(sched_cfg)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True)
    ids = tokenizer(
        "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        empty = text_encoder(ids)[0].to(device=device, dtype=dtype)
    del text_encoder
    vae = diffusers.AutoencoderKL.from_pretrained(path / "vae", use_safetensors=True, torch_dtype=dtype)
    vae.decoder = None  # compensation only encodes
    vae.post_quant_conv = None
    unet = diffusers.UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True, torch_dtype=dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    unet = unet.to(device).eval().requires_grad_(False)
    return SDModels(vae=vae, unet=unet, scheduler=scheduler, empty_embedding=empty)


def load_models(cfg: ModelConfig) -> tuple[ClipModels, SDModels]:
    """Both models on ``cfg.device`` in ``cfg.dtype``, resolving all weights before loading any."""
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    clip_weights, sd_path = resolve_weights(cfg)
    return build_clip(clip_weights, device, dtype), build_sd(sd_path, device, dtype)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_digest(path: Path) -> str:
    h = hashlib.sha256()
    for pattern in SD_FILES:
        for file in sorted(path.glob(pattern)):
            if file.is_file():
                h.update(f"{file.relative_to(path).as_posix()}:{file_sha256(file)}\n".encode())
    return h.hexdigest()


def model_fingerprint(cfg: ModelConfig) -> dict[str, Any]:
    """What identifies the weights: names, tags and content hashes of the files used, and dtype.

    Equal fingerprints mean equal weights, wherever the files live.
    """
    clip_weights, sd_path = resolve_weights(cfg)
    clip_model = cfg.clip.model
    if clip_model.endswith(".json"):
        clip_model = f"{Path(clip_model).stem}@{file_sha256(clip_model)[:16]}"
    return {
        "clip": {"model": clip_model, "pretrained": cfg.clip.pretrained, "sha256": file_sha256(clip_weights.path)},
        "sd": {"model": cfg.sd.model if not cfg.sd.checkpoint else None, "sha256": _dir_digest(sd_path)},
        "dtype": cfg.dtype,
    }
