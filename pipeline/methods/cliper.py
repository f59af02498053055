"""CLIPer (cliper-method.md): early-layer fusion coarse map (optionally with the sliding window),
then Stable Diffusion self-attention compensation. The class scores mix the coarse and the
compensated maps' scores 0.5 / 0.5; the shared assembly scales each upsampled map by them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline import cliper, compensation
from pipeline.methods.base import Assembly, Clock, Item, Method, MethodOutput
from pipeline.prompts import background_classes, templates

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.models import ClipModels
    from pipeline.types import Category, LabelRequest


@dataclass
class CliperItem(Item):
    text: torch.Tensor = torch.zeros(0)  # [T, E]: candidate foreground classes, background classes, foreground mean
    n_fg: int = 0  # foreground rows of ``text``
    channels: tuple[int, ...] = ()  # position of each of ``class_ids`` among the foreground rows
    coarse: torch.Tensor | None = None
    coarse_scores: torch.Tensor | None = None
    tokens: torch.Tensor | None = None  # [h, w, E], only when discovery is on


class Cliper(Method):
    name = "cliper"
    # Not batch-invariant: batched ViT and UNet passes round differently with the batch composition.
    # Measured on the tiny models, 9 images, batch 1 vs 2 / 8: 760 / 1002 of 29760 label pixels
    # (voc-vit-b16), 1022 / 1074 (voc-vit-l14), 0 / 0 (coco presets); scores differ by < 2e-6.
    batch_invariant = False
    supports_discovery = True

    def __init__(self, clip: ClipModels, sd: Any, config: Config, categories: Mapping[int, Category]) -> None:
        if config.cliper.compensation and sd is None:
            raise ValueError("compensation is on in the config, but no Stable Diffusion model was given")
        super().__init__(clip, sd, config, categories)
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
        self._all_ids = tuple(categories)
        self._all_text = self._text(self._all_ids) if self._all_ids else None

    @classmethod
    def needs_sd(cls, config: Config) -> bool:
        return config.cliper.compensation

    def assembly(self) -> Assembly:
        c = self.config.cliper
        return Assembly(scale_by_score=True, is_normalize=c.is_normalize, bkg_thre=c.bkg_thre,
                        open_vocab=c.open_vocab, score_threshold=c.score_threshold)  # fmt: skip

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

    def embed_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self._embed(p) for p in prompts])

    def _text(self, ids: Sequence[int]) -> torch.Tensor:
        """[T, E] candidate list: the classes ``ids``, the background classes, their mean."""
        fg = torch.stack([self._embed(self.class_prompt(i)) for i in ids])
        parts = [fg, self._background, fg.mean(dim=0, keepdim=True)]
        return torch.cat([p for p in parts if p is not None])

    def prepare(self, request: LabelRequest) -> CliperItem:
        c = self.config.cliper
        ids = self._all_ids if c.open_vocab else tuple(dict.fromkeys(request.tags))
        if not ids:
            return CliperItem(request, ids, text=torch.zeros(0))
        if c.candidates == "tags" and not c.open_vocab:
            return CliperItem(request, ids, text=self._text(ids), n_fg=len(ids), channels=tuple(range(len(ids))))
        assert self._all_text is not None  # ids is non-empty, so categories are too
        position = {cid: k for k, cid in enumerate(self._all_ids)}
        return CliperItem(request, ids, text=self._all_text, n_fg=len(self._all_ids),
                          channels=tuple(position[i] for i in ids))  # fmt: skip

    def infer(self, items: Sequence[Item], clock: Clock) -> None:
        work = [w for w in items if isinstance(w, CliperItem)]
        self._coarse(work, clock)
        self._compensate(work, clock)

    def _coarse(self, work: Sequence[CliperItem], clock: Clock) -> None:
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
                t0 = clock()
                batch = torch.stack([pixels[i] for i in chunk]).to(device, dtype)
                fusion = cliper.early_layer_fusion(visual, batch)
                for j, i in enumerate(chunk):
                    coarse = self._coarse_one(fusion, j, work[i], pixels[i])
                    work[i].coarse = coarse
                    work[i].coarse_scores = cliper.class_scores(coarse[None])[0]
                    if self.config.discovery.enabled:
                        work[i].tokens = cliper.dense_tokens(fusion, j)
                per = (clock() - t0) / len(chunk)
                for i in chunk:
                    work[i].timings["clip_coarse"] = per

    def _coarse_one(self, fusion: cliper.FusionOutput, j: int, w: CliperItem, pixels: torch.Tensor) -> torch.Tensor:
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

    def _compensate(self, work: Sequence[CliperItem], clock: Clock) -> None:
        c = self.config.cliper
        if not c.compensation or self.sd is None:
            for w in work:
                assert w.coarse is not None and w.coarse_scores is not None  # set by _coarse
                w.output = MethodOutput(w.coarse, w.coarse_scores, w.coarse, w.coarse_scores,
                                        {"coarse": w.coarse, "refined": w.coarse}, w.tokens)  # fmt: skip
            return
        for start in range(0, len(work), self.config.batch_size):
            chunk = work[start : start + self.config.batch_size]
            pixels = torch.stack([compensation.sd_pixels(w.request.image) for w in chunk])
            split: dict[str, float] = {}
            maps = compensation.capture_attention(
                self.sd, pixels, [w.request.image_id for w in chunk], c.sd_layers,
                c.sd_timestep_index, c.sd_num_inference_steps, timings=split, clock=clock,
            )  # fmt: skip
            for j, w in enumerate(chunk):
                t0 = clock()
                # Views of each layer's maps, not a stacked [layers, heads, n, n] copy.
                chain = compensation.attention_chain([maps[name][j] for name in c.sd_layers], c.attention_thr)
                assert w.coarse is not None and w.coarse_scores is not None  # set by _coarse
                compensated = compensation.compensate(chain, w.coarse.to(chain[0].device))
                final = 0.5 * cliper.class_scores(compensated[None])[0] + 0.5 * w.coarse_scores.to(compensated.device)
                w.output = MethodOutput(compensated, final, w.coarse, w.coarse_scores,
                                        {"coarse": w.coarse, "refined": compensated}, w.tokens)  # fmt: skip
                w.timings.update({stage: sec / len(chunk) for stage, sec in split.items()})
                w.timings["compensation"] = clock() - t0
            del maps
