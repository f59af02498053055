"""The runner through the real CLIs: `ray start` on 127.0.0.1, `ray job submit`, interruption and
resume, refusal of a changed config."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import blob_image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    # Ray's job API runs any code it is sent: token authentication on, and 127.0.0.1 only.
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    port, dash = _free_port(), _free_port()
    start = [*RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
             "--temp-dir", str(tmp), "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 60
        while subprocess.run([*RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            if time.time() > deadline:
                raise RuntimeError("Ray's job server did not come up")
            time.sleep(1)
        yield address, env
    finally:
        subprocess.run([*RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


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


def test_a_clean_run_labels_everything_and_records_the_bad_image(clean_run):
    clean, stdout = clean_run
    assert "summary: shards done 5" in stdout and "failed images 1" in stdout
    merged = json.loads((clean / "merged" / "annotations.json").read_text())
    assert len(merged["images"]) == 8 and {a["category_id"] for a in merged["annotations"]} <= {1, 2, 3}
    assert len(list((clean / "labels").glob("*.png"))) == 8


def test_interrupted_job_resumes_to_identical_outputs(ray_cluster, dataset, tiny_paths, clean_run, tmp_path):
    address, env = ray_cluster
    resumed = tmp_path / "resumed"
    job = _submit(address, env, _job_args(dataset, tiny_paths, resumed), wait=False)
    _wait_for_commit(resumed)
    # `ray job stop` waits until the job has stopped: nothing commits after it returns.
    stop = subprocess.run([*RAY, "job", "stop", "--address", address, job], env=env, capture_output=True, timeout=120)
    assert stop.returncode == 0, stop.stderr
    done_before = len(list((resumed / "shards").glob("*/_COMMITTED.json")))
    assert done_before < 5
    proc = _submit(address, env, _job_args(dataset, tiny_paths, resumed))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"skipped (already committed) {done_before}" in proc.stdout
    assert _digests(resumed) == _digests(clean_run[0])


def test_an_actor_killed_mid_shard_is_replaced_and_outputs_are_complete(
    ray_cluster, dataset, tiny_paths, clean_run, tmp_path
):
    import psutil

    address, env = ray_cluster
    out = tmp_path / "killed"
    proc = subprocess.Popen(_submit_cmd(address, _job_args(dataset, tiny_paths, out)), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_commit(out)  # the actor is now busy with its next shard
    victims = [p for p in psutil.process_iter(["cmdline"]) if "_LabelActor" in " ".join(p.info["cmdline"] or [])]
    assert victims, "no labeling actor process found"
    victims[0].kill()
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-3000:]
    assert "actor restarts 1" in stdout and "failed 0;" in stdout
    assert _digests(out) == _digests(clean_run[0])


def test_a_changed_config_is_refused_and_nothing_is_rewritten(ray_cluster, dataset, tiny_paths, clean_run):
    address, env = ray_cluster
    clean = clean_run[0]
    before = _digests(clean)
    proc = _submit(address, env, _job_args(dataset, tiny_paths, clean, "--preset", "voc-vit-l14"))
    assert proc.returncode != 0
    assert "belongs to another run: the config changed" in proc.stdout + proc.stderr
    assert _digests(clean) == before


def test_a_wrong_image_root_stops_early_instead_of_burning_gpu_hours(ray_cluster, dataset, tiny_paths, tmp_path):
    address, env = ray_cluster
    big = json.loads((dataset / "instances.json").read_text())
    big["images"] = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(1, 41)]
    big["annotations"] = [{"id": i, "image_id": i, "category_id": 1} for i in range(1, 41)]
    (tmp_path / "big.json").write_text(json.dumps(big))
    args = _job_args(dataset, tiny_paths, tmp_path / "out")
    args[args.index("--annotations") + 1] = str(tmp_path / "big.json")
    args[args.index("--images") + 1] = str(tmp_path / "no-such-folder")
    proc = _submit(address, env, args)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "stopped early: 100% of" in text
    committed = len(list((tmp_path / "out" / "shards").glob("*/_COMMITTED.json")))
    assert 10 <= committed < 20  # stopped after min_images (20) failed images, not at the end


def test_a_shard_that_keeps_failing_is_reported_and_the_others_finish(ray_cluster, dataset, tiny_paths, tmp_path):
    address, env = ray_cluster
    lines = [{"id": f"ok{i}", "uri": str(dataset / "img" / f"{i:012d}.jpg"), "tags": [1]} for i in (1, 2, 3, 4)]
    lines.insert(2, {"id": "poison", "uri": str(dataset / "img" / f"{5:012d}.jpg"), "tags": [99]})  # no category 99
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "cats.json").write_text(json.dumps([{"id": 1, "name": "cat"}, {"id": 3, "name": "person"}]))
    args = _job_args(dataset, tiny_paths, tmp_path / "out", "--max-attempts", "2")
    i = args.index("--annotations")
    args[i : i + 4] = ["--manifest", str(tmp_path / "m.jsonl"), "--categories", str(tmp_path / "cats.json")]
    proc = _submit(address, env, args)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "shards done 2" in text and "failed 1;" in text and "are not in the category list" in text
    assert len(list((tmp_path / "out" / "shards").glob("*/_COMMITTED.json"))) == 2
