"""The labeler: holds the configured method (``pipeline.methods``) and turns decoded images with
tags into label maps.

``Labeler.label`` runs the stages in the order an image meets them: the method's model stages
(``infer``; for CLIPer the coarse map and SD compensation, batched) -> full-resolution scores,
superpixel pooling and label map (``finish``, per image, shared by every method).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline import cliper, discovery, labels, methods, refine
from pipeline.config import Config
from pipeline.methods.base import Item
from pipeline.models import ClipModels, load_models
from pipeline.types import Category, LabelRequest, LabelResult


class Labeler:
    """Holds the method and its models (once per process) and labels batches of images."""

    def __init__(self, clip: ClipModels, sd: Any, config: Config,
                 categories: Sequence[Category], *, sync_timings: bool = False) -> None:  # fmt: skip
        """``sync_timings``: synchronise a CUDA device before every clock read, so the per-stage
        timings are true GPU times (benchmarks); off by default, where a stage's time on CUDA is
        the time to queue its kernels."""
        ids = [c.id for c in categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"category ids must be unique, got {ids}")
        self.clip, self.sd, self.config = clip, sd, config
        self.sync_timings = sync_timings
        self.categories = {c.id: c for c in categories}
        self.method = methods.get(config.method)(clip, sd, config, self.categories)
        self._vocabularies: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}

    @classmethod
    def from_config(cls, config: Config, categories: Sequence[Category]) -> Labeler:
        clip, sd = load_models(config.model, need_sd=methods.needs_sd(config))
        return cls(clip, sd, config, categories)

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, value: Config) -> None:
        """A new config reaches the method too; on a shallow copy of a labeler (another batch size,
        as the benchmark makes) the copy gets its own method object, sharing models and caches."""
        self._config = value
        if "method" in self.__dict__:
            self.method = copy.copy(self.method)
            self.method.config = value

    @property
    def _all_text(self) -> torch.Tensor | None:
        """CLIPer's dataset-wide candidate text (benchmark and tests swap in a stale one)."""
        return getattr(self.method, "_all_text", None)

    @_all_text.setter
    def _all_text(self, value: torch.Tensor | None) -> None:
        self.method = copy.copy(self.method)  # a shallow copy of this labeler must leave the original's alone
        self.method._all_text = value  # type: ignore[attr-defined]

    def _clock(self) -> float:
        """``time.perf_counter``, after a device synchronisation when ``sync_timings`` is on."""
        device = self.clip.model.logit_scale.device
        if self.sync_timings and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def vocabulary(self) -> tuple[tuple[str, ...], np.ndarray]:
        """(names, [V, E] float64 unit text embeddings, ``discovery.text_matrix``) of
        ``discovery.vocabulary``, embedded once per labeler (per actor) with the method's own text
        encoder and prompts, normalised once, cached per vocabulary."""
        spec = self.config.discovery.vocabulary
        if spec not in self._vocabularies:
            names, prompts = discovery.vocabulary_prompts(spec, list(self.categories.values()),
                                                          lambda c: self.method.class_prompt(c.id))  # fmt: skip
            with torch.no_grad():
                emb = self.method.embed_prompts(prompts).float().cpu().numpy()
            self._vocabularies[spec] = (names, discovery.text_matrix(emb))
        return self._vocabularies[spec]

    def _discover(self, tokens: torch.Tensor, label_map: np.ndarray) -> tuple[Any, np.ndarray, Any, tuple]:
        """Regions of the untagged area, what the label map does with them, and their suggestions."""
        cfg = self.config.discovery
        grid = tokens.float().cpu().numpy()
        regions = discovery.discover(grid, discovery.labelled_cells(label_map, grid.shape[:2]), cfg)
        label_map, region_map = discovery.apply_unknown(label_map, regions, cfg.unknown)
        suggestions: tuple = ()
        if len(regions.masks):
            names, text = self.vocabulary()
            suggestions = tuple(discovery.score_regions(regions.centres, text, names))
        return regions, label_map, region_map, suggestions

    def _work(self, req: LabelRequest) -> Item:
        if req.image.ndim != 3 or req.image.shape[2] != 3 or req.image.dtype != np.uint8:
            raise ValueError(f"image {req.image_id}: expected HWC uint8 RGB, got {req.image.dtype} {req.image.shape}")
        cliper.check_aspect_ratio(req.image.shape[1], req.image.shape[0], self.config.cliper.max_aspect_ratio)
        unknown = [t for t in req.tags if t not in self.categories]
        if unknown:
            raise ValueError(f"image {req.image_id}: tags {unknown} are not in the category list")
        return self.method.prepare(req)

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        """Label a batch; results come back in the order of ``requests``."""
        return [self.finish(w) for w in self.infer(requests)]

    def infer(self, requests: Sequence[LabelRequest]) -> list[Item]:
        """The method's model stages of a batch; ``finish`` completes each image on the CPU and
        may run on another thread while the next batch infers."""
        work = [self._work(r) for r in requests]
        todo = [w for w in work if w.class_ids]
        if todo:
            if self.config.discovery.enabled:
                self.vocabulary()  # embedded here, on the model's thread, not in a concurrent ``finish``
            self.method.infer(todo, self._clock)
        return work

    def finish(self, work: Item) -> LabelResult:
        """Full-resolution scores, superpixel pooling and the label map of one inferred image."""
        return self._assemble(work)

    def _assemble(self, w: Item) -> LabelResult:
        req, cfg, rule = w.request, self.config, self.method.assembly()
        h, wd = req.image.shape[:2]
        if not w.class_ids:
            empty = np.zeros((0,), np.float32)
            return LabelResult(req.image_id, np.zeros((h, wd), np.uint8), (), np.zeros((0, 1, 1), np.float32),
                               np.zeros((0, 1, 1), np.float32), empty, empty, (), np.zeros((0, h, wd), np.float32),
                               None, {})  # fmt: skip
        out = w.output
        assert out is not None  # set by infer
        t0 = time.perf_counter()
        segments = None
        if cfg.refine.enabled:
            segments = req.segments if req.segments is not None else refine.superpixels(req.image, cfg.refine)
        t1 = time.perf_counter()
        final = out.final_scores.float().cpu()
        if rule.scale_by_score:
            full = labels.full_resolution_scores(out.compensated.cpu(), final, (h, wd))
        else:
            full = labels.resized_scores(out.compensated.cpu(), (h, wd))
        keep = labels.kept_classes(len(w.class_ids), final.numpy(), rule.open_vocab, rule.score_threshold)
        kept_ids = tuple(w.class_ids[k] for k in keep)
        scores = full[keep].astype(np.float16) if rule.float16 else full[keep]
        decision, label_map = labels.decide(scores, kept_ids, is_normalize=rule.is_normalize, bkg_thre=rule.bkg_thre,
                                            segments=segments, refine=cfg.refine, labels=cfg.labels)  # fmt: skip
        t2 = time.perf_counter()
        regions = region_map = None
        suggestions: tuple = ()
        if cfg.discovery.enabled:
            if out.tokens is None:  # a method bug, not a bad image: the shard fails and is reported
                raise RuntimeError(
                    f"method {self.method.name} gave no tokens for image {req.image_id} with discovery on"
                )
            regions, label_map, region_map, suggestions = self._discover(out.tokens, label_map)
            w.timings["discovery"] = time.perf_counter() - t2
        w.timings.update(superpixels=t1 - t0, label_assembly=t2 - t1)
        return LabelResult(
            image_id=req.image_id, label_map=label_map, class_ids=w.class_ids,
            coarse=out.coarse.float().cpu().numpy(), compensated=out.compensated.float().cpu().numpy(),
            coarse_scores=out.coarse_scores.float().cpu().numpy(), final_scores=final.numpy(),
            kept_ids=kept_ids, decision=decision.astype(np.float32), segments=segments, timings=dict(w.timings),
            maps={name: m.float().cpu().numpy() for name, m in out.diagnostics.items()},
            regions=regions, region_map=region_map, suggestions=suggestions,
        )  # fmt: skip
