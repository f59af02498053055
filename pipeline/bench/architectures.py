"""Model shapes built from configs, for tests and benchmarks (no weights are downloaded).

``sd21_base`` holds the published Stable Diffusion 2.1 base component configs; ``tiny`` shrinks
every width while keeping the structure compensation relies on (a 64 x 64 latent, two attention
layers in ``up_blocks[3]``). ``save_models`` writes a model pair with the real save code, in the
formats production loads: an open_clip config JSON plus state dict, and a diffusers directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_SCHEDULER = {  # SD 2.1 base's scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}  # fmt: skip

SD_SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "sd21-base": {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024, use_linear_projection=True,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text": dict(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
            projection_dim=512,
        ),
    },
    "tiny": {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 16, 32, 32), attention_head_dim=(2, 2, 4, 4), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32, use_linear_projection=True,
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=512,
            scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        "text": dict(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
            projection_dim=32,
        ),
    },
}  # fmt: skip

CLIP_TINY: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def build_sd(shape: str = "tiny", seed: int = 0) -> dict[str, Any]:
    """Random-weight {unet, vae, text_encoder, scheduler} of the named shape."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = SD_SHAPES[shape]
    torch.manual_seed(seed)
    return {
        "unet": diffusers.UNet2DConditionModel(**cfg["unet"]).eval(),
        "vae": diffusers.AutoencoderKL(**cfg["vae"]).eval(),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text"])).eval(),
        "scheduler": diffusers.PNDMScheduler.from_config(_SCHEDULER),
    }


def build_clip(model: str | dict[str, Any] = "tiny", seed: int = 0) -> Any:
    """Random-weight open_clip model: an open_clip name (``ViT-B-16``) or ``tiny``."""
    import open_clip

    torch.manual_seed(seed)
    if model == "tiny" or isinstance(model, dict):
        cfg = CLIP_TINY if model == "tiny" else model
        return open_clip.model.CLIP(**cfg).eval()
    return open_clip.create_model(model, pretrained=None).eval()


def _tokenizer_files(directory: Path) -> None:
    """A CLIP tokenizer built from open_clip's own BPE merges (the vocabulary SD's tokenizer uses)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")
    tok = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    tok.save_pretrained(directory)


def save_models(out: str | Path, clip: str = "tiny", sd: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write a CLIP checkpoint (config JSON + state dict) and a diffusers SD directory.

    Returns {"clip_config", "clip_checkpoint", "sd_dir"}.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clip_cfg = out / f"{'cliper-tiny' if clip == 'tiny' else clip}.json"
    if clip == "tiny":
        clip_cfg.write_text(json.dumps(CLIP_TINY, indent=2))
    else:
        import open_clip

        clip_cfg.write_text(json.dumps(open_clip.get_model_config(clip), indent=2))
    model = build_clip(clip, seed)
    torch.save(model.state_dict(), out / "clip.pt")
    sd_dir = out / "sd"
    parts = build_sd(sd, seed)
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        parts[name].save_pretrained(sd_dir / name)
    _tokenizer_files(sd_dir / "tokenizer")
    (sd_dir / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return {"clip_config": clip_cfg, "clip_checkpoint": out / "clip.pt", "sd_dir": sd_dir}


def sd_models(shape: str = "tiny", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """In-memory ``SDModels`` of the named shape (for benchmarks: no files written)."""
    from pipeline.compensation import SDModels

    parts = build_sd(shape, seed)
    ids = torch.tensor([[49406] + [49407] * 76])  # "" as CLIP's tokenizer pads it
    with torch.no_grad():
        empty = parts["text_encoder"](ids)[0]
    parts["vae"].decoder = None
    return SDModels(
        vae=parts["vae"].to(device, dtype),
        unet=parts["unet"].to(device, dtype),
        scheduler=parts["scheduler"],
        empty_embedding=empty.to(device, dtype),
    )


def clip_models(model: str = "tiny", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """In-memory ``ClipModels`` of an open_clip architecture name or ``tiny``."""
    import open_clip

    from pipeline.models import ClipModels

    clip = build_clip(model, seed).to(device, dtype).requires_grad_(False)
    return ClipModels(
        model=clip,
        tokenizer=open_clip.get_tokenizer("ViT-B-16" if model == "tiny" else model),
        patch_size=int(clip.visual.conv1.stride[0]),
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
    )
