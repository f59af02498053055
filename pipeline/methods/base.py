"""The narrow interface of a labeling method (docs/METHODS.md, "How to add a method").

A method holds its models and turns a batch of decoded images, each with its candidate classes,
into per-class score maps, class scores and its own diagnostic maps. Everything else (loading
weights, batching, superpixels, label assembly, outputs, stats, resume, the runner) is shared:
``pipeline.labeler``, ``pipeline.shards``, ``pipeline.storage``, ``pipeline.runner``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.models import ClipModels
    from pipeline.types import Category, LabelRequest


@dataclass(frozen=True)
class Assembly:
    """How the shared assembly (``pipeline.labels``) turns a method's maps into a label map.

    scale_by_score: each map is upsampled, divided by its peak and multiplied by its class score
        (``labels.full_resolution_scores``); False: the maps are used as they are (resized to the
        image when they are not at its size).
    is_normalize, bkg_thre: as ``labels.decision_scores`` / ``labels.assemble_label_map``.
    open_vocab, score_threshold: which candidates may appear (``labels.kept_classes``).
    float16: threshold and argmax in float16 (a method whose published rule runs on float16 maps).
    """

    scale_by_score: bool = True
    is_normalize: bool = False
    bkg_thre: float = 0.0
    open_vocab: bool = False
    score_threshold: float = 0.0
    float16: bool = False


@dataclass
class MethodOutput:
    """One image's maps, one entry per candidate class (``Item.class_ids`` order).

    compensated: [C, h, w] the score maps the label map is built from (any resolution; CLIPer's
    SD-compensated map, CLIP-ES's CAA-refined map);
    final_scores: [C] class scores; coarse / coarse_scores: the method's first-stage map and scores
    (the compensated ones when it has no such stage); diagnostics: the method's own maps by name, as
    ``jobs/explain.py --dump`` writes them; tokens: [h, w, E] float32 L2-normalised final-layer
    patch features on the ViT grid, set only when ``discovery.enabled`` (None otherwise).
    """

    compensated: torch.Tensor
    final_scores: torch.Tensor
    coarse: torch.Tensor
    coarse_scores: torch.Tensor
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None


@dataclass
class Item:
    """One image on its way through a method: the request, the classes whose maps are computed,
    and (after ``infer``) the output. Methods may subclass it to carry their own state."""

    request: LabelRequest
    class_ids: tuple[int, ...]
    output: MethodOutput | None = None
    timings: dict[str, float] = field(default_factory=dict)


Clock = Callable[[], float]


class Method(ABC):
    """A labeling method. Subclasses set ``name`` and implement ``infer``; register the class in
    ``pipeline.methods.REGISTRY``."""

    name: ClassVar[str]
    # True when the labels do not depend on ``config.batch_size`` (byte for byte): the batch size is
    # then left out of the run's identity (``Config.identity``) and a resume may change it. Claim it
    # only with a test (tests/test_methods.py checks every method that sets it).
    batch_invariant: ClassVar[bool] = False
    # True when the method sets ``MethodOutput.tokens`` whenever ``config.discovery.enabled`` and
    # implements ``embed_prompts``: discovery needs both. ``build_config`` refuses discovery for a
    # method without it, and the labeler fails a shard whose output lacks the tokens.
    supports_discovery: ClassVar[bool] = False

    def __init__(self, clip: ClipModels, sd: Any, config: Config, categories: Mapping[int, Category]) -> None:
        self.clip, self.sd, self.config, self.categories = clip, sd, config, categories

    @classmethod
    def needs_sd(cls, config: Config) -> bool:
        """Whether this method, under ``config``, uses Stable Diffusion (else it is never looked
        for, loaded or fingerprinted)."""
        return False

    @classmethod  # noqa: B027 (an optional hook: most methods accept any config)
    def validate(cls, config: Config) -> None:
        """Raise ValueError for settings this method cannot run with."""

    def assembly(self) -> Assembly:
        """The label rule the shared assembly applies to this method's maps."""
        return Assembly()

    def prepare(self, request: LabelRequest) -> Item:
        """The image's candidate classes: its tags, in order, without repeats."""
        return Item(request, tuple(dict.fromkeys(request.tags)))

    def class_prompt(self, class_id: int) -> str:
        """The text this method embeds for class ``class_id`` when labeling (its ``Category.prompt``
        unless the method has its own, as CLIP-ES's published synonyms); discovery's ``dataset``
        vocabulary embeds the same text, so a suggestion names a class as the labeling saw it."""
        return self.categories[class_id].prompt

    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """[V, E] float32 unit text embeddings of class prompts, with this method's own text encoder
        and templates, in the space of ``MethodOutput.tokens`` (discovery's suggestions). Required when
        ``supports_discovery`` is True."""
        raise NotImplementedError(f"method {self.name} does not implement embed_prompts (supports_discovery is False)")

    @abstractmethod
    def infer(self, items: Sequence[Item], clock: Clock) -> None:
        """Set ``item.output`` (and ``item.timings``) for every item; every item has classes."""
