"""Loading CLIP (open_clip) and Stable Diffusion (diffusers), and the models' fingerprint.

Weights are resolved to local files first, for both models, before anything is loaded: a missing
checkpoint gives one ``WeightsUnavailableError`` that names every missing piece, where it was
looked for and how to provide it, and leaves nothing half-loaded. Checkpoints load with
``weights_only=True`` (open_clip) or from safetensors (diffusers), never as arbitrary pickles.

Where weights come from, in order: a checkpoint given as a local path or as a staged URL
(``s3://``, ``gs://``: copied once per node by ``pipeline.weights``); else the local Hugging Face
cache (the configured SD id, then its known alias); else the hub, only when it answers a single
short probe (``HF_HUB_OFFLINE`` skips it; an endpoint that did not answer is not tried again for
a minute). The fingerprint names weights by content, never by where they were found; the driver
pins hub revisions (``pin_weights``) and actors check what they load against its fingerprint.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch

from pipeline import weights
from pipeline.compensation import SDModels
from pipeline.config import SD_ALIASES, ClipConfig, ModelConfig, SDConfig
from pipeline.weights import WeightsUnavailableError, file_sha256

__all__ = ["WeightsUnavailableError", "WeightsMismatchError", "file_sha256", "load_models", "model_fingerprint",
           "pin_weights", "resolve_weights"]  # fmt: skip

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What compensation needs from a diffusers checkpoint, and nothing else.
SD_FILES = (
    "model_index.json", "scheduler/*", "tokenizer/*", "text_encoder/config.json",
    "text_encoder/model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
)  # fmt: skip
PROBE_TIMEOUT_S = 3.0
RETRY_AFTER_S = 60.0  # an endpoint that did not answer is not asked again for this long
_down_until: dict[str, float] = {}  # endpoint origin -> time.monotonic() before which it is not asked
_up_until: dict[str, float] = {}


class WeightsMismatchError(WeightsUnavailableError):
    """The weights a worker resolved differ in content from the ones the driver fingerprinted."""


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
    """``path``: local file, or a staged URL when resolved without fetching (then ``sha256`` is the
    manifest's); ``revision``: the hub commit it came from, if any."""

    name: str
    path: str
    tag_cfg: dict[str, Any]
    revision: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class _SDWeights:
    """``path``: local diffusers folder, or a staged URL when resolved without fetching (then
    ``digest`` comes from its manifest); ``repo``/``revision``: the hub id and commit, if any."""

    path: Path | str
    repo: str | None = None
    revision: str | None = None
    digest: str | None = None


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


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _mark_down(url: str) -> None:
    _down_until[_origin(url)] = time.monotonic() + RETRY_AFTER_S
    _up_until.pop(_origin(url), None)


def _unreachable(url: str) -> str | None:
    """Why ``url``'s server cannot be used for downloads now, or None when it answers.

    One HEAD request with a short timeout and no retries; the answer is remembered for a minute,
    so CLIP and SD resolution (and a second job step) share it instead of each retrying."""
    if _offline():
        return "HF_HUB_OFFLINE is set"
    origin, now = _origin(url), time.monotonic()
    if _down_until.get(origin, 0.0) > now:
        return f"{origin} did not answer less than {RETRY_AFTER_S:.0f} s ago"
    if _up_until.get(origin, 0.0) > now:
        return None
    try:
        urllib.request.urlopen(urllib.request.Request(origin, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # an HTTP answer, even an error status, means the network works
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets
        _mark_down(origin)
        reason = getattr(err, "reason", None) or err
        return f"{origin} could not be reached ({reason}); not retried for {RETRY_AFTER_S:.0f} s"
    _up_until[origin] = now + RETRY_AFTER_S
    return None


def _hub_answered(err: Exception) -> bool:
    """True when the hub answered with an HTTP error (a 404 for a withdrawn id or a missing
    file), False for a failed connection."""
    from huggingface_hub.errors import HfHubHTTPError

    return isinstance(err, HfHubHTTPError)


def _snapshot_commit(path: str | os.PathLike[str]) -> str | None:
    """The commit of a file or folder inside a hub cache snapshot (``.../snapshots/<commit>/...``)."""
    parts = Path(path).parts
    if "snapshots" in parts[:-1]:
        return parts[parts.index("snapshots") + 1]
    return None


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


def _safe_alternatives(filename: str) -> list[str]:
    """The .safetensors names open_clip publishes beside a pickle checkpoint, tried first."""
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors"]
    stem, dot, ext = filename.rpartition(".")
    return [f"{stem}.safetensors"] if dot and ext in ("bin", "pth", "pt") else []


def _clip_from_hub(tag_cfg: dict[str, Any], revision: str | None) -> tuple[str | None, str | None]:
    """(local file, why not) for an open_clip tag: the hub cache first, then one download attempt
    when the hub answers. Tags with only a URL use open_clip's own URL cache."""
    import open_clip
    from huggingface_hub import hf_hub_download

    hub = tag_cfg.get("hf_hub")
    if not hub:
        url = tag_cfg.get("url", "")
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if cached.is_file():
            return str(cached), None
        why = _unreachable(url)
        if why:
            return None, why
        try:
            return open_clip.download_pretrained(tag_cfg) or None, "no download source"
        except Exception as err:  # any download failure is reported once, by the caller
            _mark_down(url)
            return None, type(err).__name__
    repo, filename = os.path.split(hub)
    names = [*_safe_alternatives(filename or "open_clip_pytorch_model.bin"), filename or "open_clip_pytorch_model.bin"]
    for name in names:
        cached = _cached_file(repo, name, revision)
        if cached:
            return cached, None
    why = _unreachable(_hub_endpoint())
    if why:
        return None, why
    errors = []
    for name in names:
        try:
            with _quiet_hub():
                return hf_hub_download(repo, name, revision=revision), None
        except Exception as err:  # any download failure is reported once, by the caller
            errors.append(f"{name}: {type(err).__name__}")
            if not _hub_answered(err):
                _mark_down(_hub_endpoint())
                break
    return None, ", ".join(errors)


def _one_file(path: Path, url: str) -> str:
    """The checkpoint file of a fetched CLIP URL: the file itself, or the only file of its folder."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    if len(files) != 1:
        raise WeightsUnavailableError(f"CLIP checkpoint {url} holds {len(files)} files; name one file")
    return str(files[0])


def _resolve_clip(cfg: ClipConfig, storage_options: Mapping[str, Any], fetch: bool) -> _ClipWeights:
    import open_clip

    name = _clip_name(cfg.model)
    tag_cfg = dict(open_clip.get_pretrained_cfg(name, cfg.pretrained)) if cfg.pretrained else {}
    if cfg.pretrained and not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"open_clip has no pretrained tag {cfg.pretrained!r} for {name}; known tags: {tags}")
    if cfg.checkpoint and weights.is_remote(cfg.checkpoint):
        if fetch:
            local = weights.fetch(cfg.checkpoint, storage_options)
            return _ClipWeights(name, _one_file(local, cfg.checkpoint), tag_cfg)
        staged = weights.describe(cfg.checkpoint, storage_options)
        if len(staged.files) != 1:
            raise WeightsUnavailableError(f"CLIP checkpoint {cfg.checkpoint} holds {len(staged.files)} files; "
                                          "name one file, or a folder staged with one")  # fmt: skip
        return _ClipWeights(name, cfg.checkpoint, tag_cfg, sha256=next(iter(staged.files.values())))
    if cfg.checkpoint:
        if not Path(cfg.checkpoint).is_file():
            raise WeightsUnavailableError(f"CLIP checkpoint file {cfg.checkpoint} does not exist.")
        return _ClipWeights(name, cfg.checkpoint, tag_cfg)
    if not tag_cfg:
        raise ValueError(f"CLIP {name}: give a pretrained tag (--clip-pretrained) or a checkpoint (--clip-checkpoint)")
    path, why = _clip_from_hub(tag_cfg, cfg.revision)
    if not path:
        raise WeightsUnavailableError(
            f"CLIP weights {name} / {cfg.pretrained} (hub: {tag_cfg.get('hf_hub') or tag_cfg.get('url')}) "
            f"are not in the Hugging Face cache {_hub_cache()} and could not be downloaded ({why}). "
            f"Provide them with --clip-checkpoint FILE (an open_clip state dict or .safetensors, or an "
            f"s3://, gs:// URL staged with jobs/stage_weights.py), or point HF_HOME at a cache that holds them."
        )
    return _ClipWeights(name, path, tag_cfg, revision=_snapshot_commit(path))


def _sd_complete(path: Path) -> bool:
    fixed = [p for p in SD_FILES if "*" not in p] + ["scheduler/scheduler_config.json"]
    return all((path / p).is_file() for p in fixed) and any((path / "tokenizer").glob("*"))


def _cached_file(repo: str, filename: str, revision: str | None) -> str | None:
    """``filename`` of ``repo`` at ``revision`` (else its main ref) in the hub cache, or None.

    Reads the cache's files only: the hub client's own ``local_files_only`` calls still build
    request headers, which may contact the hub."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    return found if isinstance(found, str) else None


def _sd_local(repo: str, revision: str | None) -> Path | None:
    """A complete snapshot of ``repo`` (at ``revision``, else its main ref) in the hub cache."""
    found = _cached_file(repo, "unet/config.json", revision)
    if not found:
        return None
    path = Path(found).parents[1]
    return path if _sd_complete(path) else None


def _sd_from_hub(cfg: SDConfig) -> tuple[_SDWeights | None, str]:
    """The configured id (at the pinned revision), then its alias, in the local cache; then the
    hub, once, when it answers. Returns (weights, why not)."""
    from huggingface_hub import snapshot_download

    alias = SD_ALIASES.get(cfg.model)
    for repo, revision in ((cfg.model, cfg.revision), (alias, None)):
        path = _sd_local(repo, revision) if repo else None
        if path:
            return _SDWeights(path, repo, path.name), ""
    why = _unreachable(_hub_endpoint())
    if why:
        return None, why
    errors = []
    for repo, revision in ((cfg.model, cfg.revision), (alias, None)):
        if not repo:
            continue
        try:
            with _quiet_hub():
                path = Path(snapshot_download(repo, revision=revision, allow_patterns=list(SD_FILES)))
            return _SDWeights(path, repo, path.name), ""
        except Exception as err:  # any download failure is reported once, by the caller
            errors.append(f"{repo}: {type(err).__name__}")
            if not _hub_answered(err):  # a 404 (a withdrawn id) tries the alias; no network stops
                _mark_down(_hub_endpoint())
                break
    return None, "; ".join(errors)


def _checked_sd_dir(path: Path, shown: str) -> Path:
    if not (path / "unet" / "config.json").is_file():
        raise WeightsUnavailableError(
            f"Stable Diffusion checkpoint {shown} is not a diffusers-format directory "
            f"(expected unet/, vae/, text_encoder/, tokenizer/, scheduler/ inside)."
        )
    return path


def _resolve_sd(cfg: SDConfig, storage_options: Mapping[str, Any], fetch: bool) -> _SDWeights:
    if cfg.checkpoint and weights.is_remote(cfg.checkpoint):
        if fetch:
            return _SDWeights(_checked_sd_dir(weights.fetch(cfg.checkpoint, storage_options), cfg.checkpoint))
        staged = weights.describe(cfg.checkpoint, storage_options)
        if "unet/config.json" not in staged.files:
            raise WeightsUnavailableError(f"Stable Diffusion checkpoint {cfg.checkpoint} holds no unet/config.json")
        return _SDWeights(cfg.checkpoint, digest=_sd_digest(staged.files))
    if cfg.checkpoint:
        return _SDWeights(_checked_sd_dir(Path(cfg.checkpoint), cfg.checkpoint))
    found, why = _sd_from_hub(cfg)
    if found is None:
        alias = SD_ALIASES.get(cfg.model)
        also = f" (nor under its other id {alias})" if alias else ""
        raise WeightsUnavailableError(
            f"Stable Diffusion weights {cfg.model}{also} (safetensors of unet, vae, text_encoder, plus "
            f"tokenizer and scheduler) are not in the Hugging Face cache {_hub_cache()} and could "
            f"not be downloaded ({why}). Provide them with --sd-checkpoint DIR (a diffusers-format "
            f"directory), or --sd-checkpoint s3://... / gs://... (staged from a machine that has them "
            f"with jobs/stage_weights.py), or point HF_HOME at a cache that holds them."
        )
    return found


def resolve_weights(cfg: ModelConfig, storage_options: Mapping[str, Any] | None = None,
                    fetch: bool = True, need_sd: bool = True) -> tuple[_ClipWeights, _SDWeights | None]:  # fmt: skip
    """Where both models' weights are, downloading where allowed; raises one error that lists
    everything missing. ``fetch=False`` leaves staged URLs in place and reads only their manifests
    (enough to fingerprint them). ``need_sd=False`` (a method without SD: ``methods.needs_sd``)
    neither looks for nor downloads SD, and gives None in its place."""
    opts = dict(storage_options or {})
    problems: list[str] = []
    resolved: list[Any] = []
    steps: list[Callable[[], Any]] = [lambda: _resolve_clip(cfg.clip, opts, fetch)]
    if need_sd:
        steps.append(lambda: _resolve_sd(cfg.sd, opts, fetch))
    for step in steps:
        try:
            resolved.append(step())
        except WeightsUnavailableError as err:
            problems.append(str(err))
    if problems:
        raise WeightsUnavailableError("Missing model weights:\n  - " + "\n  - ".join(problems))
    return resolved[0], (resolved[1] if need_sd else None)


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


def load_models(cfg: ModelConfig, expected: Mapping[str, Any] | None = None,
                storage_options: Mapping[str, Any] | None = None,
                need_sd: bool = True) -> tuple[ClipModels, SDModels | None]:  # fmt: skip
    """Both models on ``cfg.device`` in ``cfg.dtype``, resolving all weights before loading any;
    with ``need_sd=False`` CLIP only (SD is None, and never looked for).

    ``expected``: the driver's ``model_fingerprint``; when given, the content of the files about to
    be loaded must match it, or WeightsMismatchError names the part that differs."""
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    clip_weights, sd_weights = resolve_weights(cfg, storage_options, need_sd=need_sd)
    if expected is not None:
        _check_expected(_fingerprint(cfg, clip_weights, sd_weights), expected, clip_weights, sd_weights)
    sd = build_sd(Path(sd_weights.path), device, dtype) if sd_weights is not None else None
    return build_clip(clip_weights, device, dtype), sd


def _check_expected(got: Mapping[str, Any], expected: Mapping[str, Any], clip: _ClipWeights,
                    sd: _SDWeights | None) -> None:  # fmt: skip
    if dict(got) == dict(expected):
        return
    sd_where = f"Stable Diffusion weights {sd.path}" if sd is not None else "Stable Diffusion weights (none here)"
    where = {"clip": f"CLIP weights {clip.path}", "sd": sd_where, "dtype": "dtype"}
    changed = [
        f"{where.get(part, part)}: here {json.dumps(got.get(part), sort_keys=True)}, "
        f"driver {json.dumps(expected.get(part), sort_keys=True)}"
        for part in sorted(set(got) | set(expected)) if got.get(part) != expected.get(part)
    ]  # fmt: skip
    raise WeightsMismatchError(
        "this worker resolved other weights than the driver fingerprinted: "
        + "; ".join(changed)
        + ". Give every node the same files (stage them with jobs/stage_weights.py and pass "
        "--clip-checkpoint / --sd-checkpoint URLs), then rerun"
    )


def _sd_selected(rel: str) -> bool:
    """Whether a file (path relative to a diffusers folder) is one of ``SD_FILES``."""
    return any(fnmatch(rel, p) and rel.count("/") == p.count("/") for p in SD_FILES)


def _sd_digest(digests: Mapping[str, str]) -> str:
    return weights.content_key({rel: d for rel, d in digests.items() if _sd_selected(rel)})


def _dir_digest(path: Path) -> str:
    files = (f for f in path.rglob("*") if f.is_file())
    return _sd_digest({f.relative_to(path).as_posix(): file_sha256(f) for f in files
                       if _sd_selected(f.relative_to(path).as_posix())})  # fmt: skip


def _fingerprint(cfg: ModelConfig, clip: _ClipWeights, sd: _SDWeights | None) -> dict[str, Any]:
    """SD is left out (no "sd" key) when the method does not use it."""
    clip_model = cfg.clip.model
    if clip_model.endswith(".json"):
        clip_model = f"{Path(clip_model).stem}@{file_sha256(clip_model)[:16]}"
    out: dict[str, Any] = {
        "clip": {"model": clip_model, "pretrained": cfg.clip.pretrained,
                 "sha256": clip.sha256 or file_sha256(clip.path)},
    }  # fmt: skip
    if sd is not None:
        out["sd"] = {"sha256": sd.digest or _dir_digest(Path(sd.path))}
    out["dtype"] = cfg.dtype
    return out


def pin_weights(cfg: ModelConfig, storage_options: Mapping[str, Any] | None = None,
                need_sd: bool = True) -> tuple[ModelConfig, dict]:  # fmt: skip
    """For the driver: ``cfg`` with the hub revisions (commits) it resolved filled in, so every
    actor loads the same snapshot, and the fingerprint of those weights by content. With
    ``need_sd=False`` SD is neither resolved, pinned nor fingerprinted.

    Staged URLs are fingerprinted from their manifests without copying the weights."""
    clip, sd = resolve_weights(cfg, storage_options, fetch=False, need_sd=need_sd)
    sd_cfg = cfg.sd if sd is None else replace(cfg.sd, model=sd.repo or cfg.sd.model, revision=sd.revision)
    pinned = replace(cfg, clip=replace(cfg.clip, revision=clip.revision), sd=sd_cfg)
    return pinned, _fingerprint(cfg, clip, sd)


def model_fingerprint(cfg: ModelConfig, storage_options: Mapping[str, Any] | None = None,
                      need_sd: bool = True) -> dict[str, Any]:  # fmt: skip
    """What identifies the weights: the CLIP architecture and tag, content hashes of the files
    used (SD's only when ``need_sd``), and dtype. Never a repo id or a path: equal fingerprints
    mean equal weights, wherever the files live (under the old or the new hub id, in a bucket or a
    local folder)."""
    return pin_weights(cfg, storage_options, need_sd)[1]


def stage_weights(cfg: ModelConfig, dest: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Copy the weights ``cfg`` resolves to (local checkpoints, or the hub cache by id) under the
    URL ``dest``: the CLIP file in ``dest/clip/``, the SD files in ``dest/sd/``, each folder with a
    ``weights_manifest.json`` of sha256 digests written last. Returns the folder URLs to pass as
    ``--clip-checkpoint`` and ``--sd-checkpoint`` (the ones ray_cluster.yaml's setup prefetches)."""
    if weights.is_remote(cfg.clip.checkpoint) or weights.is_remote(cfg.sd.checkpoint):
        raise ValueError("stage weights from local files or the hub cache, not from a URL (they are staged already)")
    clip, sd = resolve_weights(cfg)
    assert sd is not None  # need_sd defaults to True
    sd_root = Path(sd.path)
    sd_files = {f.relative_to(sd_root).as_posix(): f for f in sorted(sd_root.rglob("*")) if f.is_file()}
    sd_files = {rel: f for rel, f in sd_files.items() if _sd_selected(rel)}
    dest = dest.rstrip("/")
    clip_name = Path(clip.path).name
    weights.stage({clip_name: clip.path}, f"{dest}/clip", storage_options)
    weights.stage(sd_files, f"{dest}/sd", storage_options)
    return {"clip": f"{dest}/clip", "sd": f"{dest}/sd"}
