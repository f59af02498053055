"""CLIP-ES (Lin et al., CVPR 2023) behind the method interface: ``pipeline.clip_es`` does the
work (softmax-GradCAM over the image's tags + the background list, CAA refinement); this module
picks its prompts, embeds them, and hands the CAA-refined maps at image size to the shared
assembly with the published label rule (``eval_cam.py``: background (1 - best)**2, float16)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipeline import clip_es, clip_es_prompts
from pipeline.methods.base import Assembly, Clock, Item, Method, MethodOutput

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.models import ClipModels
    from pipeline.types import Category


class ClipEs(Method):
    name = "clip-es"
    batch_invariant = True  # one image at a time whatever the batch (``infer``)
    supports_discovery = True

    def __init__(self, clip: ClipModels, sd: Any, config: Config, categories: Mapping[int, Category]) -> None:
        super().__init__(clip, sd, config, categories)
        c = config.clip_es
        synonyms = clip_es_prompts.SYNONYMS[c.dataset]
        # The published synonym names for the dataset's classes; a class the published list does
        # not hold keeps its own prompt.
        self._prompts = {cid: synonyms.get(cat.name, cat.prompt) for cid, cat in categories.items()}
        published = clip_es_prompts.background_prompts(c.dataset)
        self._background = list(c.background if c.background is not None else published)
        self._text_cache: dict[str, torch.Tensor] = {}  # [1, E] per prompt: each embedded once per actor

    @classmethod
    def validate(cls, config: Config) -> None:
        c = config.clip_es
        if c.dataset not in clip_es_prompts.SYNONYMS:
            known = sorted(clip_es_prompts.SYNONYMS)
            raise ValueError(f"config clip_es.dataset must be one of {known}, got {c.dataset!r}")
        if not 0 < c.box_threshold < 1:
            raise ValueError(f"config clip_es.box_threshold must lie in (0, 1), got {c.box_threshold}")
        if c.background is not None and not c.background:
            raise ValueError("config clip_es.background is empty: give background names, or null for the published one")
        if config.cliper.open_vocab:
            raise ValueError("CLIP-ES labels the image's tags only: set cliper.open_vocab to false for method clip-es")

    def assembly(self) -> Assembly:
        # eval_cam.py: the maps as they are (already min-max scaled, at image size), background
        # (1 - best)**2 competing in the argmax and winning ties, in float16.
        return Assembly(scale_by_score=False, is_normalize=False, bkg_thre=0.0, float16=True)

    def _text(self, ids: tuple[int, ...]) -> torch.Tensor:
        """[C + B, E] embeddings of the tags' prompts then the background list. Rows are cached per
        prompt (``text_features`` encodes each prompt alone), so the background list is embedded once
        per actor, not once per distinct tag set."""
        return self.embed_prompts([self.class_prompt(i) for i in ids] + self._background)

    def class_prompt(self, class_id: int) -> str:
        return self._prompts[class_id]

    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """[V, E] float32 unit rows, each prompt encoded alone with CLIP-ES's single template and
        cached per actor (``clip_es.text_features``)."""
        for p in prompts:
            if p not in self._text_cache:
                self._text_cache[p] = clip_es.text_features(self.clip.model, self.clip.tokenizer, [p])
        return torch.cat([self._text_cache[p] for p in prompts])

    def infer(self, items: Sequence[Item], clock: Clock) -> None:
        c = self.config.clip_es
        for item in items:  # one image at a time, as published (each has its own input size)
            t0 = clock()
            image = item.request.image
            pixels = clip_es.clip_es_input(image, self.clip.patch_size, self.clip.mean, self.clip.std)[None]
            dtype = self.clip.model.visual.conv1.weight.dtype
            out = clip_es.clip_es_from_text(self.clip.model, pixels.to(dtype), self._text(item.class_ids),
                                            len(item.class_ids), image.shape[:2], c.box_threshold,
                                            dense_tokens=self.config.discovery.enabled)  # fmt: skip
            item.output = MethodOutput(
                compensated=out.refined, final_scores=out.scores, coarse=out.cam, coarse_scores=out.scores,
                diagnostics={"cam": out.cam, "refined": out.refined, "box_mask": out.box_mask}, tokens=out.tokens,
            )  # fmt: skip
            item.timings["clip_es"] = clock() - t0
