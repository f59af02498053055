"""The method registry: lookup, a third method plugged in with one registry line, CLIPer and
CLIP-ES through the shared assembly, SD only when a method needs it, and CLIP-ES end to end
through jobs/label_coco.py without any SD weights."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import clip_es, clip_es_prompts, manifest, methods, pngs
from pipeline.config import PRESETS, build_config
from pipeline.labeler import Labeler
from pipeline.methods.base import Assembly, Method, MethodOutput
from pipeline.models import WeightsUnavailableError, load_models, model_fingerprint
from pipeline.shards import label_shard
from pipeline.storage import layout
from pipeline.storage.store import Store
from pipeline.types import LabelRequest
from tests.conftest import CATEGORIES, blob_image, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


# --- registry ---------------------------------------------------------------------------------


def test_the_registry_maps_names_to_methods_and_refuses_unknown_ones():
    assert methods.get("cliper").name == "cliper" and methods.get("clip-es").name == "clip-es"
    with pytest.raises(ValueError, match="unknown method 'clipes'; known methods: clip-es, cliper"):
        methods.get("clipes")
    with pytest.raises(ValueError, match="unknown method 'sam'"):
        build_config("voc-vit-b16", {"method": "sam"})


class Bands(Method):
    """A third method, defined here: tag k scores 0.9 in the k-th quarter of the columns."""

    name = "bands"

    def assembly(self) -> Assembly:
        return Assembly(scale_by_score=False, bkg_thre=0.5)

    def infer(self, items, clock) -> None:
        for item in items:
            h, w = item.request.image.shape[:2]
            maps = torch.zeros(len(item.class_ids), h, w)
            for k in range(len(item.class_ids)):
                maps[k, :, k * w // 4 : (k + 1) * w // 4] = 0.9
            scores = torch.full((len(item.class_ids),), 0.8)
            item.output = MethodOutput(maps, scores, maps, scores, {"bands": maps})


def _jpeg_bytes(h: int, w: int, seed: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(blob_image(h, w, seed)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_method_registered_in_one_line_labels_a_shard(labeler, tiny_paths, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "bands", Bands)  # the "one registry line"
    fs = fsspec.filesystem("memory")
    root = "memory://methods-bands"
    fs.pipe({f"{root}/a.png": _jpeg_bytes(30, 40, 1), f"{root}/b.png": _jpeg_bytes(24, 36, 2)})
    records = [{"id": "a", "uri": f"{root}/a.png", "tags": [7, 1, 7]},
               {"id": "b", "uri": f"{root}/b.png", "tags": [15]}]  # fmt: skip
    cfg = build_config("voc-vit-b16", {**tiny_overrides(tiny_paths), "method": "bands", "refine": {"enabled": False}})
    bands = Labeler(labeler.clip, None, cfg, CATEGORIES)
    assert isinstance(bands.method, Bands)
    store = Store.open("memory://methods-bands-out")
    shard = next(manifest.shards(records, 10))
    label_shard(bands, store, shard, "b" * 64)
    expected = {"a": np.zeros((30, 40), np.uint8), "b": np.zeros((24, 36), np.uint8)}
    expected["a"][:, 0:10], expected["a"][:, 10:20] = 7, 1  # first tag, second tag (repeat dropped)
    expected["b"][:, 0:9] = 15
    for image_id, want in expected.items():
        got = pngs.decode_png(store.read(layout.label_file(shard.names[image_id].label)))
        assert np.array_equal(got, want), image_id
    fs.rm(root, recursive=True)


def test_discovery_needs_a_method_that_supports_it(labeler, tiny_paths, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "bands", Bands)
    with pytest.raises(ValueError, match=r"method 'bands' cannot run discovery.*set discovery.enabled to false, "
                                         r"or use one of \['clip-es', 'cliper'\]"):  # fmt: skip
        build_config("voc-vit-b16", {"method": "bands", "discovery": {"enabled": True}})
    assert build_config("voc-vit-b16", {"method": "bands"}).method == "bands"  # discovery off: fine
    for name, cls in methods.REGISTRY.items():
        if cls.supports_discovery:
            assert cls.embed_prompts is not Method.embed_prompts, name
            assert build_config("voc-vit-b16", {"method": name, "discovery": {"enabled": True}}).discovery.enabled

    class Claims(Bands):  # says it supports discovery, gives no tokens
        name = "claims"
        supports_discovery = True

        def embed_prompts(self, prompts):
            return torch.eye(len(prompts), 4)

    monkeypatch.setitem(methods.REGISTRY, "claims", Claims)
    cfg = build_config("voc-vit-b16", {**tiny_overrides(tiny_paths), "method": "claims", "refine": {"enabled": False},
                                       "discovery": {"enabled": True}})  # fmt: skip
    with pytest.raises(RuntimeError, match="method claims gave no tokens for image x with discovery on"):
        Labeler(labeler.clip, None, cfg, CATEGORIES).label([LabelRequest("x", blob_image(24, 32), (1,))])


# --- CLIP-ES through the shared path ----------------------------------------------------------


def _published(clip, image: np.ndarray, names: list[str], ids: tuple[int, ...], dataset: str):
    maps = clip_es.clip_es_maps(clip, image, clip_es_prompts.class_prompts(names, dataset),
                                clip_es_prompts.background_prompts(dataset),
                                clip_es_prompts.BOX_THRESHOLDS[dataset])  # fmt: skip
    return maps, clip_es.label_map(maps.refined.numpy(), ids)


@pytest.mark.parametrize("preset,dataset", [("clip-es-voc", "voc"), ("clip-es-coco", "coco")])
def test_clip_es_labels_equal_the_published_rule_on_the_same_maps(labeler, tiny_paths, preset, dataset):
    cfg = build_config(preset, tiny_overrides(tiny_paths))
    assert cfg.method == "clip-es" and not cfg.refine.enabled
    es = Labeler(labeler.clip, None, cfg, CATEGORIES)  # no SD at all
    distinct = 0
    for seed in range(3):
        image = blob_image(45 + seed, 61, seed)
        got = es.label([LabelRequest("x", image, (15, 1, 15))])[0]
        maps, want = _published(labeler.clip, image, ["person", "cat"], (15, 1), dataset)
        assert got.class_ids == (15, 1)
        assert got.label_map.tobytes() == want.tobytes()
        assert np.array_equal(got.maps["cam"], maps.cam.numpy()) and got.maps["cam"].shape[1:] == (3, 4)
        assert np.array_equal(got.maps["refined"], maps.refined.numpy())
        assert got.compensated.shape == (2, *image.shape[:2])
        assert np.array_equal(got.final_scores, maps.scores.numpy())
        distinct += len(np.unique(want)) > 1
    assert distinct  # the check compared label maps with more than one class in them


def test_superpixels_and_ignore_margins_apply_to_clip_es(labeler, tiny_paths):
    from pipeline import refine

    cfg = build_config("clip-es-voc", {**tiny_overrides(tiny_paths), "refine": {"enabled": True}})
    es = Labeler(labeler.clip, None, cfg, CATEGORIES)
    image = blob_image(48, 64, 4)
    got = es.label([LabelRequest("x", image, (1, 7))])[0]
    segments = refine.superpixels(image, cfg.refine)
    assert np.array_equal(got.segments, segments)
    for s in np.unique(segments):
        assert len(np.unique(got.label_map[segments == s])) == 1  # one label per superpixel
    wide = build_config("clip-es-voc", {**tiny_overrides(tiny_paths), "labels": {"ignore_margin": 1.0}})
    ignored = Labeler(labeler.clip, None, wide, CATEGORIES).label([LabelRequest("x", image, (1, 7))])[0]
    assert (ignored.label_map == 255).mean() > 0.5


# --- config and weights -----------------------------------------------------------------------


def test_method_settings_are_validated_and_fingerprinted(tiny_paths):
    voc, coco = build_config("clip-es-voc"), build_config("clip-es-coco")
    assert (voc.clip_es.box_threshold, coco.clip_es.box_threshold) == (0.4, 0.7)
    assert voc.fingerprint() != coco.fingerprint()
    assert build_config("voc-vit-b16", {"method": "clip-es"}).fingerprint() != build_config("voc-vit-b16").fingerprint()
    # Another method's settings cannot change CLIPer's labels, so they leave its fingerprint alone.
    other_settings = build_config("voc-vit-b16", {"clip_es": {"box_threshold": 0.5}})
    assert other_settings.fingerprint() == build_config().fingerprint()
    assert build_config("clip-es-voc", {"clip_es": {"box_threshold": 0.5}}).fingerprint() != voc.fingerprint()
    for bad, message in [({"box_threshold": 1.5}, "clip_es.box_threshold must lie in"),
                         ({"dataset": "ade"}, "clip_es.dataset must be one of"),
                         ({"background": []}, "clip_es.background is empty")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            build_config("clip-es-voc", {"clip_es": bad})
    with pytest.raises(ValueError, match="CLIP-ES labels the image's tags only"):
        build_config("clip-es-voc", {"cliper": {"open_vocab": True}})


def test_sd_is_neither_looked_for_loaded_nor_fingerprinted_without_a_method_that_needs_it(tiny_paths, tmp_path):
    cfg = build_config("clip-es-voc", tiny_overrides(tiny_paths))
    absent = dataclasses.replace(cfg.model, sd=dataclasses.replace(cfg.model.sd, checkpoint=str(tmp_path / "no-sd")))
    assert not methods.needs_sd(cfg)
    assert not methods.needs_sd(build_config("voc-vit-b16", {"cliper": {"compensation": False}}))
    assert methods.needs_sd(build_config("voc-vit-b16"))
    fp = model_fingerprint(absent, need_sd=False)
    assert set(fp) == {"clip", "dtype"}
    clip, sd = load_models(absent, need_sd=False)
    assert sd is None and clip.patch_size == 16
    with pytest.raises(WeightsUnavailableError):
        model_fingerprint(absent)  # CLIPer with compensation still wants SD
    with_sd = model_fingerprint(cfg.model)
    assert with_sd["clip"] == fp["clip"] and "sha256" in with_sd["sd"]


BATCH_INVARIANT = sorted(p for p, v in PRESETS.items() if methods.get(v.get("method", "cliper")).batch_invariant)


@pytest.mark.parametrize("preset", BATCH_INVARIANT)
def test_a_method_claiming_batch_invariance_labels_alike_at_every_batch_size(tiny_paths, preset):
    """``Method.batch_invariant`` takes the batch size out of the run's identity, so a resume may
    change it: the label maps must then be equal byte for byte at batch 1, 2 and 8."""
    assert BATCH_INVARIANT == ["clip-es-coco", "clip-es-voc"]
    cfg = build_config(preset, tiny_overrides(tiny_paths))
    labeler = Labeler.from_config(cfg, CATEGORIES)
    shapes, tags = [(48, 64), (64, 48), (48, 64), (40, 80), (48, 64)], [(1,), (1, 7), (7, 15), (15,), (15, 1)]
    requests = [
        LabelRequest(f"im{i}", blob_image(h, w, seed=i), t)
        for i, ((h, w), t) in enumerate(zip(shapes, tags, strict=True))
    ]
    maps = {}
    for size in (1, 2, 8):
        labeler.config = dataclasses.replace(cfg, batch_size=size)
        results = [r for s in range(0, len(requests), size) for r in labeler.label(requests[s : s + size])]
        maps[size] = [r.label_map.tobytes() for r in results]
    assert maps[1] == maps[2] == maps[8]
    assert len({v for m in maps[1] for v in set(m)}) > 2  # background and at least two classes: not a blank map


def test_an_actor_for_cliper_without_compensation_never_looks_for_loads_or_holds_sd(tiny_config, tmp_path):
    """The runner's actor gets the frozen config as it is; with compensation off no SD is resolved
    (its checkpoint here does not exist), fingerprinted or held."""
    from pipeline.runner import _LabelActor

    cfg = dataclasses.replace(
        tiny_config, cliper=dataclasses.replace(tiny_config.cliper, compensation=False),
        model=dataclasses.replace(tiny_config.model, sd=dataclasses.replace(tiny_config.model.sd,
                                                                            checkpoint=str(tmp_path / "no-sd"))),
    )  # fmt: skip
    fp = model_fingerprint(cfg.model, need_sd=methods.needs_sd(cfg))
    assert set(fp) == {"clip", "dtype"}
    actor = _LabelActor(cfg, CATEGORIES, str(tmp_path / "out"), {}, None, fp)
    assert actor.labeler.config is cfg and actor.labeler.sd is None and actor.labeler.method.sd is None


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_explain_dumps_clip_es_own_maps_without_sd(tiny_paths, tmp_path):
    image = tmp_path / "rgb_50x70.png"
    Image.fromarray(blob_image(50, 70, 5)).save(image)
    out = tmp_path / "explain"
    proc = subprocess.run(
        [sys.executable, "jobs/explain.py", "--preset", "clip-es-voc", "--image", str(image), "--tags", "cat,dog",
         "--clip-model", str(tiny_paths["clip_config"]), "--clip-checkpoint", str(tiny_paths["clip_checkpoint"]),
         "--device", "cpu", "--out", str(out), "--dump", str(out / "maps.npz")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert all((out / f"{name}.png").is_file() for name in ("cam", "refined", "box_mask", "overlay"))
    maps = np.load(out / "maps.npz")
    assert str(maps["method"]) == "clip-es" and maps["maps"].tolist() == ["cam", "refined", "box_mask"]
    assert maps["cam"].shape == (2, 4, 5) and maps["refined"].shape == (2, 50, 70)  # 50x70 -> 64x80 input
    assert maps["class_ids"].tolist() == [8, 12]
    assert maps["label_map"].tobytes() == clip_es.label_map(maps["refined"], (8, 12)).tobytes()


def test_a_labeler_copy_with_another_config_gives_its_method_that_config(labeler):
    import copy

    other = copy.copy(labeler)  # as jobs/benchmark.py's with_batch_size
    other.config = dataclasses.replace(labeler.config, batch_size=3)
    assert other.method.config.batch_size == 3 and other.method is not labeler.method
    assert labeler.method.config.batch_size == labeler.config.batch_size != 3


def test_cliper_behind_the_registry_is_the_pure_functions_composed(labeler):
    """The registry's CLIPer = cliper.* then compensation.* then labels.*, called directly here in
    the published order (one image, batch 1, the VOC preset: dataset candidates, compensation on)."""
    from pipeline import cliper, compensation, labels, refine

    cfg, clip = labeler.config, labeler.clip
    c = cfg.cliper
    image, tags = blob_image(40, 52, 6), (15, 1)
    got = labeler.label([LabelRequest("img-6", image, tags)])[0]
    text = labeler._work(LabelRequest("img-6", image, tags)).text  # pinned in test_fidelity
    pixels = cliper.clip_input(image, clip.patch_size, clip.mean, clip.std, c.short_side)[None]
    fusion = cliper.early_layer_fusion(clip.model.visual, pixels)
    probs = torch.softmax(cliper.layer_logits(fusion, text, c.logit_scale), dim=-1)[..., :3][..., [2, 0]]
    attn = cliper.patch_attention(fusion.attn_last)
    coarse = cliper.fuse_layers(probs.transpose(-1, -2), attn, c.select_layer, c.attention_thr, fusion.grid)[0]
    maps = compensation.capture_attention(labeler.sd, compensation.sd_pixels(image)[None], ["img-6"], c.sd_layers,
                                          c.sd_timestep_index, c.sd_num_inference_steps)  # fmt: skip
    chain = compensation.attention_chain([maps[name][0] for name in c.sd_layers], c.attention_thr)
    refined = compensation.compensate(chain, coarse)
    final = 0.5 * cliper.class_scores(refined[None])[0] + 0.5 * cliper.class_scores(coarse[None])[0]
    full = labels.full_resolution_scores(refined, final, image.shape[:2])
    decision = labels.decision_scores(full, is_normalize=c.is_normalize,
                                      segments=refine.superpixels(image, cfg.refine), refine=cfg.refine)  # fmt: skip
    label_map = labels.assemble_label_map(decision, tags, c.bkg_thre, cfg.labels)
    assert got.coarse.tobytes() == coarse.numpy().tobytes()
    assert got.compensated.tobytes() == refined.numpy().tobytes()
    assert got.final_scores.tobytes() == final.numpy().tobytes()
    assert got.label_map.tobytes() == label_map.tobytes()
