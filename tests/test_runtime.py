"""Ray start-up is predictable: a new loopback-only local instance without an address, a clear and
fast error for an address nobody answers on, and a description of what was started or joined."""
from __future__ import annotations

import ipaddress
import shutil
import socket
import tempfile
import time

import pytest
import ray

from entk_ray.distributed.runtime import RayConnectionError, describe_cluster, init_ray, shutdown_ray

pytestmark = pytest.mark.ray  # these start (or refuse to start) Ray


@pytest.fixture
def no_ray(ray_manager):
    """Nothing connected before the test (the session's shared Ray, if up, is shut down: the next
    test that needs it starts it again), nothing left connected after."""
    ray_manager.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def _free_port() -> int:
    """A TCP port nothing listens on (on any interface) right now."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _node_address() -> str:
    """This machine's address as Ray resolves "127.0.0.1" when joining (it never dials loopback)."""
    from ray._private.services import node_ip_address_from_perspective

    return node_ip_address_from_perspective()


def _listening_addresses_of_this_process_tree() -> set[str]:
    import psutil  # vendored by Ray (ray/thirdparty_files), importable once ray is imported

    me = psutil.Process()
    pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.timeout(120)
def test_local_start_ignores_a_recorded_cluster_and_listens_on_loopback_only(no_ray, monkeypatch):
    # A stale record of an earlier `ray start` (its head is gone): plain ray.init() would try to join
    # it (and hang for minutes); init_ray() without an address must start a new local instance.
    # So must it with the Jobs API's URL in RAY_ADDRESS (exported for `ray job …`, docs/cluster.md).
    monkeypatch.setenv("RAY_ADDRESS", "http://localhost:8265")
    temp_dir = tempfile.mkdtemp(prefix="entkrt", dir="/tmp")  # short: Ray's socket paths live below
    try:
        with open(f"{temp_dir}/ray_current_cluster", "w") as fh:
            fh.write(f"{_node_address()}:{_free_port()}")
        start = time.perf_counter()
        connection = init_ray(None, num_cpus=1, num_gpus=0, include_dashboard=True, _temp_dir=temp_dir)
        elapsed = time.perf_counter() - start
        try:
            assert connection  # truthy: we started it, so we own its shutdown
            assert connection.mode == "local"
            assert connection.address.startswith("127.0.0.1:"), connection.address
            assert connection.dashboard_url and connection.dashboard_url.startswith("http://127.0.0.1:")
            assert (connection.nodes, connection.cpus, connection.gpus) == (1, 1.0, 0.0)
            line = connection.description
            assert "started a local instance at 127.0.0.1:" in line and "1 node, 1 CPU, 0 GPUs" in line, line
            assert "\n" not in line
            assert elapsed < 90, f"local start took {elapsed:.0f}s"
            assert not ray.get_runtime_context().runtime_env.get("working_dir")  # nothing to ship locally

            listening = _listening_addresses_of_this_process_tree()
            assert listening, "found no listening socket of the Ray processes"
            exposed = sorted(ip for ip in listening if not _is_loopback(ip))
            assert not exposed, f"local Ray listens beyond loopback: {exposed}"
        finally:
            shutdown_ray(connection)
        assert not ray.is_initialized()

        # address="local" (Ray's word for a new instance) ignores even a cluster address in RAY_ADDRESS.
        monkeypatch.setenv("RAY_ADDRESS", f"{_node_address()}:{_free_port()}")
        connection = init_ray("local", num_cpus=1, include_dashboard=False, _temp_dir=temp_dir)
        try:
            assert connection.mode == "local" and connection.address.startswith("127.0.0.1:")
            assert "(no dashboard)" in connection.description
        finally:
            shutdown_ray(connection)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(120)
def test_joins_a_given_cluster_and_describes_it(no_ray):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0,
                                                             "include_dashboard": False})
    try:
        connection = init_ray(cluster.address, connect_timeout_s=5)
        try:
            assert connection and connection.mode == "joined"
            assert (connection.nodes, connection.cpus, connection.gpus) == (1, 1.0, 0.0)
            assert connection.address == cluster.address
            assert f"joined the cluster at {cluster.address}" in connection.description
            assert "(no dashboard)" in connection.description
            # Joining ships this source checkout with the job (cluster_runtime_env).
            assert ray.get_runtime_context().runtime_env.get("working_dir")

            # Already connected: used as is, reported, and not ours to shut down.
            again = init_ray(None)
            assert not again and again.mode == "existing"
            shutdown_ray(again)
            assert ray.is_initialized()
            assert describe_cluster() == again.description
        finally:
            shutdown_ray(connection)
        assert not ray.is_initialized()

        # The caller's own runtime_env wins over the shipped checkout.
        connection = init_ray(cluster.address, runtime_env={"env_vars": {"ENTK_RUNTIME_TEST": "1"}})
        try:
            runtime_env = ray.get_runtime_context().runtime_env
            assert runtime_env.get("env_vars") == {"ENTK_RUNTIME_TEST": "1"}
            assert not runtime_env.get("working_dir")
        finally:
            shutdown_ray(connection)
    finally:
        cluster.shutdown()


@pytest.mark.timeout(60)
def test_an_address_where_nothing_listens_fails_fast_and_says_what_to_check(no_ray):
    port = _free_port()
    start = time.perf_counter()
    with pytest.raises(RayConnectionError) as info:
        init_ray(f"127.0.0.1:{port}", connect_timeout_s=2)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 10, f"took {elapsed:.1f}s to give up"  # Ray alone retries for 10+ minutes
    assert f"--address 127.0.0.1:{port}" in message and f":{port}" in message
    assert "ray status" in message and "firewall" in message
    assert not ray.is_initialized()


@pytest.mark.timeout(60)
def test_ray_address_from_the_environment_is_joined_not_replaced_by_a_local_instance(no_ray, monkeypatch):
    # Ray Jobs set RAY_ADDRESS for every job's entry point: a driver without --address joins it.
    port = _free_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(RayConnectionError, match=rf"RAY_ADDRESS=127\.0\.0\.1:{port}"):
        init_ray(None, connect_timeout_s=2)
    assert not ray.is_initialized()


def test_a_malformed_address_is_rejected_before_anything_starts(no_ray):
    with pytest.raises(RayConnectionError, match="expected auto, HOST:PORT or ray://HOST:PORT"):
        init_ray("not-an-address")
    with pytest.raises(RayConnectionError, match="ray://HOST:PORT"):
        init_ray("ray://no-port")
    assert not ray.is_initialized()


def test_a_jobs_api_url_in_ray_address_is_not_a_cluster_to_join(no_ray, monkeypatch):
    # docs/cluster.md exports RAY_ADDRESS=http://localhost:8265 for `ray job …`; a local run in the
    # same shell must not try to join it, and --address auto says what is wrong.
    monkeypatch.setenv("RAY_ADDRESS", "http://localhost:8265")
    with pytest.raises(RayConnectionError, match="Jobs API URL"):
        init_ray("auto")
    with pytest.raises(RayConnectionError, match="Jobs API URL"):
        init_ray("https://head:8265")
    assert not ray.is_initialized()


def test_object_store_size_goes_to_a_local_start_only(no_ray, monkeypatch):
    from entk_ray.distributed import runtime

    seen = {}
    monkeypatch.setattr(runtime, "_start_local", lambda cpus, gpus, dashboard, kwargs: seen.update(local=kwargs))
    monkeypatch.setattr(runtime, "_join", lambda address, source, timeout, kwargs: seen.update(joined=kwargs))
    monkeypatch.setattr(runtime, "_describe", lambda **_: runtime.RayConnection(True, "local", None, None, 1, 2.0, 0.0))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(None, object_store_memory=2**30)
    assert seen["local"]["object_store_memory"] == 2**30
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster's nodes were sized when they started
    init_ray(None, object_store_memory=2**30)
    assert "object_store_memory" not in seen["joined"]
