"""ray_cluster.yaml is a valid launcher config and keeps Ray's unauthenticated APIs on localhost."""

from __future__ import annotations

import json
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
