"""pipeline.bench (jobs/benchmark.py) on tiny models: its references, counts and tables can be trusted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import bench as benchmark
from pipeline.decode import decode_image
from pipeline.labeler import Labeler
from pipeline.types import LabelRequest


@pytest.fixture(scope="module")
def tiny() -> Labeler:
    return benchmark.make_labeler(benchmark.build_models("tiny", "cpu"), 1, n_tags=2)


def test_the_full_product_reference_equals_the_library_chain():
    out = benchmark.chain_comparison(side=8, layers=2, heads=3, classes=2, repeats=1)
    assert out["maps"] == 6 and out["n"] == 64
    assert out["max_rel_diff"] < 1e-5
    # 5 products of 64^3 against 6 products of [64, 64] x [64, 2]: the counts the doc quotes.
    assert out["full_product_gflop"] == pytest.approx((2 * 5 * 64**3 + 2 * 64 * 64 * 2) / 1e9)
    assert out["right_to_left_gflop"] == pytest.approx(2 * 6 * 64 * 64 * 2 / 1e9)


def test_stage_run_times_every_stage_and_float32_agrees_with_itself(tiny):
    blobs = [benchmark.synthetic_jpeg(i, 80, 60) for i in range(2)]
    runs = benchmark.run_stages([tiny], [1, 2], blobs, repeats=1)
    for run in runs:
        assert set(run.ms) == set(benchmark.STAGES)
        assert all(len(run.seconds[s]) == 2 and run.ms[s] > 0 for s in benchmark.STAGES)
        assert len(run.passes_images_per_s) == 1 and run.images_per_s > 0
        assert run.peak_mib_per_image is None  # no GPU
        assert sorted(run.label_maps) == ["img0000", "img0001"]
    table = "\n".join(benchmark.stage_table(runs))
    assert all(f"| {s} |" in table for s in benchmark.STAGES)
    # Batch 2 against batch 1 (float32): rounding differs with the batch composition, and the
    # random tiny models sit near ties, so a few per cent of pixels flip (0.95-0.96 measured).
    rows = benchmark.batch_rows(runs)
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert rows[1]["agreement"] == benchmark.agreement(runs[1].label_maps, runs[0].label_maps)
    assert 0.9 < rows[1]["agreement"] <= 1.0, rows[1]["agreement"]


def test_batch_rows_compare_every_batch_size_with_the_smallest():
    def run(batch_size, per_s, maps):
        return benchmark.StageRun("float32", batch_size, None, passes_images_per_s=per_s, label_maps=maps)

    base = {"a": np.zeros((2, 5), np.uint8)}
    changed = {"a": np.array([[0, 0, 0, 0, 0], [0, 0, 0, 3, 3]], np.uint8)}
    rows = benchmark.batch_rows([run(4, [30.0, 40.0, 50.0], changed), run(1, [10.0], base)])
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert rows[1]["speedup"] == pytest.approx(4.0) and rows[1]["agreement"] == pytest.approx(0.8)


def test_agreement_is_the_fraction_of_equal_pixels():
    rng = np.random.default_rng(0)
    a = {"x": rng.integers(0, 3, (7, 9)).astype(np.uint8), "y": rng.integers(0, 3, (4, 5)).astype(np.uint8)}
    b = {"x": a["x"].copy(), "y": rng.integers(0, 3, (4, 5)).astype(np.uint8), "only_b": np.zeros((2, 2))}
    b["x"][0, :4] = 7
    expected = (63 - 4 + int((a["y"] == b["y"]).sum())) / (63 + 20)
    assert benchmark.agreement(a, b) == pytest.approx(expected)
    assert benchmark.agreement(a, a) == 1.0
    with pytest.raises(ValueError, match="share no image"):
        benchmark.agreement(a, {"z": a["x"]})


def test_flop_counter_matches_hand_arithmetic():
    layer = torch.nn.Linear(7, 5)
    assert benchmark.count_flops(lambda: layer(torch.zeros(3, 7))) == 2 * 3 * 7 * 5
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    assert benchmark.count_flops(lambda: conv(torch.zeros(1, 3, 8, 8))) == 2 * 8 * 8 * 4 * 3 * 9


def test_the_old_kernels_the_speedwork_compares_with_give_identical_results():
    rows = benchmark.speedwork_kernels(heads=2, n=256, head_dim=16, repeats=1, device="cpu")
    assert [r["identical"] for r in rows] == [True, True, True]


def test_the_text_cache_check_compares_against_freshly_encoded_prompts(tiny):
    import copy

    req = LabelRequest("t", decode_image(benchmark.synthetic_jpeg(0, 64, 48)), (1,))
    assert benchmark.text_cache_identical(tiny, req) is True
    stale = copy.copy(tiny)  # a cache holding the wrong embeddings: the check must see it
    stale._all_text = tiny._all_text.roll(1, dims=0)
    assert benchmark.text_cache_identical(stale, req) is False


def test_busy_fraction_is_a_fraction_and_the_infer_timer_is_removed(tiny):
    blobs = [benchmark.synthetic_jpeg(i, 64, 48) for i in range(2)]
    labeler_infer = Labeler.infer
    out = benchmark.busy_fraction(benchmark.with_batch_size(tiny, 2), blobs, io_threads=2, gil_seconds=0.2)
    assert 0 < out["overlapped_busy_fraction"] <= 1 and 0 < out["serial_busy_fraction"] <= 1
    assert out["overlapped_images_per_s"] > 0 and 0 < out["python_speed_beside_superpixels"] < 2
    assert Labeler.infer is labeler_infer
    rows = benchmark.simulated_rows(benchmark.with_batch_size(tiny, 2), blobs, io_threads=[1], gpu_ms=[50.0])
    # 2 images x 50 ms of simulated GPU: busy for at most the wall time, and at least that long.
    assert rows[0]["images_per_s"] <= 2 / 0.1 and 0 < rows[0]["gpu_busy_fraction"] <= 1
    assert "infer" not in vars(tiny)


def test_ceilings_follow_from_the_counts():
    flops = {"clip_coarse": 10**11, "vae_encode": 10**12, "unet_capture": 9 * 10**11, "compensation": 0,
             "unet_full_pass": 10**12}  # fmt: skip
    nbytes = {"compensation_traffic_bytes": 3.35e9, "compensation_traffic_bytes_before": 6.7e9,
              "capture_traffic_bytes": 0.0}  # fmt: skip
    out = benchmark.ceilings(flops, nbytes)
    assert out["flops_per_image"] == 2 * 10**12
    assert out["ceiling_bf16_images_per_s"] == pytest.approx(989.4 / 2)
    assert out["goal_needs_bf16_utilisation"] == pytest.approx(50 * 2 / 989.4)
    assert out["compensation_ms_at_hbm"] == pytest.approx(1.0)
    assert out["compensation_share_at_goal"] == pytest.approx(1.0 / 20)


def test_the_cpu_path_before_variant_swaps_the_old_code_in_and_back_out():
    import skimage.segmentation

    from pipeline import coco, labels, refine
    from pipeline.bench import cpupath

    now = refine.felzenszwalb, labels.decide, coco.image_annotations
    with cpupath.variant("before"):
        assert refine.felzenszwalb is skimage.segmentation.felzenszwalb
        assert labels.decide is cpupath._per_pixel_decide
        assert coco.image_annotations is cpupath._unique_image_annotations
    assert (refine.felzenszwalb, labels.decide, coco.image_annotations) == now
    with pytest.raises(ValueError, match="unknown CPU-path variant"), cpupath.variant("fast"):
        pass


@pytest.mark.slow
def test_cpu_path_rows_time_both_variants_and_find_their_outputs_identical(tiny):
    from pipeline.bench import cpupath

    blobs = [benchmark.synthetic_jpeg(i, 64, 48) for i in range(2)]
    rows, identical = cpupath.cpu_path_rows(tiny, blobs, cpupath.model_outputs(tiny, blobs), repeats=1)
    assert identical is True
    assert [r["stage"] for r in rows] == [*cpupath.CPU_PATH_STAGES, "total"]
    by = {r["stage"]: r for r in rows}
    assert by["total"]["after_ms"] == pytest.approx(
        sum(by[s]["after_ms"] for s in ("decode", "superpixels", "label_assembly", "write_shard"))
    )
    assert all(r["before_ms"] > 0 and r["after_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_cpu_path_identity_check_sees_a_changed_output(tiny, monkeypatch):
    """The identity flag compares outputs: an 'after' path that labels differently must clear it."""
    from pipeline import labels
    from pipeline.bench import cpupath

    real = labels.decide

    def shifted(*args, **kwargs):
        decision, label_map = real(*args, **kwargs)
        label_map = label_map.copy()
        label_map[0, 0] = 255 if label_map[0, 0] != 255 else 0
        return decision, label_map

    monkeypatch.setattr(labels, "decide", shifted)
    blobs = [benchmark.synthetic_jpeg(0, 64, 48)]
    _, identical = cpupath.cpu_path_rows(tiny, blobs, cpupath.model_outputs(tiny, blobs), repeats=1)
    assert identical is False


@pytest.mark.slow
def test_compile_unet_leaves_the_block_holding_the_captured_layers_alone():
    from pipeline.bench.common import compile_unet
    from pipeline.config import SD_ATTENTION_LAYERS

    models = benchmark.build_models("tiny", "cpu")
    names = compile_unet(models.sd, SD_ATTENTION_LAYERS)
    captured_block = ".".join(SD_ATTENTION_LAYERS[0].split(".")[:2])
    assert captured_block not in names and "down_blocks.0" in names and "mid_block" in names
    parts = dict(models.sd.unet.named_modules())
    assert parts["down_blocks.0"]._compiled_call_impl is not None
    assert parts[captured_block]._compiled_call_impl is None


def test_dtype_aliases_and_the_cpu_section_are_accepted():
    from pipeline.bench import main

    args = main.parse_args(["--dtype", "bf16,fp32", "--compare", "cpu", "--images", "16", "--compile"])
    assert args.dtypes == ["bfloat16", "float32"] and args.compare == {"cpu"} and args.compile


def test_identity_hashes_cover_every_output_and_repeat_exactly(tmp_path, monkeypatch):
    """jobs/bench_identity.py: the same code gives the same hashes (its whole point is that a change
    of code shows as a change of hash), and the hashes cover labels, COCO and stats."""
    from pipeline.bench import identity

    monkeypatch.setattr(identity, "PRESETS", {"clip-es-voc": {}})
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "mine.txt").write_text("not the benchmark's")
    first = identity.output_hashes(tmp_path / "work")
    again = identity.output_hashes(tmp_path / "work")
    assert first == again and list(first) == ["clip-es-voc"]
    files = first["clip-es-voc"]
    assert sum(name.endswith(".png") for name in files) == len(identity.PHOTOS)
    assert any(name.endswith("annotations.json") for name in files)
    assert any(name.endswith("stats_images.parquet") for name in files)
    assert not any("timings" in name for name in files)
    assert (tmp_path / "work" / "mine.txt").read_text() == "not the benchmark's"  # only its own parts removed
