"""Measured comparisons behind the speed work: compensation order, early UNet stop, SDPA,
kernels, the text cache."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import compensation
from pipeline.bench.common import Models, count_flops, median_seconds, synced_clock, synthetic_jpeg
from pipeline.config import Config
from pipeline.decode import decode_image
from pipeline.labeler import Labeler
from pipeline.prompts import background_classes, templates
from pipeline.types import LabelRequest

# ---------------------------------------------------------------- chain order


def random_maps(layers: int, heads: int, n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """[layers, heads, n, n] float32 attention-like maps (rows are softmaxes of random logits)."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.empty(layers, heads, n, n)
    for i in range(layers):
        for h in range(heads):
            maps[i, h] = torch.softmax(torch.randn(n, n, generator=g) * 4, dim=-1)
    return maps.to(device)


def full_product_compensate(chain: Sequence[torch.Tensor], coarse: torch.Tensor) -> torch.Tensor:
    """The reference the method rules out: A_f = M_0 @ ... @ M_last formed first, then A_f @ S."""
    side = int(round(chain[0].shape[-1] ** 0.5))
    s = F.interpolate(coarse[None].to(chain[0].dtype), size=(side, side), mode="bilinear", align_corners=False)
    fused = chain[0]
    for m in chain[1:]:
        fused = fused @ m
    return (fused @ s[0].flatten(1).T).T.reshape(-1, side, side)


def chain_comparison(side: int, layers: int, heads: int, classes: int, repeats: int,
                     device: str = "cpu") -> dict[str, float]:  # fmt: skip
    """Right-to-left compensation (the library's) against the full product, on the same maps."""
    maps = random_maps(layers, heads, side * side, device=device)
    coarse = torch.rand(classes, 21, 28, generator=torch.Generator().manual_seed(1)).to(device)
    normalize_s = median_seconds(lambda: compensation.attention_chain(maps, 0.1), repeats, device)
    chain = compensation.attention_chain(maps, 0.1)
    fast = compensation.compensate(chain, coarse)
    slow = full_product_compensate(chain, coarse)
    rtl_s = median_seconds(lambda: compensation.compensate(chain, coarse), repeats, device)
    full_s = median_seconds(lambda: full_product_compensate(chain, coarse), 1, device)  # 1 run: it is slow
    n, k = side * side, layers * heads
    return {
        "n": n, "maps": k, "classes": classes, "normalize_ms": normalize_s * 1e3,
        "right_to_left_ms": rtl_s * 1e3, "full_product_ms": full_s * 1e3, "time_ratio": full_s / rtl_s,
        "right_to_left_gflop": 2 * k * n * n * classes / 1e9,
        "full_product_gflop": (2 * (k - 1) * n**3 + 2 * n * n * classes) / 1e9,
        "max_abs_diff": float((fast - slow).abs().max()),
        "max_rel_diff": float((fast - slow).abs().max() / slow.abs().max()),
    }  # fmt: skip


# ---------------------------------------------------------------- speed work, one run each


def old_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The capture processor's scores before the change: the scale applied to the [B, n, n] result."""
    return torch.bmm(q, k.transpose(1, 2)) * scale


def old_normalize(m: torch.Tensor, thr: float) -> torch.Tensor:
    """normalize_attention before the change: compare, then masked_fill (two passes)."""
    m = m / (m.amax(dim=-2, keepdim=True) + 1e-5)
    m.masked_fill_(m < thr, 0.0)
    return m.div_(m.sum(dim=-1, keepdim=True) + 1e-5)


def wall(fn: Callable[[], object], device: torch.device | str) -> Callable[[], float]:
    """A timer: runs ``fn`` and returns its synchronised wall seconds."""

    def run() -> float:
        t0 = synced_clock(device)
        fn()
        return synced_clock(device) - t0

    return run


def interleaved(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Seconds of every timer over ``repeats`` rounds, each round running every timer once, so a
    load that drifts during the run falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(max(1, repeats)):
        for name, timer in timers.items():
            times[name].append(timer())
    return times


def ab_row(change: str, times: dict[str, list[float]], old: str, new: str, predicted: str,
           same: bool | None = None) -> dict[str, Any]:  # fmt: skip
    """Before/after medians and the median of the per-round ratios old / new."""
    ratios = [o / n for o, n in zip(times[old], times[new], strict=True)]
    return {"change": change, "before_ms": statistics.median(times[old]) * 1e3,
            "after_ms": statistics.median(times[new]) * 1e3, "speedup": statistics.median(ratios),
            "predicted": predicted, "identical": same}  # fmt: skip


def _ab(name: str, old: Callable[[], Any], new: Callable[[], Any], repeats: int, device: str, predicted: str,
        same: bool | None = None) -> dict[str, Any]:  # fmt: skip
    times = interleaved({"old": wall(old, device), "new": wall(new, device)}, repeats)
    return ab_row(name, times, "old", "new", predicted, same)


def unet_inputs(sd: compensation.SDModels, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timestep, context) for one plain UNet pass on ``pixels``."""
    device, dtype = sd.unet.device, sd.unet.dtype
    with torch.no_grad():
        lat = sd.vae.encode(pixels.to(device, sd.vae.dtype)).latent_dist.mean * sd.vae.config.scaling_factor
    t = torch.tensor(981, device=device)
    context = sd.empty_embedding.to(device, dtype).expand(pixels.shape[0], -1, -1)
    return lat.to(dtype), t, context


@contextmanager
def explicit_attention(unet: torch.nn.Module, keep: Sequence[str]) -> Iterator[None]:
    """Every attention layer of ``unet`` but ``keep`` on diffusers' explicit ``AttnProcessor``."""
    from diffusers.models.attention_processor import AttnProcessor

    layers = {n: m for n, m in unet.named_modules() if hasattr(m, "set_processor") and n not in keep}
    previous = {n: m.processor for n, m in layers.items()}
    try:
        for m in layers.values():
            m.set_processor(AttnProcessor())
        yield
    finally:
        for n, m in layers.items():
            m.set_processor(previous[n])


def uncaptured_processors(sd: compensation.SDModels, layers: Sequence[str]) -> dict[str, int]:
    """Processor class names (with counts) of the UNet's attention layers that are not captured."""
    names: dict[str, int] = {}
    for n, m in sd.unet.named_modules():
        if hasattr(m, "set_processor") and n not in layers:
            names[type(m.processor).__name__] = names.get(type(m.processor).__name__, 0) + 1
    return names


class _Stopped(Exception):
    pass


@contextmanager
def stop_after(unet: torch.nn.Module, layers: Sequence[str]) -> Iterator[None]:
    """Forward hooks that stop ``unet`` (raising ``_Stopped``) once every one of ``layers`` ran,
    without touching their processors: the early stop alone, with nothing captured."""
    modules, seen = dict(unet.named_modules()), set()

    def hook(name: str) -> Callable[..., None]:
        def fire(*_: Any) -> None:
            seen.add(name)
            if len(seen) == len(layers):
                seen.clear()
                raise _Stopped

        return fire

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _unet_pass(sd: compensation.SDModels, inputs: tuple[torch.Tensor, ...]) -> None:
    noisy, t, context = inputs
    with suppress(_Stopped):
        sd.unet(noisy, t, encoder_hidden_states=context)


def capture_unet_timer(sd: compensation.SDModels, px: torch.Tensor, layers: Sequence[str],
                       explicit: bool = False) -> Callable[[], float]:  # fmt: skip
    """A timer of the UNet part of ``capture_attention`` (noise, pass, captured maps), with the
    uncaptured layers on diffusers' explicit processor when ``explicit``."""
    device = sd.unet.device

    def run() -> float:
        split: dict[str, float] = {}
        with explicit_attention(sd.unet, layers) if explicit else nullcontext():
            compensation.capture_attention(sd, px, ["x"], layers, timings=split, clock=lambda: synced_clock(device))
        return split["unet_capture"]

    return run


def speedwork_unet(models: Models, cfg: Config, repeats: int) -> list[dict[str, Any]]:
    """The UNet stopped after the captured layers vs a full pass (both SDPA, nothing captured);
    the captured maps' own cost; SDPA vs explicit attention on the uncaptured layers."""
    sd, layers = models.sd, cfg.cliper.sd_layers
    device = str(sd.unet.device)
    px = compensation.sd_pixels(decode_image(synthetic_jpeg(0)))[None]
    inputs = unet_inputs(sd, px)

    def stopped() -> None:
        with stop_after(sd.unet, layers):
            _unet_pass(sd, inputs)

    with torch.no_grad():
        full_f, stopped_f = count_flops(lambda: _unet_pass(sd, inputs)), count_flops(stopped)
        times = interleaved({
            "full": wall(lambda: _unet_pass(sd, inputs), device), "stopped": wall(stopped, device),
            "capture": capture_unet_timer(sd, px, layers), "explicit": capture_unet_timer(sd, px, layers, True),
        }, repeats)  # fmt: skip
    return [
        ab_row("UNet stopped once the captured layers ran (vs full pass; both SDPA, no capture)", times, "full",
               "stopped", f"FLOPs {full_f / 1e9:.4g} -> {stopped_f / 1e9:.4g} G: x{full_f / stopped_f:.3f}"),
        ab_row("(cost, not a change) explicit maps + noise in the captured pass vs the stopped pass", times,
               "capture", "stopped", "2 layers' [heads, n, n] scores and softmax in float32"),
        ab_row("SDPA kept on uncaptured attention layers (vs explicit AttnProcessor); UNet part", times, "explicit",
               "capture", "same FLOPs; no [heads, n, n] probabilities in memory (GPU: bytes, not FLOPs)"),
    ]  # fmt: skip


def speedwork_kernels(heads: int, n: int, head_dim: int, repeats: int, device: str) -> list[dict[str, Any]]:
    """The three exact changes to the capture and compensation tensors, old vs new, on one image's
    shapes; each also checked for bitwise equality."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(heads, n, head_dim, generator=g).to(device) for _ in range(2))
    scale = head_dim**-0.5
    maps = random_maps(2, heads, n, device=device)
    same_scores = torch.equal(old_scores(q, k, scale), compensation.scaled_scores(q, k, scale))
    new_chain = compensation.attention_chain([maps[0], maps[1]], 0.1)
    same_norm = all(torch.equal(old_normalize(m, 0.1), c) for m, c in zip(maps.flatten(0, 1), new_chain, strict=True))
    stacked = compensation.attention_chain(torch.stack([maps[0], maps[1]]), 0.1)
    same_stack = all(torch.equal(a, b) for a, b in zip(stacked, new_chain, strict=True))
    del new_chain, stacked
    folded = math.frexp(scale)[0] == 0.5
    return [
        _ab(f"softmax scale folded into q (scale {scale:.4g}: {'a power of two, folded' if folded else 'not folded'})",
            lambda: old_scores(q, k, scale), lambda: compensation.scaled_scores(q, k, scale), repeats, device,
            "passes over the [heads, n, n] scores 3 -> 1: up to x3 where memory-bound, less where the bmm "
            "dominates" if folded else "x1 (unchanged path)", same_scores),
        _ab("threshold in one pass (F.threshold) instead of compare + masked_fill",
            lambda: [old_normalize(m, 0.1) for m in maps.flatten(0, 1)],
            lambda: compensation.attention_chain(maps, 0.1), repeats, device,
            "passes over each n x n map 9.5 -> 8: x1.19 where memory-bound", same_norm),
        _ab("no stacked [layers, heads, n, n] copy before the chain",
            lambda: compensation.attention_chain(torch.stack([maps[0], maps[1]]), 0.1),
            lambda: compensation.attention_chain([maps[0], maps[1]], 0.1), repeats, device,
            "passes over each map 10 -> 8: x1.25 where memory-bound", same_stack),
    ]  # fmt: skip


def speedwork_text(labeler: Labeler, repeats: int) -> dict[str, Any]:
    """Model stages of one image with the text embeddings cached (the labeler's way) against the
    same plus what an uncached labeler adds: every tag's templates and the background classes
    through the text encoder."""
    cfg, clip, n_tags = labeler.config.cliper, labeler.clip, len(labeler.categories)
    device = clip.model.logit_scale.device
    prompts = [c.prompt for c in labeler.categories.values()] + list(background_classes(cfg.background))
    tokens = [clip.tokenizer([t.format(p) for t in templates(cfg.templates)]).to(device) for p in prompts]

    def encode_all() -> None:
        with torch.no_grad():
            for tok in tokens:
                clip.model.encode_text(tok)

    req = LabelRequest("t", decode_image(synthetic_jpeg(0)), tuple(labeler.categories))
    labeler.infer([req])  # warm: the tags' own text embeddings are made here, not counted below
    same = text_cache_identical(labeler, req)
    image_flops = count_flops(lambda: labeler.infer([req]))
    text_flops = count_flops(encode_all)
    cached = median_seconds(lambda: labeler.infer([req]), repeats, device)
    text = median_seconds(encode_all, 1, device)  # one run: long at full size
    return {"change": f"text embeddings cached ({n_tags} tags + {len(prompts) - n_tags} background classes "
                      f"x {len(templates(cfg.templates))} templates encoded once, not per image)",
            "before_ms": (cached + text) * 1e3, "after_ms": cached * 1e3, "speedup": (cached + text) / cached,
            "predicted": f"FLOPs {(image_flops + text_flops) / 1e9:.4g} -> {image_flops / 1e9:.4g} G: "
                         f"x{(image_flops + text_flops) / image_flops:.3f}",
            "identical": same}  # fmt: skip


def text_cache_identical(labeler: Labeler, req: LabelRequest) -> bool:
    """Whether ``req`` labelled by ``labeler`` (its text cache already used by an earlier image)
    gives byte-identical arrays to a new labeler that encodes every prompt afresh."""
    other = LabelRequest("t-warm", decode_image(synthetic_jpeg(1)), req.tags)
    cached = labeler.label([other, req])[1]
    fresh = Labeler(labeler.clip, labeler.sd, labeler.config, list(labeler.categories.values())).label([req])[0]
    return all(np.array_equal(getattr(cached, name), getattr(fresh, name))
               for name in ("label_map", "coarse", "compensated", "coarse_scores", "final_scores",
                            "decision"))  # fmt: skip


