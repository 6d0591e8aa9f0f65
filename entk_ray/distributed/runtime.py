"""Joining or starting Ray, and undoing only what we did.

``init_ray`` is idempotent with respect to an existing connection: if Ray is already initialized
(a test session fixture, a notebook, ``ray.init`` in a script) it is used as is and *not* shut down
later, so a backend never tears down a Ray instance it did not start. ``address`` follows
``RayConfig.address``: ``None`` starts a local Ray (the embedded default, one process tree on this
machine), ``"auto"`` joins the cluster this machine belongs to (e.g. on the head after ``ray up``),
``ray://host:10001`` connects through Ray Client. Joining a cluster ships this package with the
job (:func:`cluster_runtime_env`), so code changes need no ``ray up`` re-sync.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import ray

log = logging.getLogger(__name__)

#: Namespace of every named actor this package creates (dashboard: Actors → namespace).
NAMESPACE = "entk_ray"


def init_ray(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             include_dashboard: bool | None = None, **kwargs) -> bool:
    """Connect to (or start) Ray unless already connected. Returns True when this call started
    or joined a Ray instance that the caller should later :func:`shutdown_ray`."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    start = time.perf_counter()
    if address:
        env = cluster_runtime_env(address)
        if env and "runtime_env" not in kwargs:
            kwargs["runtime_env"] = env
        ray.init(address=address, namespace=NAMESPACE, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 namespace=NAMESPACE, **kwargs)
    log.info("ray %s initialized in %.1fs: %s", ray.__version__, time.perf_counter() - start,
             ray.cluster_resources())
    return True


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


def shutdown_ray(started: bool) -> None:
    """``ray.shutdown()`` only if ``started`` (i.e. :func:`init_ray` returned True)."""
    if started and ray.is_initialized():
        ray.shutdown()


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))
