"""The runner through the real CLIs: `ray start` on 127.0.0.1, `ray job submit`, interruption and
resume, refusal of a changed config."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.storage.layout import MARKER
from tests.conftest import blob_image
from tests.ray_local import RAY, LocalCluster

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = LocalCluster(tmp_path_factory.mktemp("ray"))
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def ray_cluster(cluster):
    return cluster.address, cluster.env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "img").mkdir()
    images, anns = [], []
    for i in range(1, 9):
        Image.fromarray(blob_image(50 + 4 * i, 70, seed=i)).save(root / "img" / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 70, "height": 50 + 4 * i})
        anns += [
            {"id": 2 * i, "image_id": i, "category_id": 1 + i % 2},
            {"id": 2 * i + 1, "image_id": i, "category_id": 3},
        ]
    (root / "img" / f"{9:012d}.jpg").write_bytes(b"not a jpeg")  # a bad image: a row, not a crash
    images.append({"id": 9, "file_name": f"{9:012d}.jpg"})
    anns.append({"id": 99, "image_id": 9, "category_id": 1})
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "person"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _job_args(dataset: Path, tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["python", "jobs/label_coco.py", "--annotations", str(dataset / "instances.json"),
            "--images", str(dataset / "img"), "--output", str(out), "--shard-size", "2",
            "--clip-model", str(tiny["clip_config"]), "--clip-checkpoint", str(tiny["clip_checkpoint"]),
            "--sd-checkpoint", str(tiny["sd_dir"]), "--device", "cpu", *extra]  # fmt: skip


def _submit_cmd(address: str, args: list[str]) -> list[str]:
    return [*RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", *args]


def _submit(address: str, env: dict, args: list[str], wait: bool = True) -> subprocess.CompletedProcess | str:
    cmd = [*RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT)]
    if not wait:
        job = f"label-{secrets.token_hex(4)}"
        out = subprocess.run([*cmd, "--no-wait", "--submission-id", job, "--", *args], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr
        return job
    return subprocess.run(_submit_cmd(address, args), env=env, capture_output=True, text=True, timeout=900)


def _digests(out: Path) -> dict[str, str]:
    """sha256 of every output file except the wall-clock timings."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and "timings" not in p.name and "timings" not in p.parent.name
    }


@pytest.fixture(scope="module")
def clean_run(ray_cluster, dataset, tiny_paths, tmp_path_factory):
    address, env = ray_cluster
    clean = tmp_path_factory.mktemp("clean") / "out"
    proc = _submit(address, env, _job_args(dataset, tiny_paths, clean))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return clean, proc.stdout


def _wait_for_commit(out: Path) -> None:
    deadline = time.time() + 300
    while not list((out / "shards").glob("*/_COMMITTED.json")):
        assert time.time() < deadline, "no shard committed in time"
        time.sleep(0.3)


def _markers(out: Path) -> dict[str, tuple[int, bytes]]:
    """Each committed shard's marker: (mtime in ns, bytes). Equal before and after a resume
    means the resume did not commit that shard a second time."""
    return {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").glob(f"*/{MARKER}")}


def _assert_markers_match_files(out: Path) -> None:
    """No marker references a partial or stale file: every file it lists has its size and sha256."""
    markers = list((out / "shards").glob(f"*/{MARKER}"))
    assert markers
    for path in markers:
        for rel, meta in json.loads(path.read_text())["files"].items():
            data = (out / rel).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["bytes"], meta["sha256"]), rel


def _actor_processes() -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if "_LabelActor" in " ".join(p.info["cmdline"] or [])]


def _wait_until_no_actors(timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while _actor_processes():
        assert time.time() < deadline, "labeling actors outlived their driver"
        time.sleep(0.5)


def _resume_and_compare(address: str, env: dict, args: list[str], out: Path, clean: Path) -> None:
    before = _markers(out)
    assert 0 < len(before) < 5, "the interruption should leave the run part done"
    proc = _submit(address, env, args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"skipped (already committed) {len(before)}" in proc.stdout
    after = _markers(out)
    assert {sid: after[sid] for sid in before} == before  # committed once, never rewritten
    assert _digests(out) == _digests(clean)
    _assert_markers_match_files(out)


def test_a_clean_run_labels_everything_and_records_the_bad_image(clean_run):
    clean, stdout = clean_run
    assert "summary: shards done 5" in stdout and "failed images 1" in stdout
    merged = json.loads((clean / "merged" / "annotations.json").read_text())
    assert len(merged["images"]) == 8 and {a["category_id"] for a in merged["annotations"]} <= {1, 2, 3}
    assert len(list((clean / "labels").glob("*.png"))) == 8


def test_a_submitted_job_imports_pipeline_from_its_working_dir(ray_cluster):
    """jobs/ hold no sys.path edits: under `ray job submit --working-dir .` the entrypoint finds
    ``pipeline`` because Ray puts its copy of the working dir on PYTHONPATH (not the checkout's own
    path, nor an installed copy)."""
    address, env = ray_cluster
    probe = "import pipeline, pipeline.usecases.label; print('PIPELINE_AT', pipeline.__file__)"
    proc = _submit(address, env, ["python", "-c", probe])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    where = next(line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("PIPELINE_AT"))
    assert "working_dir_files" in where and not where.startswith(str(ROOT)), where


def test_interrupted_job_resumes_to_identical_outputs(ray_cluster, dataset, tiny_paths, clean_run, tmp_path):
    address, env = ray_cluster
    resumed = tmp_path / "resumed"
    args = _job_args(dataset, tiny_paths, resumed)
    job = _submit(address, env, args, wait=False)
    _wait_for_commit(resumed)
    # `ray job stop` waits until the job has stopped: nothing commits after it returns.
    stop = subprocess.run([*RAY, "job", "stop", "--address", address, job], env=env, capture_output=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    _wait_until_no_actors()
    _resume_and_compare(address, env, args, resumed, clean_run[0])


def test_an_actor_killed_mid_shard_is_replaced_and_outputs_are_complete(
    ray_cluster, dataset, tiny_paths, clean_run, tmp_path
):
    address, env = ray_cluster
    out = tmp_path / "killed"
    proc = subprocess.Popen(_submit_cmd(address, _job_args(dataset, tiny_paths, out)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_commit(out)  # the actor is now busy with its next shard
    victims = _actor_processes()
    assert victims, "no labeling actor process found"
    victims[0].kill()
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-3000:]
    assert "actor restarts 1" in stdout and "failed 0;" in stdout
    assert _digests(out) == _digests(clean_run[0])
    _assert_markers_match_files(out)


def test_a_driver_killed_mid_run_resumes_to_identical_outputs(ray_cluster, dataset, tiny_paths, clean_run, tmp_path):
    import psutil

    address, env = ray_cluster
    out = tmp_path / "out"
    args = _job_args(dataset, tiny_paths, out)
    _submit(address, env, args, wait=False)
    _wait_for_commit(out)
    drivers = [p for p in psutil.process_iter(["cmdline"])
               if "jobs/label_coco.py" in " ".join(p.info["cmdline"] or []) and str(out) in p.info["cmdline"]
               and "submit" not in p.info["cmdline"]]  # fmt: skip
    assert len(drivers) == 1, drivers
    drivers[0].kill()  # SIGKILL: no cleanup runs; Ray then kills the actors it owned
    _wait_until_no_actors()
    _resume_and_compare(address, env, args, out, clean_run[0])


def test_a_changed_config_is_refused_and_nothing_is_rewritten(ray_cluster, dataset, tiny_paths, clean_run):
    address, env = ray_cluster
    clean = clean_run[0]
    before = _digests(clean)
    proc = _submit(address, env, _job_args(dataset, tiny_paths, clean, "--preset", "voc-vit-l14"))
    assert proc.returncode != 0
    assert "belongs to another run: the config changed" in proc.stdout + proc.stderr
    assert _digests(clean) == before


def test_a_wrong_image_root_is_refused_before_any_work(ray_cluster, dataset, tiny_paths, tmp_path):
    address, env = ray_cluster
    args = _job_args(dataset, tiny_paths, tmp_path / "out")
    args[args.index("--images") + 1] = str(tmp_path / "no-such-folder")
    proc = _submit(address, env, args)
    assert proc.returncode != 0
    assert "and so is its folder" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_images_that_all_fail_stop_the_run_early_instead_of_burning_gpu_hours(
    ray_cluster, dataset, tiny_paths, tmp_path
):
    address, env = ray_cluster
    (tmp_path / "img").mkdir()
    for i in range(1, 41):
        (tmp_path / "img" / f"{i:012d}.jpg").write_text("not an image")
    big = json.loads((dataset / "instances.json").read_text())
    big["images"] = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, 41)]
    big["annotations"] = [{"id": i, "image_id": i, "category_id": 1} for i in range(1, 41)]
    (tmp_path / "big.json").write_text(json.dumps(big))
    args = _job_args(dataset, tiny_paths, tmp_path / "out")
    args[args.index("--annotations") + 1] = str(tmp_path / "big.json")
    args[args.index("--images") + 1] = str(tmp_path / "img")
    proc = _submit(address, env, args)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "stopped early: 100% of" in text
    committed = len(list((tmp_path / "out" / "shards").glob("*/_COMMITTED.json")))
    assert 10 <= committed < 20  # stopped after min_images (20) failed images, not at the end


def test_a_shard_that_keeps_failing_is_reported_and_the_others_finish(ray_cluster, dataset, tiny_paths, tmp_path):
    from pipeline.storage.layout import label_file
    from pipeline.types import image_names

    address, env = ray_cluster
    lines = [{"id": f"ok{i}", "uri": str(dataset / "img" / f"{i:012d}.jpg"), "tags": [1]} for i in (1, 2, 3, 4, 5)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "cat"}, {"id": 3, "name": "person"}]))
    # A storage fault no retry can cure: ok3's label file is taken by a directory.
    (tmp_path / "out" / label_file(image_names(lines)["ok3"].label) / "x").mkdir(parents=True)
    args = _job_args(dataset, tiny_paths, tmp_path / "out", "--max-attempts", "2")
    i = args.index("--annotations")
    args[i : i + 4] = ["--manifest", str(tmp_path / "m.jsonl"), "--categories", str(tmp_path / "cats.json")]
    proc = _submit(address, env, args)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "shards done 2" in text and "failed 1;" in text and "IsADirectoryError" in text
    assert len(list((tmp_path / "out" / "shards").glob("*/_COMMITTED.json"))) == 2


def test_a_hung_read_is_abandoned_at_the_shard_deadline_and_the_run_ends(ray_cluster, dataset, tiny_paths, tmp_path):
    """A named pipe as an image: opening it blocks forever (a stuck read). The shard's deadline
    kills and replaces the actor, the retry hangs too, the shard is reported failed and the other
    shards commit. Without a deadline the run never ends."""
    import os

    address, env = ray_cluster
    os.mkfifo(tmp_path / "stuck.jpg")
    lines = [{"id": "a", "uri": str(dataset / "img" / f"{1:012d}.jpg"), "tags": [1]},
             {"id": "stuck", "uri": str(tmp_path / "stuck.jpg"), "tags": [1]},
             {"id": "b", "uri": str(dataset / "img" / f"{2:012d}.jpg"), "tags": [3]}]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "cat"}, {"id": 3, "name": "person"}]))
    args = _job_args(dataset, tiny_paths, tmp_path / "out", "--shard-size", "1", "--max-attempts", "2",
                     "--shard-timeout", "3", "--startup-timeout", "60")  # fmt: skip
    i = args.index("--annotations")
    args[i : i + 4] = ["--manifest", str(tmp_path / "m.jsonl"), "--categories", str(tmp_path / "cats.json")]
    proc = subprocess.run(_submit_cmd(address, args), env=env, capture_output=True, text=True, timeout=500)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "shards done 2" in text and "failed 1;" in text and "no result after" in text
    assert "shards past their deadline" in text and "actor restarts 2" in text
    assert len(list((tmp_path / "out" / "shards").glob("*/_COMMITTED.json"))) == 2


def test_clip_es_job_needs_no_sd_resumes_and_refuses_a_changed_method(ray_cluster, dataset, tiny_paths, tmp_path):
    """`--preset clip-es-voc` through `ray job submit` with no SD weights given: labels, records the
    bad image, resumes (every shard skipped, labels unchanged) and a changed method is refused."""
    address, env = ray_cluster
    out = tmp_path / "es"
    args = _job_args(dataset, tiny_paths, out, "--preset", "clip-es-voc")
    i = args.index("--sd-checkpoint")
    del args[i : i + 2]
    first = _submit(address, env, args)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "clip-es" and "sd" not in run["model"]
    labels = {p.name: p.read_bytes() for p in (out / "labels").iterdir()}
    assert len(labels) == 8  # the ninth image is a decode_error row
    again = _submit(address, env, args)
    assert again.returncode == 0 and "skipped (already committed) 5" in again.stdout, again.stdout[-3000:]
    assert {p.name: p.read_bytes() for p in (out / "labels").iterdir()} == labels
    no_sd = tmp_path / "no-sd.json"  # CLIPer without compensation: no SD weights needed either
    no_sd.write_text(json.dumps({"cliper": {"compensation": False}}))
    changed = _submit(address, env, [*args, "--method", "cliper", "--config", str(no_sd)])
    text = changed.stdout + changed.stderr
    assert changed.returncode != 0 and 'method "clip-es" -> "cliper"' in text, text[-3000:]
    assert {p.name: p.read_bytes() for p in (out / "labels").iterdir()} == labels
    assert json.loads((out / "run.json").read_text()) == run


def test_the_whole_cluster_killed_mid_run_resumes_to_identical_outputs(
    cluster, dataset, tiny_paths, clean_run, tmp_path
):
    """Last in this file: it takes the module's cluster down (every one of its processes SIGKILLed at
    once, mid-write or not, as `ray stop --force` would) and brings a new one up for the rerun."""
    out = tmp_path / "out"
    args = _job_args(dataset, tiny_paths, out)
    _submit(cluster.address, cluster.env, args, wait=False)
    _wait_for_commit(out)
    cluster.stop()
    assert not _actor_processes()
    cluster.restart_on_new_ports()
    _resume_and_compare(cluster.address, cluster.env, args, out, clean_run[0])
