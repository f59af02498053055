"""Issue 6, secrets: credentials given through the environment or fsspec options never appear in
logs, stats, markers or the stored config."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import manifest, redact
from pipeline.shards import label_shard
from pipeline.storage.store import Store
from tests.conftest import blob_image
from tests.ray_local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
ENV_KEY_ID, ENV_SECRET = "AKIAENVKEYID00000001", "env-secret-Xq93kLm02vB"
OPT_KEY_ID, OPT_SECRET = "AKIAOPTKEYID00000002", "opt-secret-Pz71wQa55nR"
SECRETS = (ENV_KEY_ID, ENV_SECRET, OPT_KEY_ID, OPT_SECRET)


def test_secret_values_come_from_secret_looking_options_and_environment_variables():
    opts = {"key": OPT_KEY_ID, "token": "short",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "aws_secret_access_key": "s" * 9},
            "anon": False, "config_kwargs": {"region_name": "us-east-1"}}  # fmt: skip
    env = {"AWS_SECRET_ACCESS_KEY": ENV_SECRET, "AWS_REGION": "us-east-1", "RAY_AUTH_TOKEN": "t" * 32, "X_TOKEN": "1"}
    assert redact.secret_values(opts, env) == {OPT_KEY_ID, "s" * 9, ENV_SECRET, "t" * 32}
    assert redact.secret_option_keys(opts) == ["key", "client_kwargs"]  # "short" is too short to be one
    text = f"failed with {OPT_KEY_ID} and {ENV_SECRET}{ENV_SECRET} at http://127.0.0.1:9 in us-east-1"
    masked = redact.redact(text, redact.secret_values(opts, env))
    assert masked == "failed with *** and ****** at http://127.0.0.1:9 in us-east-1"


def test_the_logging_filter_masks_messages_arguments_and_tracebacks():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(redact.RedactingFilter({OPT_SECRET}))
    log = logging.getLogger("test_secrets.filter")
    log.addHandler(handler)
    try:
        log.warning("retrying with %s", {"secret": OPT_SECRET})
        try:
            raise OSError(f"signature mismatch for {OPT_SECRET}")
        except OSError:
            log.exception("write failed")
    finally:
        log.removeHandler(handler)
    out = buf.getvalue()
    assert OPT_SECRET not in out and out.count("***") == 2 and "signature mismatch for ***" in out


def test_failure_messages_in_stats_are_masked(labeler, tmp_path):
    """A library error that quotes a secret (here: in a path) is masked before it reaches the stats."""
    record = {"id": "a", "uri": str(tmp_path / f"{OPT_SECRET}.jpg"), "tags": [1]}  # does not exist
    store = Store.open(str(tmp_path / "out"))
    shard = next(manifest.shards([record], 1))
    marker = label_shard(labeler, store, shard, "d" * 64, storage_options={"secret": OPT_SECRET})
    rows = pq.read_table(tmp_path / "out" / "shards" / shard.shard_id / "stats_images.parquet").to_pylist()
    assert marker["counts"]["failed"] == 1 and rows[0]["status"] == "missing"
    assert OPT_SECRET not in rows[0]["error"] and "***.jpg" in rows[0]["error"]


def _upload(fs, tmp: Path) -> None:
    records = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(blob_image(40, 56, seed=i)).save(buf, format="PNG")
        fs.pipe(f"src-bucket/img/{i}.png", buf.getvalue())
        records.append({"id": f"im{i}", "uri": f"s3://src-bucket/img/{i}.png", "tags": ["cat"]})
    records.append({"id": "gone", "uri": "s3://src-bucket/img/gone.png", "tags": [1]})  # a read that fails
    fs.pipe("src-bucket/m.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    fs.pipe("src-bucket/cats.json", json.dumps([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]).encode())


@pytest.mark.slow
def test_credentials_never_reach_logs_stats_markers_or_the_stored_config(tmp_path, tiny_paths, s3_endpoint):
    """Credentials in the cluster's environment (as on a real cluster) and in a storage-options
    file; a full job on a local Ray writes to moto's S3. Then every output object, the job's
    output and every file Ray wrote (logs, session data) is searched for each secret."""
    import s3fs

    aws_env = {"AWS_ACCESS_KEY_ID": ENV_KEY_ID, "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    fs = s3fs.S3FileSystem(key=OPT_KEY_ID, secret=OPT_SECRET, client_kwargs={"endpoint_url": s3_endpoint},
                           skip_instance_cache=True)  # fmt: skip
    for bucket in ("src-bucket", "dst-bucket"):
        fs.mkdir(bucket)
    _upload(fs, tmp_path)
    (tmp_path / "opts.json").write_text(json.dumps({"key": OPT_KEY_ID, "secret": OPT_SECRET,
                                                    "client_kwargs": {"endpoint_url": s3_endpoint}}))  # fmt: skip
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths must fit in 107 bytes
    cluster = LocalCluster(ray_dir, extra_env=aws_env)
    cluster.start()
    try:
        cmd = [sys.executable, "jobs/label_coco.py", "--manifest", "s3://src-bucket/m.jsonl", "--categories",
               "s3://src-bucket/cats.json", "--output", "s3://dst-bucket/run",
               "--storage-options", str(tmp_path / "opts.json"),
               "--shard-size", "2", "--clip-model", str(tiny_paths["clip_config"]),
               "--clip-checkpoint", str(tiny_paths["clip_checkpoint"]), "--sd-checkpoint", str(tiny_paths["sd_dir"]),
               "--device", "cpu"]  # fmt: skip
        env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fs.invalidate_cache()
    outputs = {p: fs.cat_file(p) for p in fs.find("dst-bucket/run")}
    assert "dst-bucket/run/run.json" in outputs and "dst-bucket/run/merged/annotations.json" in outputs
    rows = [r for p, d in outputs.items() if p.endswith("stats_images.parquet") and "/shards/" in p
            for r in pq.read_table(io.BytesIO(d)).to_pylist()]  # fmt: skip
    assert sorted(r["status"] for r in rows) == ["missing", "ok", "ok", "ok"]
    ray_files = {str(p): p.read_bytes() for p in ray_dir.rglob("*") if p.is_file() and not p.is_symlink()}
    shutil.rmtree(ray_dir, ignore_errors=True)
    assert any("worker" in name and name.endswith(".err") for name in ray_files)  # the actors' logs are there
    searched = {**outputs, **ray_files, "job stdout": proc.stdout.encode(), "job stderr": proc.stderr.encode()}
    for secret in SECRETS:
        leaks = [name for name, data in searched.items() if secret.encode() in data]
        assert not leaks, f"{secret} found in {leaks[:5]}"
