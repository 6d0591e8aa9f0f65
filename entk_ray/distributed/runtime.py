"""Joining or starting Ray, and undoing only what we did.

``init_ray`` is idempotent with respect to an existing connection: if Ray is already initialized
(a test session fixture, a notebook, ``ray.init`` in a script) it is used as is and *not* shut down
later, so a backend never tears down a Ray instance it did not start. ``address`` follows
``RayConfig.address``: ``None`` starts a local Ray (the embedded default, one process tree on this
machine), ``"auto"`` joins the cluster this machine belongs to (e.g. on the head after ``ray up``),
``ray://host:10001`` connects through Ray Client.
"""
from __future__ import annotations

import logging
import os
import time

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
        ray.init(address=address, namespace=NAMESPACE, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 namespace=NAMESPACE, **kwargs)
    log.info("ray %s initialized in %.1fs: %s", ray.__version__, time.perf_counter() - start,
             ray.cluster_resources())
    return True


def shutdown_ray(started: bool) -> None:
    """``ray.shutdown()`` only if ``started`` (i.e. :func:`init_ray` returned True)."""
    if started and ray.is_initialized():
        ray.shutdown()


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))
