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
    class_ids: the C categories whose maps are held below (the image's tags, or every category
        in open-vocabulary mode). The softmax ran over every candidate (``cliper.candidates``).
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
    class_ids: tuple[int, ...]  # the classes whose maps are computed past the softmax
    text: torch.Tensor  # [T, E]: candidate foreground classes, background classes, foreground mean
    n_fg: int = 0  # foreground rows of ``text``
    channels: tuple[int, ...] = ()  # position of each of ``class_ids`` among the foreground rows
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
        if config.cliper.window is not None and (
            config.cliper.window % clip.patch_size or config.cliper.window_stride % clip.patch_size
        ):
            raise ValueError(
                f"cliper.window ({config.cliper.window}) and cliper.window_stride ({config.cliper.window_stride}) "
                f"must be multiples of the ViT patch size {clip.patch_size}, so windows fall on the patch grid"
            )  # fmt: skip
        self._all_ids = tuple(self.categories)
        self._all_text = self._text(self._all_ids) if self._all_ids else None

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

    def _text(self, ids: Sequence[int]) -> torch.Tensor:
        """[T, E] candidate list: the classes ``ids``, the background classes, their mean."""
        fg = torch.stack([self._embed(self.categories[i].prompt) for i in ids])
        parts = [fg, self._background, fg.mean(dim=0, keepdim=True)]
        return torch.cat([p for p in parts if p is not None])

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
        c = self.config.cliper
        ids = self._all_ids if c.open_vocab else tuple(dict.fromkeys(req.tags))
        if not ids:
            return _Work(req, ids, torch.zeros(0))
        if c.candidates == "tags" and not c.open_vocab:
            return _Work(req, ids, self._text(ids), len(ids), tuple(range(len(ids))))
        assert self._all_text is not None  # ids is non-empty, so categories are too
        position = {cid: k for k, cid in enumerate(self._all_ids)}
        return _Work(req, ids, self._all_text, len(self._all_ids), tuple(position[i] for i in ids))

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
                    coarse = self._coarse_one(fusion, j, work[i], pixels[i])
                    work[i].coarse = coarse
                    work[i].coarse_scores = cliper.class_scores(coarse[None])[0]
                per = (self._clock() - t0) / len(chunk)
                for i in chunk:
                    work[i].timings["clip_coarse"] = per

    def _coarse_one(self, fusion: cliper.FusionOutput, j: int, w: _Work, pixels: torch.Tensor) -> torch.Tensor:
        """[C, h, w] coarse map of image ``j`` of ``fusion`` for the classes of ``w``: per-layer
        probabilities over the whole candidate list (mixed 0.5 / 0.5 with the sliding window's
        when it is on, as the published ``forward``), then section 2 step 6 on the kept classes."""
        c = self.config.cliper
        one = cliper.FusionOutput(fusion.embeddings[:, j : j + 1], fusion.attn_last[j : j + 1], fusion.grid)
        text = w.text.to(fusion.embeddings.device)
        probs = torch.softmax(cliper.layer_logits(one, text, c.logit_scale), dim=-1)[..., : w.n_fg]  # [N, 1, hw, C]
        if c.window:
            slide = self._slide_logits(pixels.to(fusion.embeddings.device, fusion.embeddings.dtype), text)
            probs = 0.5 * torch.softmax(slide, dim=-2)[:, None, : w.n_fg].transpose(-1, -2) + 0.5 * probs
        if w.channels != tuple(range(w.n_fg)):
            probs = probs[..., list(w.channels)]  # the classes kept: every later step is per class
        attn = cliper.patch_attention(one.attn_last)
        return cliper.fuse_layers(probs.transpose(-1, -2), attn, c.select_layer, c.attention_thr, fusion.grid)[0]

    def _slide_logits(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[N, T, h*w] window logits of one [3, H', W'] input (the published ``forward_slide``):
        windows batched ``batch_size`` at a time, combined by ``cliper.slide_logits``."""
        c, p = self.config.cliper, self.clip.patch_size
        _, height, width = pixels.shape
        assert c.window is not None
        boxes = cliper.window_boxes(height, width, c.window, c.window_stride)
        logits, attns = [], []
        for start in range(0, len(boxes), self.config.batch_size):
            chunk = boxes[start : start + self.config.batch_size]
            crops = torch.stack([pixels[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
            fusion = cliper.early_layer_fusion(self.clip.model.visual, crops)
            logits += list(cliper.layer_logits(fusion, text, c.logit_scale).unbind(1))
            attns += list(cliper.patch_attention(fusion.attn_last).unbind(0))
        return cliper.slide_logits(logits, attns, boxes, (height // p, width // p), p)

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
