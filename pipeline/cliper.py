"""CLIPer's coarse map: early-layer fusion inside open_clip's ViT (cliper-method.md section 2).

Everything here is a function of tensors and an open_clip ``VisionTransformer``; nothing holds
state. Shapes: B images, L = 1 + h*w tokens (class token first), D width, E embedding dim,
T text candidates, C foreground classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_EPS = 1e-12  # guards a division only where a row is entirely zero (undefined otherwise)
_WINDOW_EPS = 1e-5  # the published constant added to the window-attention counts


class UnusableImageError(ValueError):
    """A decoded image the labeler cannot use (the message says why)."""


def check_aspect_ratio(width: int, height: int, max_aspect_ratio: float) -> None:
    """Raise ``UnusableImageError`` for an image more elongated than ``max_aspect_ratio``."""
    ratio = max(width, height) / min(width, height)
    if ratio > max_aspect_ratio:
        raise UnusableImageError(
            f"{width}x{height} has aspect ratio {ratio:.1f}, over cliper.max_aspect_ratio {max_aspect_ratio:g}: "
            f"with its short side at 336 px the ViT input would be too large"
        )


def clip_input_size(width: int, height: int, patch: int, short_side: int = 336) -> tuple[int, int]:
    """(W', H'): short side near ``short_side``, each side a multiple of ``patch`` (section 1)."""
    r = short_side / min(width, height)
    w = max(1, math.floor(width * r / patch + 0.5)) * patch
    h = max(1, math.floor(height * r / patch + 0.5)) * patch
    return w, h


def clip_input(
    image: np.ndarray, patch: int, mean: Sequence[float], std: Sequence[float], short_side: int = 336
) -> torch.Tensor:
    """HWC uint8 RGB -> [3, H', W'] float32, one PIL bicubic resize then CLIP's mean/std."""
    h, w = image.shape[:2]
    size = clip_input_size(w, h, patch, short_side)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + g*g, D] positional embedding learned on a square grid -> [1 + h*w, D], bilinear;
    the class-token row is kept as it is."""
    cls_pos, patch_pos = pos[:1], pos[1:]
    g = math.isqrt(patch_pos.shape[0])
    if g * g != patch_pos.shape[0]:
        raise ValueError(f"positional embedding of {patch_pos.shape[0]} patches is not a square grid")
    if (g, g) == tuple(grid):
        return pos
    sq = patch_pos.T.reshape(1, -1, g, g)
    up = F.interpolate(sq.float(), size=grid, mode="bilinear", align_corners=False).to(pos.dtype)
    return torch.cat([cls_pos, up.reshape(pos.shape[1], -1).T], dim=0)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, n_heads, d // n_heads).transpose(1, 2)  # [B, heads, L, d]


def _block_forward(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One open_clip ResidualAttentionBlock, returning (output, its ln_1 input, attention probs
    [B, heads, L, L]). Matches ``block(x)`` for batch-first x."""
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention):
        raise TypeError(f"unsupported attention module {type(attn).__name__}; CLIPer needs nn.MultiheadAttention")
    y = block.ln_1(x)
    q, k, v = (_heads(t, attn.num_heads) for t in F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    out = attn.out_proj((probs @ v).transpose(1, 2).reshape(x.shape))
    x = x + block.ls_1(out)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, y, probs


def sinkhorn_round(s: torch.Tensor) -> torch.Tensor:
    """One round on [..., L, L]: divide by column sums, then by row sums."""
    s = s / s.sum(dim=-2, keepdim=True).clamp_min(_EPS)
    return s / s.sum(dim=-1, keepdim=True).clamp_min(_EPS)


def fuse_attention(s: torch.Tensor) -> torch.Tensor:
    """A_fused from a Sinkhorn-normalised S [..., L, L]: symmetrise, subtract column means, clamp
    at 0, divide by row sums. Rows are non-negative and sum to 1."""
    a = (s + s.transpose(-1, -2)) / 2
    a = (a - a.mean(dim=-2, keepdim=True)).clamp_min(0)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(_EPS)


def _tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))  # [B, D, h, w]
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(visual.positional_embedding, tuple(grid)).to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


@dataclass(frozen=True)
class FusionOutput:
    """Per-candidate patch embeddings and the last fused attention.

    embeddings: [N, B, L, E] (candidate k = 1..N on dim 0, class token first on dim 2);
    attn_last: [B, heads, L, L], A_fused(N); grid: (h, w).
    """

    embeddings: torch.Tensor
    attn_last: torch.Tensor
    grid: tuple[int, int]


def _project(visual: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = visual.ln_post(x)
    return x @ visual.proj if visual.proj is not None else x


def early_layer_fusion(visual: torch.nn.Module, pixels: torch.Tensor) -> FusionOutput:
    """Section 2 steps 1-3 on open_clip's ViT for [B, 3, H', W'] normalised pixels."""
    blocks = list(visual.transformer.resblocks)
    if len(blocks) < 2:
        raise ValueError("early-layer fusion needs a ViT with at least 2 blocks")
    x = _tokens(visual, pixels)
    grid = (pixels.shape[-2] // visual.conv1.stride[0], pixels.shape[-1] // visual.conv1.stride[1])
    candidates, s = [], None
    for block in blocks[:-1]:
        x, normed, probs = _block_forward(block, x)
        candidates.append(normed)
        s = probs.float() if s is None else s + probs.float()
    candidates.append(x)
    last = blocks[-1]
    d = x.shape[-1]
    w_v, b_v = last.attn.in_proj_weight[2 * d :], last.attn.in_proj_bias[2 * d :]
    embeddings = []
    for cand in candidates:
        s = sinkhorn_round(s)  # in place in the published code: candidate k sees k rounds
        a_fused = fuse_attention(s)
        v = _heads(F.linear(last.ln_1(cand), w_v, b_v), last.attn.num_heads)
        out = last.attn.out_proj((a_fused.to(v.dtype) @ v).transpose(1, 2).reshape(cand.shape))
        embeddings.append(_project(visual, out))
    return FusionOutput(torch.stack(embeddings), a_fused, grid)


def dense_tokens(fusion: FusionOutput, index: int) -> torch.Tensor:
    """[h, w, E] float32 L2-normalised final-layer patch features of image ``index``: the last
    candidate's embeddings, the very vectors the coarse map compares with text (discovery)."""
    emb = fusion.embeddings[-1, index, 1:].float()
    emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return emb.reshape(*fusion.grid, -1)


def layer_logits(fusion: FusionOutput, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Section 2 step 5 before the softmax: [N, B, hw, T] float32 logits, ``logit_scale`` x the
    cosine between every candidate's patch tokens (class token dropped) and text [T, E]."""
    emb = fusion.embeddings[:, :, 1:].float()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    t = text.float() / text.float().norm(dim=-1, keepdim=True)
    return logit_scale * emb @ t.T


def patch_attention(attn_last: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, L] A_fused(N) -> [B, hw, hw] float32 head mean over patch tokens."""
    return attn_last.float().mean(dim=1)[:, 1:, 1:]


def propagate(maps: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """[..., C, hw] maps propagated by [..., hw, hw] attention as the published code does:
    ``maps @ attn`` (output patch j sums maps[i] * attn[i, j]; attn is not symmetric)."""
    return maps @ attn


def fuse_layers(seg: torch.Tensor, attn: torch.Tensor, select_layer: int, attention_thr: float,
                grid: tuple[int, int]) -> torch.Tensor:  # fmt: skip
    """Section 2 step 6: per-layer class probabilities [N, B, C, hw] and patch attention
    [B, hw, hw] -> [B, C, h, w] coarse map. The selected layer is zeroed below ``attention_thr``
    x its class maximum (in place, so the layer mean sees it too), propagated, and added to the
    mean over layers. Every step is per class, so any subset of classes gives the same maps."""
    seg = seg.clone()
    sel = seg[select_layer]
    sel[sel < attention_thr * sel.amax(dim=-1, keepdim=True)] = 0
    coarse = propagate(sel, attn) + seg.mean(dim=0)
    return coarse.reshape(*coarse.shape[:2], *grid)


def coarse_map(
    fusion: FusionOutput,
    text: torch.Tensor,
    n_fg: int,
    logit_scale: float,
    select_layer: int,
    attention_thr: float,
) -> torch.Tensor:
    """Section 2 steps 5-6: [B, C, h, w] coarse map for text [T, E] whose first ``n_fg`` rows are
    the foreground classes (the rest: background classes, then the foreground mean)."""
    seg = torch.softmax(layer_logits(fusion, text, logit_scale), dim=-1)[..., :n_fg]  # [N, B, hw, C]
    return fuse_layers(seg.transpose(-1, -2), patch_attention(fusion.attn_last), select_layer, attention_thr,
                       fusion.grid)  # fmt: skip


def class_scores(maps: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C] spatial maxima."""
    return maps.flatten(2).amax(dim=-1)


def window_origins(size: int, crop: int, stride: int) -> list[int]:
    """Crop origins along one axis covering [0, size): every ``stride``, plus one flush with the end."""
    if size <= crop:
        return [0]
    origins = list(range(0, size - crop + 1, stride))
    if origins[-1] != size - crop:
        origins.append(size - crop)
    return origins


def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Sliding-window crops (y1, y2, x1, x2) in pixels over an [height, width] input, in the
    published order (rows, then columns): origins every ``stride`` and one flush with the far
    edge; a side shorter than ``crop`` is one crop of that side."""
    return [(y, y + min(crop, height), x, x + min(crop, width))
            for y in window_origins(height, min(crop, height), stride)
            for x in window_origins(width, min(crop, width), stride)]  # fmt: skip


def slide_logits(
    logits: Sequence[torch.Tensor],
    attns: Sequence[torch.Tensor],
    boxes: Sequence[tuple[int, int, int, int]],
    grid: tuple[int, int],
    patch: int,
) -> torch.Tensor:
    """The published ``forward_slide``: per-window logits [N, hw_win, T] and patch attention
    [hw_win, hw_win] (head mean of A_fused(N)) for windows at pixel ``boxes`` -> [N, T, h*w]
    logits of the whole grid, averaged where windows overlap and propagated by the
    window-averaged attention. Attention between patches that share no window is 0; the
    averaged attention is divided by (count + 1e-5), as published, then by its row sums."""
    h, w = grid
    n, t = logits[0].shape[0], logits[0].shape[-1]
    preds = torch.zeros(n, t, h, w, device=logits[0].device)
    count = torch.zeros(h, w, device=logits[0].device)
    attn = torch.zeros(h, w, h, w, device=logits[0].device)
    attn_count = torch.zeros(h, w, h, w, device=logits[0].device)
    for lg, a, (y1, y2, x1, x2) in zip(logits, attns, boxes, strict=True):
        ys, xs = slice(y1 // patch, y2 // patch), slice(x1 // patch, x2 // patch)
        ch, cw = ys.stop - ys.start, xs.stop - xs.start
        preds[:, :, ys, xs] += lg.float().transpose(-1, -2).reshape(n, t, ch, cw)
        count[ys, xs] += 1
        attn[ys, xs, ys, xs] += a.float().reshape(ch, cw, ch, cw)
        attn_count[ys, xs, ys, xs] += 1
    preds = (preds / count).flatten(-2)
    attn = (attn / (attn_count + _WINDOW_EPS)).reshape(h * w, h * w)
    attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(_EPS)
    return propagate(preds, attn)
