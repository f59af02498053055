"""ray_cluster.yaml is a valid launcher config and keeps Ray's unauthenticated APIs on localhost."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_config_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}  # no labeling on the head
    assert any("pip install -e ." in c for c in config["setup_commands"])


def test_dashboard_and_job_api_stay_on_localhost():
    text = (ROOT / "ray_cluster.yaml").read_text()
    config = yaml.safe_load(text)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in text
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert "--dashboard-host=0.0.0.0" not in doc.read_text() and "--dashboard-host 0.0.0.0" not in doc.read_text()


def test_setup_prefetches_the_staged_weights_the_actors_then_load(tiny_paths, tmp_path, monkeypatch):
    """With TAG2MASK_WEIGHTS set, the setup command copies exactly what `--clip-checkpoint
    PREFIX/clip --sd-checkpoint PREFIX/sd` load: afterwards the actors read only the node cache."""
    import fsspec

    from pipeline import models, weights
    from pipeline.config import ClipConfig, ModelConfig, SDConfig

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    assert any("export TAG2MASK_WEIGHTS=" in c for c in config["worker_setup_commands"])
    code = re.search(r'python -c "(.*)"', config["worker_setup_commands"][-1], re.S).group(1)
    clip = ClipConfig(
        model=str(tiny_paths["clip_config"]), pretrained=None, checkpoint=str(tiny_paths["clip_checkpoint"])
    )
    prefix = f"memory://staged-{uuid.uuid4().hex[:8]}"
    urls = models.stage_weights(ModelConfig(clip=clip, sd=SDConfig(checkpoint=str(tiny_paths["sd_dir"]))), prefix)
    monkeypatch.setenv("TAG2MASK_WEIGHTS", prefix)
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    exec(compile(code, "ray_cluster.yaml setup", "exec"), {})  # noqa: S102 - the command the nodes run
    fs = fsspec.filesystem("memory")
    for path in fs.find(prefix):
        if not path.endswith(weights.MANIFEST_NAME):
            fs.rm(path)  # only the manifests remain: a load must come from the prefetched cache
    remote = ModelConfig(clip=ClipConfig(model=clip.model, pretrained=None, checkpoint=urls["clip"]),
                         sd=SDConfig(checkpoint=urls["sd"]))  # fmt: skip
    clip_w, sd_w = models.resolve_weights(remote)
    assert Path(clip_w.path).read_bytes() == Path(tiny_paths["clip_checkpoint"]).read_bytes()
    assert Path(sd_w.path).parent == tmp_path / "cache"
