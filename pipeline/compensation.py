"""Fine-grained compensation with Stable Diffusion self-attention (cliper-method.md section 3).

``capture_attention`` runs the VAE encoder and one UNet pass and returns the self-attention
probabilities of the requested layers; the rest are pure tensor functions.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SD_SIZE = 512
_EPS = 1e-5  # the published constant for both normalisations of section 3 step 3


def noise_seed(image_id: str) -> int:
    """First 8 bytes of SHA-256 of the id's string form, little-endian unsigned, mod 2**63."""
    digest = hashlib.sha256(str(image_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def image_noise(image_id: str, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal float32 noise drawn on the CPU from the id's seed: the same on any device,
    in any batch, on every rerun."""
    gen = torch.Generator(device="cpu").manual_seed(noise_seed(image_id))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32)


def sd_pixels(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 RGB -> [3, 512, 512] float32 in [-1, 1], nearest-neighbour resize of [0, 1] floats."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(SD_SIZE, SD_SIZE))  # mode="nearest", as diffusers' processor does
    return x[0] * 2.0 - 1.0


def scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(q @ k^T) * scale for [B, n, d] q and k. A power-of-two scale (1/8 for SD's 64-wide heads)
    is applied to q instead: multiplying by 2**e is exact, so every product and partial sum is
    exactly 2**e times the unscaled one and the result is bitwise the same, without a pass over
    the [B, n, n] scores."""
    if scale > 0 and math.frexp(scale)[0] == 0.5:
        return torch.bmm(q * scale, k.transpose(1, 2))
    return torch.bmm(q, k.transpose(1, 2)) * scale


class _Stop(Exception):
    """Raised inside the UNet once every requested map is captured: nothing after it is needed."""


class _CaptureProcessor:
    """Attention processor that computes self-attention explicitly and keeps its probabilities."""

    def __init__(self, name: str, store: dict[str, torch.Tensor], wanted: int) -> None:
        self.name, self.store, self.wanted = name, store, wanted

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **kwargs: Any) -> torch.Tensor:  # fmt: skip
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise ValueError(f"{self.name}: only 3-D self-attention (attn1) can be captured")
        b, n, _ = hidden_states.shape
        q, k, v = (attn.head_to_batch_dim(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        probs = torch.softmax(scaled_scores(q.float(), k.float(), attn.scale), dim=-1)
        self.store[self.name] = probs.reshape(b, attn.heads, n, n)
        if len(self.store) == self.wanted:
            raise _Stop
        out = attn.batch_to_head_dim(torch.bmm(probs.to(v.dtype), v))
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@dataclass
class SDModels:
    """What compensation needs from a Stable Diffusion checkpoint, loaded once per process."""

    vae: Any  # diffusers AutoencoderKL (its decoder may be dropped)
    unet: Any  # diffusers UNet2DConditionModel
    scheduler: Any  # the checkpoint's own scheduler
    empty_embedding: torch.Tensor  # [1, tokens, dim], the empty prompt through the text encoder


@torch.no_grad()
def capture_attention(
    sd: SDModels,
    pixels: torch.Tensor,
    image_ids: Sequence[str],
    layers: Sequence[str],
    timestep_index: int = 45,
    num_inference_steps: int = 50,
    timings: dict[str, float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, torch.Tensor]:
    """Self-attention probabilities of ``layers`` for [B, 3, 512, 512] pixels in [-1, 1].

    Returns {layer name: [B, heads, n, n] float32} after VAE encoding (latent mean x scaling
    factor), per-image seeded noise at the scheduler's timestep, and one UNet pass on the empty
    prompt, stopped once the last requested layer has run. Only the requested layers compute
    attention explicitly; the others keep their processor (PyTorch SDPA in diffusers).
    ``timings``, when given, receives the seconds of the batch's ``vae_encode`` and
    ``unet_capture`` read from ``clock`` (on CUDA, pass a clock that synchronises the device).
    """
    if len(image_ids) != pixels.shape[0]:
        raise ValueError(f"{len(image_ids)} image ids for a batch of {pixels.shape[0]} images")
    device, dtype = sd.unet.device, sd.unet.dtype
    t0 = clock()
    latents = sd.vae.encode(pixels.to(device, sd.vae.dtype)).latent_dist.mean * sd.vae.config.scaling_factor
    t1 = clock()
    noise = torch.stack([image_noise(i, latents.shape[1:]) for i in image_ids]).to(device)
    sd.scheduler.set_timesteps(num_inference_steps)
    t = sd.scheduler.timesteps[timestep_index]
    noisy = sd.scheduler.add_noise(latents.float(), noise, t.repeat(len(image_ids))).to(dtype)
    store: dict[str, torch.Tensor] = {}
    modules = dict(sd.unet.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"UNet has no attention layer(s) {missing}")
    previous = {name: modules[name].processor for name in layers}
    try:
        for name in layers:
            modules[name].set_processor(_CaptureProcessor(name, store, len(layers)))
        context = sd.empty_embedding.to(device, dtype).expand(len(image_ids), -1, -1)
        sd.unet(noisy, t.to(device), encoder_hidden_states=context)
    except _Stop:
        pass
    finally:
        for name, proc in previous.items():
            modules[name].set_processor(proc)
    if len(store) != len(layers):
        raise RuntimeError(f"captured {sorted(store)} of the requested layers {list(layers)}")
    if timings is not None:
        timings.update(vae_encode=t1 - t0, unet_capture=clock() - t1)
    return {name: store[name] for name in layers}


def normalize_attention(m: torch.Tensor, thr: float) -> torch.Tensor:
    """Section 3 step 3 on [..., n, n]: divide by column maxima (+1e-5), zero entries below
    ``thr``, divide by row sums (+1e-5)."""
    m = m / (m.amax(dim=-2, keepdim=True) + _EPS)  # the one copy; the rest works in place
    # Zeroes exactly the entries where ``m < thr`` (as masked_fill would), in one pass, not two.
    F.threshold(m, _below(thr, m.dtype), 0.0, inplace=True)
    return m.div_(m.sum(dim=-1, keepdim=True) + _EPS)


def _below(thr: float, dtype: torch.dtype) -> float:
    """The value t of ``dtype`` such that, for x of that dtype, ``x > t`` holds exactly when
    ``x < thr`` does not (``thr`` is compared as torch compares a Python scalar)."""
    cut = torch.tensor(thr, dtype=dtype)
    if bool(cut < thr):  # thr rounded down in dtype: the first value kept is the next one up
        cut = torch.nextafter(cut, torch.tensor(math.inf, dtype=dtype))
    return float(torch.nextafter(cut, torch.tensor(-math.inf, dtype=dtype)))


def attention_chain(maps: torch.Tensor | Sequence[torch.Tensor], thr: float) -> list[torch.Tensor]:
    """Captured maps, [layers, heads, n, n] or one [heads, n, n] per layer (layer order as
    configured) -> the normalised chain M_0 .. M_{layers*heads-1}."""
    return [normalize_attention(m, thr) for layer in maps for m in layer]


def compensate(chain: Sequence[torch.Tensor], coarse: torch.Tensor) -> torch.Tensor:
    """R = M_0 @ (M_1 @ (... (M_last @ S))) for a [C, h, w] coarse map; returns [C, side, side]
    with side**2 = n. Right to left, the n x n product is never formed."""
    side = int(round(chain[0].shape[-1] ** 0.5))
    s = F.interpolate(coarse[None].to(chain[0].dtype), size=(side, side), mode="bilinear", align_corners=False)
    r = s[0].flatten(1).T  # [n, C]
    for m in reversed(chain):
        r = m @ r
    return r.T.reshape(-1, side, side)
