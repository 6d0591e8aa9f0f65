"""Session-scoped Ray for the tests: one small local Ray, or one small multi-node cluster.

Starting Ray costs seconds, so every Ray test shares one instance. Two kinds exist and only one
can be connected at a time:

* ``ray_local`` — ``ray.init(num_cpus=2, num_gpus=2)``: two *fake* GPUs (Ray only schedules them;
  torch sees no CUDA and the actors compute on the CPU), so the GPU code paths are exercised.
* ``ray_cluster`` — a ``ray.cluster_utils.Cluster`` on this machine: a head with 1 CPU and two
  worker nodes with 1 CPU and 1 fake GPU each (one feature actor per worker node).

Tests that use ``ray_cluster`` are ordered after those that use ``ray_local`` (see
:func:`pytest_collection_modifyitems`), so the switch happens once. Whatever is up at the end of
the session is shut down.
"""
from __future__ import annotations

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

# Keep the shared 2-core machine quiet and light.
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

LOCAL_RESOURCES = {"num_cpus": 2, "num_gpus": 2}


class _RayManager:
    """Which Ray this session has up, and switching between the two kinds."""

    def __init__(self):
        self.kind: str | None = None
        self.cluster = None

    def local(self) -> None:
        import ray

        if self.kind == "local" and ray.is_initialized():
            return
        self.shutdown()
        # address="local": a new instance, never a cluster that a `ray start` left on this machine.
        ray.init(address="local", include_dashboard=False, namespace="entk_ray_tests",
                 _system_config={"metrics_report_interval_ms": 500},  # custom metrics show up fast
                 **LOCAL_RESOURCES)
        self.kind = "local"

    def multi_node(self):
        import ray
        from ray.cluster_utils import Cluster

        if self.kind == "cluster" and ray.is_initialized():
            return self.cluster
        self.shutdown()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
            # Notice a dead node in ~1.5 s instead of ~15 s (node-failure tests).
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                               "health_check_timeout_ms": 500}})
        for _ in range(2):
            cluster.add_node(num_cpus=1, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="entk_ray_tests")
        self.cluster, self.kind = cluster, "cluster"
        return cluster

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None
        self.kind = None


@pytest.fixture(scope="session")
def ray_manager():
    manager = _RayManager()
    yield manager
    manager.shutdown()


@pytest.fixture
def ray_local(ray_manager):
    """A connected local Ray with 2 CPUs and 2 fake GPUs (shared by the session)."""
    ray_manager.local()
    return ray_manager


@pytest.fixture
def ray_cluster(ray_manager):
    """A connected 3-node ``Cluster`` (head: 1 CPU; 2 workers: 1 CPU + 1 fake GPU each)."""
    return ray_manager.multi_node()


@pytest.fixture
def one_torch_thread():
    """Tiny networks train on one intra-op thread, as in a 1-CPU Ray Train worker: more threads
    only contend on a small shared machine (the numbers hold at any thread count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts or uses a Ray instance (local or a multi-node test cluster); "
                                       "the math alone: pytest -m 'not ray'")


def pytest_collection_modifyitems(session, config, items):
    """Mark every test that uses Ray with ``ray``, and run tests in three groups, keeping file
    order within each: no Ray, local Ray, cluster."""
    def group(item) -> int:
        names = getattr(item, "fixturenames", ())
        return 2 if "ray_cluster" in names else 1 if "ray_local" in names else 0

    for item in items:
        if group(item):
            item.add_marker(pytest.mark.ray)
    items[:] = sorted(items, key=group)  # sorted is stable


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Once a session that used Ray has reported, exit with its status without finalizing the
    interpreter.

    Why: one full run in five (CI's default thread count, every test passed and reported) ended in
    a segmentation fault during interpreter finalization, after Ray had been shut down and
    restarted several times in the process (local Ray ↔ test cluster), a failure mode Ray reports
    for its core worker's threads (ray-project/ray#31145). Nothing of ours runs at that point; the
    results are already printed, and the status is pytest's own."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None or "ray" not in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_EXIT_STATUS = pytest.StashKey[int]()
