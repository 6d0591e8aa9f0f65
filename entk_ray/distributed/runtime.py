"""Joining or starting Ray predictably, saying which, and undoing only what we did.

``init_ray(address)`` follows ``RayConfig.address``:

* ``None`` starts a **new local Ray** (``ray.init(address="local")``) on this machine, listening on
  127.0.0.1 only. It never joins a cluster that an earlier ``ray start`` recorded on the machine
  (plain ``ray.init()`` would, and hangs for minutes when that record is stale). The one
  exception is a GCS address in ``RAY_ADDRESS``: Ray Jobs sets it for every job's entry point, so
  a driver started by ``ray job submit`` joins its cluster. (An ``http://`` ``RAY_ADDRESS`` is the
  Jobs API's, exported for the ``ray job`` commands, and is not joined.)
* ``"local"`` is the same, ignoring ``RAY_ADDRESS`` too.
* ``"auto"`` joins the cluster this machine belongs to (on the head after ``ray up``, or inside a
  Ray Job); ``host:port`` joins that GCS; ``ray://host:port`` connects through Ray Client.
  Joining a cluster ships this package with the job (:func:`cluster_runtime_env`), so code changes
  need no ``ray up`` re-sync.

Before joining, the address is probed with a plain TCP connection (``connect_timeout_s``): an
address where nothing listens fails in seconds with :class:`RayConnectionError` naming the address
and what to check, instead of Ray retrying its GCS connection for 10+ minutes. Ray 2.58 offers no
connect timeout for ``ray.init(address=...)`` itself: ``RAY_gcs_rpc_server_reconnect_timeout_s``
ends the whole process (``QuickExit``) rather than raising, and ``RAY_py_gcs_connect_timeout_s`` is
read once at import. What is bounded per call is the number of GCS connection attempts
(``RAY_gcs_server_port_wait_time_s``, read on each ``ray.init``), so an endpoint that accepts TCP
but is not a GCS fails after one attempt (~40 s) instead of 20.

If Ray is already initialized (a test fixture, a notebook, a script's own ``ray.init``) it is
used as is and *not* shut down later: a backend never tears down a Ray instance it did not start.
Every call logs (INFO) and returns a one-line description of the cluster: how it was reached, its
address, dashboard URL, nodes, CPUs and GPUs (:attr:`RayConnection.description`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import ray

log = logging.getLogger(__name__)

#: Namespace of every named actor this package creates (dashboard: Actors → namespace).
NAMESPACE = "entk_ray"

#: Seconds a TCP connection to a given cluster address may take before giving up.
DEFAULT_CONNECT_TIMEOUT_S = 10.0

LOOPBACK = "127.0.0.1"


class RayConnectionError(ConnectionError):
    """A Ray cluster address that cannot be reached (or is not a Ray cluster)."""


@dataclasses.dataclass(frozen=True)
class RayConnection:
    """What :func:`init_ray` did. Truthy when this call started or joined Ray, i.e. when the caller
    owns the connection and should later :func:`shutdown_ray` it."""

    started: bool
    mode: str  # "local" (a new local instance), "joined" (an existing cluster) or "existing"
    address: str | None
    dashboard_url: str | None
    nodes: int
    cpus: float
    gpus: float

    def __bool__(self) -> bool:
        return self.started

    @property
    def description(self) -> str:
        """One line for the command line, e.g. ``Ray 2.58.0: started a local instance at
        127.0.0.1:6379 (dashboard http://127.0.0.1:8265): 1 node, 2 CPUs, 0 GPUs``."""
        what = {"local": "started a local instance", "joined": "joined the cluster",
                "existing": "using the already connected Ray"}[self.mode]
        where = f" at {self.address}" if self.address else ""
        dashboard = f" (dashboard {self.dashboard_url})" if self.dashboard_url else " (no dashboard)"
        return (f"Ray {ray.__version__}: {what}{where}{dashboard}: {_count(self.nodes, 'node')}, "
                f"{_count(self.cpus, 'CPU')}, {_count(self.gpus, 'GPU')}")


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool | None = None, object_store_memory: int | None = None,
             connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, **kwargs) -> RayConnection:
    """Start a local Ray (``address=None``) or join ``address``, unless Ray is already initialized.

    ``num_cpus``, ``num_gpus``, ``include_dashboard`` and ``object_store_memory`` (bytes) apply to a
    local instance only (a cluster's nodes were sized when they started); other
    keyword arguments go to ``ray.init``. Raises :class:`RayConnectionError` when ``address`` (or
    ``RAY_ADDRESS``) cannot be reached within ``connect_timeout_s``. Returns a
    :class:`RayConnection` (truthy iff this call started or joined Ray)."""
    if ray.is_initialized():
        connection = _describe(started=False, mode="existing", context=None)
        log.info("%s", connection.description)
        return connection
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    env_address = os.environ.get("RAY_ADDRESS") or None
    if env_address and _is_jobs_api_url(env_address):
        env_address = None  # `ray job …`'s dashboard URL (docs/cluster.md), not a cluster to join
    if address == "local":  # Ray's own word for "a new local instance", whatever RAY_ADDRESS says
        address = env_address = None
    start = time.perf_counter()
    if address or env_address:
        source = f"--address {address}" if address else f"RAY_ADDRESS={env_address}"
        context = _join(address or env_address, source, connect_timeout_s, kwargs)
        mode = "joined"
    else:
        if object_store_memory:
            kwargs = {**kwargs, "object_store_memory": int(object_store_memory)}
        context = _start_local(num_cpus, num_gpus, include_dashboard, kwargs)
        mode = "local"
    connection = _describe(started=True, mode=mode, context=context)
    log.info("%s (in %.1fs)", connection.description, time.perf_counter() - start)
    return connection


def describe_cluster() -> str:
    """One line describing the Ray this process is connected to (see :class:`RayConnection`)."""
    if not ray.is_initialized():
        return "Ray is not initialized"
    return _describe(started=False, mode="existing", context=None).description


def cluster_runtime_env(address: str | None, environ=os.environ, package: Path | None = None) -> dict | None:
    """The ``runtime_env`` a driver joining a cluster at ``address`` passes to ``ray.init``.

    Ray uploads this package's code with the job and every worker runs it, so a cluster runs the
    driver's code, whatever copy its nodes were built with (no ``ray up`` re-sync after a change):

    * from a source checkout (``pyproject.toml`` beside the package): the checkout as the job's
      ``working_dir``, as ``ray job submit --working-dir .`` does (``.git``, ``.venv``,
      ``results`` and what ``.gitignore`` lists stay behind). Not ``py_modules``: Ray puts the
      driver's working directory ahead of them on every worker's ``sys.path``, so the stale
      checkout at the same path on a node (``~/entk_ray`` after ``ray up``) would win. As under
      Ray Jobs, workers then run in the shipped copy: paths they write must be absolute or remote.
    * from an installed package: the package as ``py_modules``.

    ``None`` when nothing needs shipping: a local Ray (no ``address``, or ``"local"``), or a Ray
    Job whose own runtime_env already ships code (the job has it; Ray merges the job's and the
    driver's runtime_env and refuses a key given twice).
    """
    if not address or address == "local":
        return None
    job_config = environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        job_env = json.loads(job_config).get("runtime_env") or {}
        if any(job_env.get(key) for key in ("working_dir", "py_modules", "excludes")):
            return None
    package = Path(package) if package is not None else Path(__file__).resolve().parents[1]
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file():
        return {"working_dir": str(checkout),
                "excludes": ["/.git", "/.venv/", "/results/", "__pycache__/", "*.pyc"]}
    return {"py_modules": [str(package)], "excludes": ["__pycache__/", "*.pyc"]}


def shutdown_ray(started: bool | RayConnection) -> None:
    """``ray.shutdown()`` only if ``started`` (i.e. :func:`init_ray`'s result is truthy)."""
    if started and ray.is_initialized():
        ray.shutdown()


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


def node_cpus() -> list[float]:
    """CPUs of each live node of the cluster (nodes without CPUs left out)."""
    return [float(node["Resources"]["CPU"]) for node in ray.nodes()
            if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) > 0]


# ---------------------------------------------------------------------------------------------
def _start_local(num_cpus, num_gpus, include_dashboard, kwargs) -> object:
    options = {"_node_ip_address": LOOPBACK, "dashboard_host": LOOPBACK, **kwargs}
    with _keep_loopback_node_ip(options["_node_ip_address"]):
        context = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                           include_dashboard=include_dashboard, namespace=NAMESPACE, **options)
    node_ip = getattr(context, "address_info", {}).get("node_ip_address")
    if options["_node_ip_address"] == LOOPBACK and node_ip != LOOPBACK:
        log.warning("the local Ray instance uses node address %s, not %s: its servers may be "
                    "reachable from other machines", node_ip, LOOPBACK)
    return context


@contextlib.contextmanager
def _keep_loopback_node_ip(node_ip: str) -> Iterator[None]:
    """Let a local instance keep 127.0.0.1 as its node address, so that it listens on loopback.

    On Linux ``ray.init`` replaces a loopback ``_node_ip_address`` by this machine's network
    address (``services.resolve_ip_for_localhost``), and then the GCS, raylet and workers listen on
    every interface. Ray keeps loopback when it considers multi-node clusters off
    (``ray_constants.ENABLE_RAY_CLUSTER``; env ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at
    import), which is exactly what a local instance is: the flag is lowered while it starts.
    """
    from ray._private import ray_constants

    if node_ip != LOOPBACK or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _join(address: str, source: str, connect_timeout_s: float, kwargs) -> object:
    host, port = _gcs_endpoint(address, source)
    try:
        with socket.create_connection((host, port), timeout=connect_timeout_s):
            pass
    except OSError as exc:
        raise RayConnectionError(_unreachable(source, f"{host}:{port}", f"{type(exc).__name__}: {exc}",
                                              connect_timeout_s)) from exc
    env = cluster_runtime_env(address)
    if env and "runtime_env" not in kwargs:
        kwargs = {**kwargs, "runtime_env": env}
    # Something listens: let Ray connect, with one GCS attempt instead of 20 if it is not a GCS.
    with _env_default("RAY_gcs_server_port_wait_time_s", "1"):
        try:
            return ray.init(address=address, namespace=NAMESPACE, **kwargs)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            if ray.is_initialized():
                ray.shutdown()
            raise RayConnectionError(_unreachable(source, f"{host}:{port}", str(exc), None)) from exc


def _gcs_endpoint(address: str, source: str) -> tuple[str, int]:
    """The ``(host, port)`` that ``ray.init(address)`` will connect to."""
    env_address = os.environ.get("RAY_ADDRESS") or ""
    if _is_jobs_api_url(address) or (address == "auto" and _is_jobs_api_url(env_address)):
        url = address if _is_jobs_api_url(address) else f"{env_address} (from RAY_ADDRESS)"
        raise RayConnectionError(
            f"{source}: {url} is a dashboard / Jobs API URL, for `ray job submit`; a run joins a "
            f"cluster by its GCS address: auto (on a cluster node or inside a Ray Job) or HOST:6379")
    if "://" in address:  # ray://host:port (Ray Client)
        netloc = address.split("://", 1)[1].split("/", 1)[0]
        host, _, port = netloc.rpartition(":")
        if not host or not port.isdigit():
            raise RayConnectionError(f"{source}: expected ray://HOST:PORT, got {address!r}")
        return host.strip("[]"), int(port)
    from ray._private.services import canonicalize_bootstrap_address

    try:  # "auto" → RAY_ADDRESS or the cluster `ray start` recorded; 127.0.0.1 → this node's IP
        resolved = canonicalize_bootstrap_address(address)
    except ValueError as exc:
        raise RayConnectionError(f"{source}: {exc}; expected auto, HOST:PORT or ray://HOST:PORT") from exc
    except ConnectionError as exc:
        raise RayConnectionError(
            f"{source}: {str(exc).rstrip('. ')}. Start the cluster first (`ray up cluster/aws.yaml`, or `ray start "
            f"--head` on this machine), give its HOST:PORT, or leave --address out to run on a "
            f"local Ray.") from exc
    if resolved is None:
        raise RayConnectionError(f"{source}: no Ray cluster address to join")
    host, _, port = resolved.rpartition(":")
    return host.strip("[]"), int(port)


def _is_jobs_api_url(address: str) -> bool:
    return address.lower().startswith(("http://", "https://"))


def _unreachable(source: str, endpoint: str, reason: str, timeout_s: float | None) -> str:
    within = f" within {timeout_s:g}s" if timeout_s is not None else ""
    return (f"cannot reach the Ray cluster given by {source} (at {endpoint}){within}: {reason.rstrip('. ')}. "
            f"Check that the cluster is up (`ray status` on its head), that HOST:PORT is its GCS "
            f"address (port 6379 for `ray start --head`), and "
            f"that no firewall or security group blocks this machine. Without --address the run "
            f"starts a local Ray instead.")


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of the block unless the user already set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _describe(*, started: bool, mode: str, context) -> RayConnection:
    address = dashboard = None
    if context is not None:
        info = getattr(context, "address_info", None) or {}
        address = info.get("gcs_address")
        dashboard = getattr(context, "dashboard_url", None) or info.get("webui_url") or None
    if address is None:
        with contextlib.suppress(Exception):
            address = ray.get_runtime_context().gcs_address
    if dashboard is None:
        with contextlib.suppress(Exception):
            from ray._private.worker import get_dashboard_url

            dashboard = get_dashboard_url() or None
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return RayConnection(started=started, mode=mode, address=address, dashboard_url=dashboard, nodes=nodes,
                         cpus=float(resources.get("CPU", 0.0)), gpus=float(resources.get("GPU", 0.0)))


def _count(value: float, unit: str) -> str:
    return f"{value:g} {unit}{'' if value == 1 else 's'}"
