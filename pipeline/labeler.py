"""The labeler: holds CLIP and SD, and turns decoded images with tags into label maps.

``Labeler.label`` runs the stages in the order an image meets them, each a short private step:
coarse map (CLIPer early-layer fusion, batched by grid size) -> SD attention capture and
compensation (batched) -> full-resolution scores, superpixel pooling and label map (per image).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import cliper, compensation, labels, refine
from pipeline.config import Config
from pipeline.models import ClipModels, load_models
from pipeline.prompts import background_classes, templates


@dataclass(frozen=True)
class Category:
    """A foreground class: ``id`` is the value it takes in label maps (1..254)."""

    id: int
    name: str
    prompt: str


@dataclass(frozen=True)
class LabelRequest:
    """One decoded image (HWC uint8 RGB) with its tags (category ids)."""

    image_id: str
    image: np.ndarray
    tags: tuple[int, ...]
    segments: np.ndarray | None = None  # superpixels, when computed ahead (off the GPU's path)


@dataclass
class LabelResult:
    """Everything the labeler computed for one image.

    label_map: [H, W] uint8 (0 background, category ids, 255 ignore).
    class_ids: the C candidate categories, in the order of the maps below.
    coarse: [C, h, w] float32 CLIPer coarse map on the ViT grid.
    refined: [C, s, s] float32 compensated map (s = 64 for SD 2.1); the coarse map when
        compensation is off.
    coarse_scores, final_scores: [C] float32 class scores.
    kept_ids: the categories allowed in the label map (all tags, or in open-vocabulary mode
        those scoring above ``score_threshold``).
    decision: [K, H, W] float32 scores of the kept classes that the threshold and argmax saw.
    segments: [H, W] int32 superpixels, or None when refinement is off.
    timings: seconds per stage (wall clock; not part of any deterministic output).
    """

    image_id: str
    label_map: np.ndarray
    class_ids: tuple[int, ...]
    coarse: np.ndarray
    refined: np.ndarray
    coarse_scores: np.ndarray
    final_scores: np.ndarray
    kept_ids: tuple[int, ...]
    decision: np.ndarray
    segments: np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Work:
    request: LabelRequest
    class_ids: tuple[int, ...]
    text: torch.Tensor  # [T, E]: foreground, background, foreground mean
    coarse: torch.Tensor | None = None
    refined: torch.Tensor | None = None
    coarse_scores: torch.Tensor | None = None
    final_scores: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Labeler:
    """Holds the models (once per process) and labels batches of images."""

    def __init__(self, clip: ClipModels, sd: compensation.SDModels | None, config: Config,
                 categories: Sequence[Category], *, sync_timings: bool = False) -> None:  # fmt: skip
        """``sync_timings``: synchronise a CUDA device before every clock read, so the per-stage
        timings are true GPU times (benchmarks); off by default, where a stage's time on CUDA is
        the time to queue its kernels."""
        if config.cliper.compensation and sd is None:
            raise ValueError("compensation is on in the config, but no Stable Diffusion model was given")
        ids = [c.id for c in categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"category ids must be unique, got {ids}")
        self.clip, self.sd, self.config = clip, sd, config
        self.sync_timings = sync_timings
        self.categories = {c.id: c for c in categories}
        self._text_cache: dict[str, torch.Tensor] = {}
        bg = background_classes(config.cliper.background)
        self._background = torch.stack([self._embed(p) for p in bg]) if bg else None

    @classmethod
    def from_config(cls, config: Config, categories: Sequence[Category]) -> Labeler:
        clip, sd = load_models(config.model)
        return cls(clip, sd if config.cliper.compensation else None, config, categories)

    @torch.no_grad()
    def _embed(self, prompt: str) -> torch.Tensor:
        """[E] text embedding of one class prompt over the configured templates (cached)."""
        if prompt not in self._text_cache:
            model = self.clip.model
            tokens = self.clip.tokenizer([t.format(prompt) for t in templates(self.config.cliper.templates)])
            emb = model.encode_text(tokens.to(model.logit_scale.device)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            self._text_cache[prompt] = mean / mean.norm()
        return self._text_cache[prompt]

    def _clock(self) -> float:
        """``time.perf_counter``, after a device synchronisation when ``sync_timings`` is on."""
        device = self.clip.model.logit_scale.device
        if self.sync_timings and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _work(self, req: LabelRequest) -> _Work:
        if req.image.ndim != 3 or req.image.shape[2] != 3 or req.image.dtype != np.uint8:
            raise ValueError(f"image {req.image_id}: expected HWC uint8 RGB, got {req.image.dtype} {req.image.shape}")
        cliper.check_aspect_ratio(req.image.shape[1], req.image.shape[0], self.config.cliper.max_aspect_ratio)
        unknown = [t for t in req.tags if t not in self.categories]
        if unknown:
            raise ValueError(f"image {req.image_id}: tags {unknown} are not in the category list")
        ids = tuple(self.categories) if self.config.cliper.open_vocab else tuple(dict.fromkeys(req.tags))
        if not ids:
            return _Work(req, ids, torch.zeros(0))
        fg = torch.stack([self._embed(self.categories[i].prompt) for i in ids])
        parts = [fg, self._background, fg.mean(dim=0, keepdim=True)]
        return _Work(req, ids, torch.cat([p for p in parts if p is not None]))

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        """Label a batch; results come back in the order of ``requests``."""
        return [self.finish(w) for w in self.infer(requests)]

    def infer(self, requests: Sequence[LabelRequest]) -> list[_Work]:
        """The model stages (CLIP, SD, compensation) of a batch; ``finish`` completes each image
        on the CPU and may run on another thread while the next batch infers."""
        work = [self._work(r) for r in requests]
        todo = [w for w in work if w.class_ids]
        self._coarse(todo)
        self._compensate(todo)
        return work

    def finish(self, work: _Work) -> LabelResult:
        """Full-resolution scores, superpixel pooling and the label map of one inferred image."""
        return self._assemble(work)

    def _coarse(self, work: Sequence[_Work]) -> None:
        c = self.config.cliper
        visual = self.clip.model.visual
        device, dtype = self.clip.model.logit_scale.device, visual.conv1.weight.dtype
        pixels = [cliper.clip_input(w.request.image, self.clip.patch_size, self.clip.mean, self.clip.std, c.short_side)
                  for w in work]  # fmt: skip
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.config.batch_size):
                chunk = idx[start : start + self.config.batch_size]
                t0 = self._clock()
                batch = torch.stack([pixels[i] for i in chunk]).to(device, dtype)
                fusion = cliper.early_layer_fusion(visual, batch)
                for j, i in enumerate(chunk):
                    coarse = self._coarse_one(fusion, j, work[i])
                    if c.window:
                        coarse = 0.5 * coarse + 0.5 * self._window_mean(pixels[i].to(device, dtype), work[i])
                    work[i].coarse = coarse
                    work[i].coarse_scores = cliper.class_scores(coarse[None])[0]
                per = (self._clock() - t0) / len(chunk)
                for i in chunk:
                    work[i].timings["clip_coarse"] = per

    def _coarse_one(self, fusion: cliper.FusionOutput, j: int, w: _Work) -> torch.Tensor:
        c = self.config.cliper
        one = cliper.FusionOutput(fusion.embeddings[:, j : j + 1], fusion.attn_last[j : j + 1], fusion.grid)
        text = w.text.to(fusion.embeddings.device)
        return cliper.coarse_map(one, text, len(w.class_ids), c.logit_scale, c.select_layer, c.attention_thr)[0]

    def _window_mean(self, pixels: torch.Tensor, w: _Work) -> torch.Tensor:
        """Sliding-window coarse map [C, h, w]: windows averaged where they overlap."""
        c, p = self.config.cliper, self.clip.patch_size
        _, height, width = pixels.shape
        ch, cw = min(c.window, height), min(c.window, width)
        origins = [(y, x) for y in cliper.window_origins(height, ch, c.window_stride)
                   for x in cliper.window_origins(width, cw, c.window_stride)]  # fmt: skip
        total = torch.zeros(len(w.class_ids), height // p, width // p, device=pixels.device)
        count = torch.zeros(1, height // p, width // p, device=pixels.device)
        for start in range(0, len(origins), self.config.batch_size):
            chunk = origins[start : start + self.config.batch_size]
            crops = torch.stack([pixels[:, y : y + ch, x : x + cw] for y, x in chunk])
            fusion = cliper.early_layer_fusion(self.clip.model.visual, crops)
            for j, (y, x) in enumerate(chunk):
                total[:, y // p : (y + ch) // p, x // p : (x + cw) // p] += self._coarse_one(fusion, j, w)
                count[:, y // p : (y + ch) // p, x // p : (x + cw) // p] += 1
        return total / count

    def _compensate(self, work: Sequence[_Work]) -> None:
        c = self.config.cliper
        if not c.compensation or self.sd is None:
            for w in work:
                w.refined, w.final_scores = w.coarse, w.coarse_scores
            return
        for start in range(0, len(work), self.config.batch_size):
            chunk = work[start : start + self.config.batch_size]
            pixels = torch.stack([compensation.sd_pixels(w.request.image) for w in chunk])
            split: dict[str, float] = {}
            maps = compensation.capture_attention(
                self.sd, pixels, [w.request.image_id for w in chunk], c.sd_layers,
                c.sd_timestep_index, c.sd_num_inference_steps, timings=split, clock=self._clock,
            )  # fmt: skip
            for j, w in enumerate(chunk):
                t0 = self._clock()
                # Views of each layer's maps, not a stacked [layers, heads, n, n] copy.
                chain = compensation.attention_chain([maps[name][j] for name in c.sd_layers], c.attention_thr)
                assert w.coarse is not None and w.coarse_scores is not None  # set by _coarse
                w.refined = compensation.compensate(chain, w.coarse.to(chain[0].device))
                w.final_scores = 0.5 * cliper.class_scores(w.refined[None])[0] + 0.5 * w.coarse_scores.to(
                    w.refined.device
                )
                w.timings.update({stage: sec / len(chunk) for stage, sec in split.items()})
                w.timings["compensation"] = self._clock() - t0
            del maps

    def _assemble(self, w: _Work) -> LabelResult:
        req, c, cfg = w.request, self.config.cliper, self.config
        h, wd = req.image.shape[:2]
        if not w.class_ids:
            empty = np.zeros((0,), np.float32)
            return LabelResult(req.image_id, np.zeros((h, wd), np.uint8), (), np.zeros((0, 1, 1), np.float32),
                               np.zeros((0, 1, 1), np.float32), empty, empty, (), np.zeros((0, h, wd), np.float32),
                               None, {})  # fmt: skip
        assert w.refined is not None and w.final_scores is not None and w.coarse is not None
        t0 = time.perf_counter()
        segments = None
        if cfg.refine.enabled:
            segments = req.segments if req.segments is not None else refine.superpixels(req.image, cfg.refine)
        t1 = time.perf_counter()
        final = w.final_scores.float().cpu()
        full = labels.full_resolution_scores(w.refined.cpu(), final, (h, wd))
        keep = labels.kept_classes(len(w.class_ids), final.numpy(), c.open_vocab, c.score_threshold)
        kept_ids = tuple(w.class_ids[k] for k in keep)
        decision = labels.decision_scores(full[keep], is_normalize=c.is_normalize, segments=segments, refine=cfg.refine)
        label_map = labels.assemble_label_map(decision, kept_ids, c.bkg_thre, cfg.labels)
        w.timings.update(superpixels=t1 - t0, label_assembly=time.perf_counter() - t1)
        return LabelResult(
            image_id=req.image_id, label_map=label_map, class_ids=w.class_ids,
            coarse=w.coarse.float().cpu().numpy(), refined=w.refined.float().cpu().numpy(),
            coarse_scores=w.coarse_scores.float().cpu().numpy(), final_scores=final.numpy(),
            kept_ids=kept_ids, decision=decision, segments=segments, timings=dict(w.timings),
        )  # fmt: skip
