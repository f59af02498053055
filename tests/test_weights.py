"""Where weights come from: staged in a bucket (moto's S3 server), the hub cache under either SD id,
the hub only after one short probe; fingerprints by content; actors checking the driver's."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import socket
import threading
import uuid
from pathlib import Path

import pytest
import torch

from pipeline import models, weights
from pipeline.bench.architectures import build_clip, build_sd
from pipeline.config import SD21_BASE, SD21_BASE_FORMER, ClipConfig, ModelConfig, SDConfig, build_config
from pipeline.storage import commit
from pipeline.storage.store import Store
from pipeline.types import run_fingerprint
from pipeline.usecases import weights as weights_command

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.safetensors"


def _tiny_clip(paths: dict, checkpoint: str | None = None) -> ClipConfig:
    return ClipConfig(model=str(paths["clip_config"]), pretrained=None,
                      checkpoint=checkpoint or str(paths["clip_checkpoint"]))  # fmt: skip


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    """An empty bucket on moto's S3 server, its fsspec options, and an empty node cache."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dummy-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "dummy-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "node-cache"))
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "skip_instance_cache": True}
    name = f"w-{uuid.uuid4().hex[:12]}"
    fs = Store.open(f"s3://{name}", **opts).fs
    fs.mkdir(name)
    return name, opts, fs


def _stage(tiny_paths, bucket, tmp_path, capsys) -> tuple[str, str]:
    name, opts, _ = bucket
    opts_file = tmp_path / "opts.json"
    opts_file.write_text(json.dumps(opts))
    argv = ["--dest", f"s3://{name}/weights", "--storage-options", str(opts_file),
            "--clip-model", str(tiny_paths["clip_config"]), "--clip-checkpoint", str(tiny_paths["clip_checkpoint"]),
            "--sd-checkpoint", str(tiny_paths["sd_dir"])]  # fmt: skip
    assert weights_command.main(argv) == 0
    out = capsys.readouterr().out
    clip_url, sd_url = f"s3://{name}/weights/clip", f"s3://{name}/weights/sd"
    assert f"--clip-checkpoint {clip_url} --sd-checkpoint {sd_url}" in out, out
    return clip_url, sd_url


@pytest.mark.slow
def test_staged_weights_load_from_s3_and_a_second_load_reads_only_the_cache(tiny_paths, bucket, tmp_path, capsys):
    name, opts, fs = bucket
    clip_url, sd_url = _stage(tiny_paths, bucket, tmp_path, capsys)
    local = ModelConfig(clip=_tiny_clip(tiny_paths), sd=SDConfig(checkpoint=str(tiny_paths["sd_dir"])), device="cpu")
    remote = ModelConfig(clip=_tiny_clip(tiny_paths, clip_url), sd=SDConfig(checkpoint=sd_url), device="cpu")
    # The driver fingerprints the bucket from its manifests alone: equal to the local files' bytes.
    assert models.model_fingerprint(remote, opts) == models.model_fingerprint(local)
    clip, sd = models.load_models(remote, expected=models.model_fingerprint(local), storage_options=opts)
    for key, value in build_clip("tiny", seed=0).state_dict().items():
        assert torch.equal(clip.model.state_dict()[key], value), key
    for key, value in build_sd("tiny", seed=0)["unet"].state_dict().items():
        assert torch.equal(sd.unet.state_dict()[key], value), key
    # Only the manifests stay in the bucket: a second load must come from the node cache.
    for path in fs.find(f"{name}/weights"):
        if not path.endswith(weights.MANIFEST_NAME):
            fs.rm(path)
    fs.invalidate_cache()
    clip2, _ = models.load_models(remote, storage_options=opts)
    assert torch.equal(clip2.model.visual.conv1.weight, clip.model.visual.conv1.weight)
    cached = sorted(p.name for p in (tmp_path / "node-cache").iterdir())
    unet_sha = hashlib.sha256((Path(tiny_paths["sd_dir"]) / UNET).read_bytes()).hexdigest()
    assert len(cached) == 2 and not any(n.startswith(".partial") for n in cached), cached
    clip_sha = hashlib.sha256(Path(tiny_paths["clip_checkpoint"]).read_bytes()).hexdigest()
    assert weights.content_key({"clip.pt": clip_sha}) in cached  # a folder is cached under its content's key
    sd_dir = next(p for p in (tmp_path / "node-cache").iterdir() if (p / "unet").is_dir())
    assert hashlib.sha256((sd_dir / UNET).read_bytes()).hexdigest() == unet_sha


def test_a_tampered_object_is_refused_naming_it_and_both_digests(tiny_paths, bucket, tmp_path, capsys):
    name, opts, fs = bucket
    _, sd_url = _stage(tiny_paths, bucket, tmp_path, capsys)
    data = bytearray((Path(tiny_paths["sd_dir"]) / UNET).read_bytes())
    data[-1] ^= 1
    fs.pipe_file(f"{name}/weights/sd/{UNET}", bytes(data))
    fs.invalidate_cache()
    good = hashlib.sha256((Path(tiny_paths["sd_dir"]) / UNET).read_bytes()).hexdigest()
    bad = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(weights.WeightsIntegrityError) as err:
        weights.fetch(sd_url, opts)
    assert f"{sd_url}/{UNET}" in str(err.value) and good in str(err.value) and bad in str(err.value)
    cache = tmp_path / "node-cache"
    assert list(cache.iterdir()) == []  # nothing half-copied is left to be taken for a cache hit


def test_concurrent_fetches_keep_the_first_copy(tmp_path, monkeypatch):
    """Two actors on one node fetch at once: the one that renames second keeps the winner's copy."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights" * 1000)
    weights.stage({"w.bin": src}, str(tmp_path / "staged"))
    cache = tmp_path / "cache"
    real = weights._download

    def racing(staged, tmp, opts):  # another process finishes first, while this one copies
        real(staged, tmp, opts)
        if not (cache / staged.key).exists():
            real(staged, cache / staged.key, opts)

    monkeypatch.setattr(weights, "_download", racing)
    path = weights.fetch(str(tmp_path / "staged" / "w.bin"), cache=cache)
    assert path.read_bytes() == src.read_bytes()
    assert [p.name for p in cache.iterdir()] == [hashlib.sha256(src.read_bytes()).hexdigest()]
    monkeypatch.setattr(weights, "_download", real)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(weights.fetch(str(tmp_path / "staged"), cache=cache)))
               for _ in range(4)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and (results[0] / "w.bin").read_bytes() == src.read_bytes()
    assert not [p for p in cache.iterdir() if p.name.startswith(".partial")]


# --- the hub cache under the old and the new SD id ---------------------------------------------


def _hub_snapshot(cache: Path, repo: str, sd_dir: Path, commit: str, main: bool = True) -> Path:
    """A Hugging Face cache entry as the hub client lays it out: refs/main -> snapshots/<commit>."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    shutil.copytree(sd_dir, snap)
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _run_record(store: Store, model_cfg: ModelConfig, overwrite: bool = False) -> dict:
    config = build_config("voc-vit-b16", {"model": {"clip": {"model": model_cfg.clip.model, "pretrained": None,
                                                             "checkpoint": model_cfg.clip.checkpoint},
                                                    "sd": {"model": model_cfg.sd.model}, "device": "cpu"}})  # fmt: skip
    pinned, fp = models.pin_weights(config.model)  # as jobs/label_coco.py does
    config = dataclasses.replace(config, model=pinned)
    run = run_fingerprint(config.fingerprint(), fp, "0" * 64)
    return commit.write_run(store, run, config.to_dict(), fp, overwrite=overwrite)


def test_a_run_found_under_the_old_sd_id_resumes_under_the_new_id_and_a_changed_file_is_refused(
    tiny_paths, hub_cache, tmp_path
):
    store = Store.open(str(tmp_path / "run"))
    clip = _tiny_clip(tiny_paths)
    old = _hub_snapshot(hub_cache, SD21_BASE_FORMER, tiny_paths["sd_dir"], "a" * 40)
    first = _run_record(store, ModelConfig(clip=clip, sd=SDConfig(model=SD21_BASE_FORMER)))
    shutil.rmtree(old.parents[1])  # the cache now holds the mirror's copy: same bytes, other commit
    new = _hub_snapshot(hub_cache, SD21_BASE, tiny_paths["sd_dir"], "b" * 40)
    again = _run_record(store, ModelConfig(clip=clip, sd=SDConfig(model=SD21_BASE)))
    assert again["fingerprint"] == first["fingerprint"]
    assert again["config"]["model"]["sd"]["revision"] == "b" * 40  # what was found is still recorded
    data = bytearray((new / UNET).read_bytes())
    data[-1] ^= 1
    (new / UNET).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="the model changed"):
        _run_record(store, ModelConfig(clip=clip, sd=SDConfig(model=SD21_BASE)))


def test_either_sd_id_is_found_through_the_other_and_neither_names_both(tiny_paths, hub_cache):
    clip = _tiny_clip(tiny_paths)
    with pytest.raises(models.WeightsUnavailableError) as err:
        models.resolve_weights(ModelConfig(clip=clip))
    for needle in (SD21_BASE, SD21_BASE_FORMER, str(hub_cache), "--sd-checkpoint", "HF_HOME",
                   "stage_weights.py", "HF_HUB_OFFLINE"):  # fmt: skip
        assert needle in str(err.value), (needle, str(err.value))
    _hub_snapshot(hub_cache, SD21_BASE_FORMER, tiny_paths["sd_dir"], "c" * 40)
    pinned, _ = models.pin_weights(ModelConfig(clip=clip, sd=SDConfig(model=SD21_BASE)))
    assert (pinned.sd.model, pinned.sd.revision) == (SD21_BASE_FORMER, "c" * 40)
    _, sd = models.resolve_weights(ModelConfig(clip=clip, sd=SDConfig(model=SD21_BASE)))
    assert Path(sd.path) == hub_cache / "models--stabilityai--stable-diffusion-2-1-base" / "snapshots" / ("c" * 40)


def test_stage_weights_copies_the_hub_cache_snapshot_with_its_digests(tiny_paths, hub_cache):
    """Staging by id: the SD files come from the hub cache (here under the former id, symlinked
    into the snapshot as the hub client lays them out) and the manifest holds their digests."""
    import fsspec

    snap = _hub_snapshot(hub_cache, SD21_BASE_FORMER, tiny_paths["sd_dir"], "9" * 40)
    blob = hub_cache / "blob-unet"
    (snap / UNET).rename(blob)
    (snap / UNET).symlink_to(blob)
    prefix = f"memory://stage-{uuid.uuid4().hex[:8]}"
    urls = models.stage_weights(ModelConfig(clip=_tiny_clip(tiny_paths)), prefix)
    fs = fsspec.filesystem("memory")
    manifest = json.loads(fs.cat_file(f"{urls['sd']}/{weights.MANIFEST_NAME}"))["files"]
    unet = (Path(tiny_paths["sd_dir"]) / UNET).read_bytes()
    assert manifest[UNET] == {"sha256": hashlib.sha256(unet).hexdigest(), "size": len(unet)}
    assert fs.cat_file(f"{urls['sd']}/{UNET}") == unet
    assert set(manifest) == {f.relative_to(snap).as_posix() for f in snap.rglob("*") if f.is_file()}


def test_actors_load_the_pinned_revision_and_refuse_other_content(tiny_paths, hub_cache, tmp_path):
    clip = _tiny_clip(tiny_paths)
    pinned_snap = _hub_snapshot(hub_cache, SD21_BASE, tiny_paths["sd_dir"], "d" * 40)
    pinned, expected = models.pin_weights(ModelConfig(clip=clip, device="cpu"))
    assert pinned.sd.revision == "d" * 40
    # The hub moved on: main now names another commit with other bytes; the pinned one still loads.
    newer = _hub_snapshot(hub_cache, SD21_BASE, tiny_paths["sd_dir"], "e" * 40)
    data = bytearray((newer / UNET).read_bytes())
    data[-1] ^= 1
    (newer / UNET).write_bytes(bytes(data))
    _, sd = models.resolve_weights(pinned)
    assert Path(sd.path) == pinned_snap
    models.load_models(pinned, expected=expected)
    with pytest.raises(models.WeightsMismatchError, match="Stable Diffusion weights .*" + "e" * 40):
        models.load_models(ModelConfig(clip=clip, device="cpu"), expected=expected)  # unpinned: takes main


def test_the_config_fingerprint_leaves_out_where_weights_live():
    base = build_config()
    moved = build_config(None, {"model": {"sd": {"model": SD21_BASE_FORMER, "checkpoint": "s3://b/sd", "revision": "f"},
                                          "clip": {"checkpoint": "/x/clip.pt", "revision": "abc"}}})  # fmt: skip
    assert moved.fingerprint() == base.fingerprint()
    assert build_config(None, {"model": {"dtype": "bfloat16"}}).fingerprint() != base.fingerprint()
    assert build_config(None, {"model": {"clip": {"model": "ViT-L-14"}}}).fingerprint() != base.fingerprint()
    assert build_config(None, {"model": {"clip": {"pretrained": "laion2b_s34b_b88k"}}}).fingerprint() != (
        base.fingerprint()
    )


# --- no network: one short probe, remembered for a minute ---------------------------------------


@pytest.fixture
def counting_endpoint(monkeypatch, tmp_path):
    """A hub endpoint on 127.0.0.1 that accepts connections, counts them and hangs up unanswered
    (a network that is up at the socket level but does not serve), with an empty hub cache."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    count = [0]
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            count[0] += 1
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_down_until", {}, raising=False)
    monkeypatch.setattr(models, "_up_until", {}, raising=False)
    yield count
    stop.set()
    thread.join()
    server.close()


def test_an_unanswering_hub_is_asked_once_for_both_models_and_not_again_within_a_minute(counting_endpoint):
    cfg = ModelConfig(clip=ClipConfig(model="ViT-B-16", pretrained="openai"), sd=SDConfig())
    with pytest.raises(models.WeightsUnavailableError) as err:
        models.resolve_weights(cfg)
    assert counting_endpoint[0] == 1, f"{counting_endpoint[0]} connections for one resolution"
    assert "could not be reached" in str(err.value) and "CLIP weights" in str(err.value)
    with pytest.raises(models.WeightsUnavailableError, match="did not answer less than 60 s ago"):
        models.resolve_weights(cfg)
    assert counting_endpoint[0] == 1


def test_hf_hub_offline_means_no_connection_at_all(counting_endpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after the hub client was imported, as a job's env may be
    with pytest.raises(models.WeightsUnavailableError) as err:
        models.resolve_weights(ModelConfig(clip=ClipConfig(model="ViT-B-16", pretrained="openai"), sd=SDConfig()))
    assert counting_endpoint[0] == 0
    assert str(err.value).count("HF_HUB_OFFLINE is set") == 2  # both models say why they did not download


# --- a hub that answers: the withdrawn id's 404 leads to the mirror ----------------------------


@pytest.fixture
def fake_hub(tiny_paths, tmp_path, monkeypatch):
    """A Hugging Face hub on 127.0.0.1 serving the tiny SD under the mirror's id at one commit,
    and answering 404 (RepoNotFound) for the withdrawn id, with an empty hub cache. Records every
    request path."""
    import http.server

    from huggingface_hub import constants

    commit = "1" * 40
    root = Path(tiny_paths["sd_dir"])
    files = {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}
    mirror = f"/api/models/{SD21_BASE}"
    seen: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(code)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            seen.append(path)
            prefix = f"/{SD21_BASE}/resolve/{commit}/"
            if path == f"{mirror}/revision/main":
                siblings = [{"rfilename": f} for f in files]
                self._send(200, json.dumps({"id": SD21_BASE, "sha": commit, "siblings": siblings}).encode())
            elif path.startswith(f"{mirror}/tree/{commit}"):
                tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in files.items()]  # fmt: skip
                self._send(200, json.dumps(tree).encode())
            elif path.startswith(prefix) and path[len(prefix) :] in files:
                body = files[path[len(prefix) :]]
                etag = f'"{hashlib.sha256(body).hexdigest()}"'
                self._send(200, body, {"X-Repo-Commit": commit, "ETag": etag})
            elif path.startswith("/api/models/") or path.startswith(f"/{SD21_BASE_FORMER}/"):
                self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
            else:
                self._send(404)

        do_HEAD = do_GET  # noqa: N815

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # as HF_ENDPOINT sets both at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_down_until", {})
    monkeypatch.setattr(models, "_up_until", {})
    yield commit, seen
    server.shutdown()
    thread.join()


def test_the_withdrawn_sd_id_is_downloaded_from_the_mirror_and_pinned(tiny_paths, fake_hub):
    commit, seen = fake_hub
    clip = _tiny_clip(tiny_paths)
    pinned, fp = models.pin_weights(ModelConfig(clip=clip, sd=SDConfig(model=SD21_BASE_FORMER)))
    assert f"/api/models/{SD21_BASE_FORMER}/revision/main" in seen  # asked for, answered 404
    assert (pinned.sd.model, pinned.sd.revision) == (SD21_BASE, commit)
    local = ModelConfig(clip=clip, sd=SDConfig(checkpoint=str(tiny_paths["sd_dir"])))
    assert fp == models.model_fingerprint(local)  # the same bytes: the same fingerprint
