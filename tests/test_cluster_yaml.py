"""cluster/aws.yaml passes Ray's own cluster-config validation offline, is safe by default (dashboard
on loopback, bucket-scoped IAM policies, no open Ray Client port), and installs exactly what CI
tests: the lock file, which lies inside pyproject's ranges; the README's install is CI's."""
from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "cluster" / "aws.yaml"
LOCK = ROOT / "requirements" / "lock-py311.txt"
WORKER_POLICY = ROOT / "cluster" / "iam-worker-policy.json"
HEAD_POLICY = ROOT / "cluster" / "iam-head-policy.json"
BUCKET_PLACEHOLDER = "YOUR-BUCKET"


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(YAML.read_text())


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    """``{canonical name: exact version}`` of the lock file; every non-comment line must be a pin."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"not an exact pin in {LOCK.name}: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} pinned twice"
        pins[name] = match[2]
    return pins


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _worker_types(raw) -> dict[str, dict]:
    return {name: t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]}


# ---------------------------------------------------------------------------------- the YAML itself
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


def test_gpu_worker_types_and_bounds(raw):
    instances = {t["node_config"]["InstanceType"]: t for t in _worker_types(raw).values()}
    assert {"g5.12xlarge", "p4d.24xlarge"} <= set(instances)
    assert instances["g5.12xlarge"]["resources"]["GPU"] == 4
    assert instances["p4d.24xlarge"]["resources"]["GPU"] == 8
    for t in instances.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"]
    # At least one GPU node is up, so a run sees GPUs (and starts GPU feature actors) from the start.
    assert any(t["min_workers"] >= 1 for t in instances.values())


# ------------------------------------------------------------------------------ safe by default
def test_dashboard_listens_on_loopback_only(raw):
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    # Nothing asks for a Ray Client port to be opened (the Jobs API is reached through `ray dashboard`).
    assert "ray-client-server-port" not in head_start
    for path in (YAML, ROOT / "docs" / "cluster.md", ROOT / "README.md"):
        text = path.read_text()
        assert "10001" not in text and "ray://" not in text, f"{path.name} suggests Ray Client"
    docs = (ROOT / "docs" / "cluster.md").read_text()
    assert "ray dashboard cluster/aws.yaml" in docs and "127.0.0.1" in docs


def _statements(path: Path) -> list[dict]:
    policy = json.loads(path.read_text())
    assert policy["Version"] == "2012-10-17"
    statements = policy["Statement"]
    assert statements and all(s["Effect"] == "Allow" for s in statements)
    return statements


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _s3_grants(statements) -> dict[str, set[str]]:
    """``{resource ARN: S3 actions allowed on it}``."""
    grants: dict[str, set[str]] = {}
    for s in statements:
        actions = [a for a in _as_list(s["Action"]) if a.startswith("s3:") or a == "*"]
        for resource in _as_list(s["Resource"]):
            if actions:
                grants.setdefault(resource, set()).update(actions)
    return grants


@pytest.mark.parametrize("path", [WORKER_POLICY, HEAD_POLICY], ids=["worker", "head"])
def test_iam_policies_are_scoped_to_the_users_bucket(path):
    statements = _statements(path)
    for s in statements:
        for action in _as_list(s["Action"]):
            assert action != "*" and not action.endswith(":*"), f"{path.name}: wildcard action {action}"
    grants = _s3_grants(statements)
    bucket = f"arn:aws:s3:::{BUCKET_PLACEHOLDER}"
    imagenet, artifacts = f"{bucket}/imagenet/*", f"{bucket}/entk-artifacts/*"
    assert set(grants) == {bucket, imagenet, artifacts}, f"{path.name}: S3 resources {sorted(grants)}"
    assert grants[imagenet] == {"s3:GetObject"}  # ImageNet is read-only
    assert {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= grants[artifacts]
    assert grants[bucket] == {"s3:ListBucket", "s3:GetBucketLocation"}
    # Listing is limited to the two prefixes.
    listing = [s for s in statements if "s3:ListBucket" in _as_list(s["Action"])]
    assert listing and all(
        set(s["Condition"]["StringLike"]["s3:prefix"]) <= {"imagenet", "imagenet/*", "entk-artifacts",
                                                         "entk-artifacts/*"} for s in listing)
    assert "FullAccess" not in path.read_text()


def test_head_policy_lets_the_autoscaler_manage_only_this_clusters_workers(raw):
    statements = _statements(HEAD_POLICY)
    ec2 = {a for s in statements for a in _as_list(s["Action"]) if a.startswith("ec2:")}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:DescribeInstances", "ec2:CreateTags"} <= ec2
    run = next(s for s in statements if "ec2:RunInstances" in _as_list(s["Action"]))
    launchable = set(run["Condition"]["StringEqualsIfExists"]["ec2:InstanceType"])
    assert launchable == {t["node_config"]["InstanceType"] for t in _worker_types(raw).values()}
    terminate = next(s for s in statements if "ec2:TerminateInstances" in _as_list(s["Action"]))
    assert terminate["Condition"]["StringEquals"]["ec2:ResourceTag/ray-cluster-name"] == raw["cluster_name"]
    # It may pass exactly the workers' role (the docs name role and instance profile alike).
    worker_profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for t in _worker_types(raw).values()}
    passed = [r for s in statements if "iam:PassRole" in _as_list(s["Action"]) for r in _as_list(s["Resource"])]
    assert passed == [f"arn:aws:iam::*:role/{name}" for name in sorted(worker_profiles)]


def test_nodes_get_the_shipped_roles_not_rays_default(raw):
    head = raw["available_node_types"][raw["head_node_type"]]["node_config"]
    # Without a head profile, `ray up` creates ray-autoscaler-v1 with EC2 and S3 full access.
    assert head["IamInstanceProfile"]["Name"] == "entk-ray-head"
    for t in _worker_types(raw).values():
        assert t["node_config"]["IamInstanceProfile"]["Name"] == "entk-ray-worker"
    docs = (ROOT / "docs" / "cluster.md").read_text()
    for name in ("iam-head-policy.json", "iam-worker-policy.json", "iam-ec2-trust.json", BUCKET_PLACEHOLDER):
        assert name in docs
    for path in (ROOT / "cluster").iterdir():
        assert "FullAccess" not in path.read_text(), path.name
    # The docs attach no AWS managed policy (AmazonS3FullAccess & co.), only the shipped ones.
    assert "arn:aws:iam::aws:policy/" not in docs and "attach-role-policy" not in docs


# ----------------------------------------------------------------------------- pinned installs
def test_node_setup_installs_this_project_from_the_lock(raw):
    mounts = raw["file_mounts"]
    target = next(remote for remote, local in mounts.items() if local == ".")
    installs = [cmd for cmd in raw["setup_commands"] + raw.get("head_setup_commands", [])
                + raw.get("worker_setup_commands", []) if "pip install" in cmd]
    assert installs == [f"pip install --quiet -c {target}/requirements/lock-py311.txt -e {target}"]
    assert ".venv" in raw["rsync_exclude"]  # never ship the local virtual environment
    assert not any(pattern in ("requirements", "requirements/*", "*.txt") for pattern in raw["rsync_exclude"])


def test_image_matches_the_lock_and_the_installed_ray(raw, lock):
    image = raw["docker"]["image"]
    assert image == f"rayproject/ray:{lock['ray']}-py311-gpu"  # lock-py311 ↔ the image's Python
    assert lock["ray"] == ray.__version__


def test_lock_pins_every_dependency_inside_pyprojects_ranges(lock, project):
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not in {LOCK.name}"
        assert req.specifier.contains(lock[name], prereleases=True), f"{name}=={lock[name]} outside {req}"
    assert canonicalize_name(project["name"]) not in lock  # the project itself is installed from source
    assert (lock["torch"], lock["torchvision"], lock["ray"]) == ("2.14.1", "0.29.1", "2.58.0")


def test_pyproject_admits_tested_versions_only(project):
    python = Requirement(f"python{project['requires-python']}").specifier
    assert python.contains("3.11.7") and python.contains("3.12.0") and not python.contains("3.13.0")
    spec = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
    for name, tested in {"torch": ["2.11.0", "2.14.1"], "torchvision": ["0.26.0", "0.29.1"],
                         "ray": ["2.58.0"]}.items():
        assert all(spec[name].contains(v) for v in tested), (name, spec[name])
        assert not any(s.operator == "==" for s in spec[name]), f"{name} is pinned exactly: {spec[name]}"
    # Ray 2.60 turns on token authentication for a local ray.init: not tested here, not admitted.
    assert not spec["ray"].contains("2.60.0")
    assert not spec["torch"].contains("2.15.0")


def test_readme_install_is_exactly_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Install section has no bash block"
    readme_lines = [line.strip() for line in block[1].splitlines() if line.strip()]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    positions = [ci_lines.index(line) if line in ci_lines else -1 for line in readme_lines]
    assert -1 not in positions, f"README install lines missing from .ci/run: {readme_lines}"
    assert positions == sorted(positions), "CI runs README's install lines in another order"
    assert "pip install -c requirements/lock-py311.txt -e '.[dev]'" in readme_lines
    assert "local disk" not in section
