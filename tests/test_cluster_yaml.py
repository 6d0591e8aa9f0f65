"""cluster/aws.yaml passes Ray's own cluster-config validation offline and matches this install."""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

YAML = Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(YAML.read_text())


def test_validates_with_rays_schema(raw):
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # raises on any schema violation
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_is_not_vacuous(raw):
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_g5_12xlarge"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_workerz"):
        validate_config(prepare_config(broken))


def test_image_matches_installed_ray(raw):
    image = raw["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"
    pyproject = (YAML.parents[1] / "pyproject.toml").read_text()
    assert f"ray[default,tune]=={ray.__version__}" in pyproject


def test_gpu_worker_types_and_bounds(raw):
    types = raw["available_node_types"]
    instances = {t["node_config"]["InstanceType"]: t for name, t in types.items() if name != raw["head_node_type"]}
    assert {"g5.12xlarge", "p4d.24xlarge"} <= set(instances)
    assert instances["g5.12xlarge"]["resources"]["GPU"] == 4
    assert instances["p4d.24xlarge"]["resources"]["GPU"] == 8
    for t in instances.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"]
        assert t["node_config"]["IamInstanceProfile"]  # workers read ImageNet / write artifacts on S3
    # At least one GPU node is up, so a run sees GPUs (and starts GPU feature actors) from the start.
    assert any(t["min_workers"] >= 1 for t in instances.values())


def test_setup_installs_this_project(raw):
    mounts = raw["file_mounts"]
    target = next(remote for remote, local in mounts.items() if local == ".")
    assert any("pip install" in cmd and target in cmd for cmd in raw["setup_commands"])
    assert ".venv" in raw["rsync_exclude"]  # never ship the local virtual environment
    assert any("--dashboard-host=0.0.0.0" in cmd for cmd in raw["head_start_ray_commands"])
