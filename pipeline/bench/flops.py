"""FLOPs (FlopCounterMode on the real modules) and bytes per image, and the H100 bounds they imply."""

from __future__ import annotations

import torch

from pipeline import cliper, compensation
from pipeline.bench.common import GOAL_IMAGES_PER_S, H100, Models, count_flops, preset_config, synthetic_jpeg
from pipeline.bench.speedwork import random_maps, unet_inputs
from pipeline.config import Config
from pipeline.decode import decode_image

# ---------------------------------------------------------------- FLOPs and bytes


def n_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def model_flops(models: Models, n_tags: int) -> dict[str, int]:
    """FLOPs per image (batch 1, a 500 x 375 input) of each model stage, as they run in the labeler."""
    clip, sd = models.clip, models.sd
    cfg = preset_config(models)
    image = decode_image(synthetic_jpeg(0))
    device, dtype = clip.model.logit_scale.device, clip.model.visual.conv1.weight.dtype
    pixels = cliper.clip_input(image, clip.patch_size, clip.mean, clip.std, cfg.cliper.short_side)[None]
    pixels = pixels.to(device, dtype)
    px = compensation.sd_pixels(image)[None]
    noisy, t, context = unet_inputs(sd, px)
    capture = count_flops(lambda: compensation.capture_attention(sd, px, ["x"], cfg.cliper.sd_layers))
    vae = count_flops(lambda: sd.vae.encode(px.to(sd.vae.device, sd.vae.dtype)))
    maps = random_maps(len(cfg.cliper.sd_layers), captured_heads(sd, cfg), 64 * 64)
    chain = compensation.attention_chain(maps, 0.1)
    return {
        "clip_coarse": count_flops(lambda: cliper.early_layer_fusion(clip.model.visual, pixels)),
        "vae_encode": vae,
        "unet_capture": capture - vae,
        "unet_full_pass": count_flops(lambda: sd.unet(noisy, t, encoder_hidden_states=context)),
        "compensation": count_flops(lambda: compensation.compensate(chain, torch.rand(n_tags, 21, 28))),
    }  # fmt: skip


def captured_heads(sd: compensation.SDModels, cfg: Config) -> int:
    modules = dict(sd.unet.named_modules())
    return int(modules[cfg.cliper.sd_layers[0]].heads)


def byte_counts(models: Models) -> dict[str, float]:
    """Weights read per batch (bf16 and fp32) and the attention maps' bytes per image."""
    cfg = preset_config(models)
    heads = captured_heads(models.sd, cfg)
    n = 64 * 64
    vae = n_params(models.sd.vae.encoder) + n_params(models.sd.vae.quant_conv)
    params = n_params(models.clip.model.visual) + vae + n_params(models.sd.unet)
    maps = len(cfg.cliper.sd_layers) * heads * n * n * 4
    return {
        "params": params, "weights_bytes_bf16": 2 * params, "weights_bytes_fp32": 4 * params,
        "attention_maps_bytes": maps,
        # reads+writes of each n x n map: capture (bmm write, softmax read+write) 3, normalisation
        # 8, the chain's matvec 1 (after the speed work; 5 + 12.5 before)
        "capture_traffic_bytes": 3 * maps, "compensation_traffic_bytes": 9 * maps,
        "compensation_traffic_bytes_before": 12.5 * maps, "capture_traffic_bytes_before": 5 * maps,
    }  # fmt: skip


def ceilings(flops: dict[str, int], nbytes: dict[str, float]) -> dict[str, float]:
    """H100 images/s bounds: FLOP-bound per precision; what the goal needs; compensation's
    memory-bound time against the FLOP-bound time of the rest."""
    per_image = flops["clip_coarse"] + flops["vae_encode"] + flops["unet_capture"] + flops["compensation"]
    out: dict[str, float] = {"flops_per_image": per_image}
    for prec in ("bf16", "tf32", "fp32"):
        out[f"ceiling_{prec}_images_per_s"] = H100[f"{prec}_tflops"] * 1e12 / per_image
        out[f"goal_needs_{prec}_utilisation"] = GOAL_IMAGES_PER_S * per_image / (H100[f"{prec}_tflops"] * 1e12)
    bw = H100["hbm_tb_s"] * 1e12
    out["compensation_ms_at_hbm"] = nbytes["compensation_traffic_bytes"] / bw * 1e3
    out["compensation_ms_at_hbm_before"] = nbytes["compensation_traffic_bytes_before"] / bw * 1e3
    out["capture_maps_ms_at_hbm"] = nbytes["capture_traffic_bytes"] / bw * 1e3
    out["goal_ms_per_image"] = 1e3 / GOAL_IMAGES_PER_S
    out["compensation_share_at_goal"] = out["compensation_ms_at_hbm"] / out["goal_ms_per_image"]
    # At the BF16 FLOP ceiling, with the maps' traffic at full HBM bandwidth beside it.
    flop_ms = per_image / (H100["bf16_tflops"] * 1e12) * 1e3
    gpu_ms = flop_ms + out["compensation_ms_at_hbm"] + out["capture_maps_ms_at_hbm"]
    out["bf16_bound_ms_per_image"] = gpu_ms
    out["bf16_bound_images_per_s"] = 1e3 / gpu_ms
    out["compensation_share_at_bf16_bound"] = out["compensation_ms_at_hbm"] / gpu_ms
    return out


