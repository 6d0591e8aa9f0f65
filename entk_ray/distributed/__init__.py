"""The Ray layer: feature actors, kernel-block tasks, the Tune sweep, metrics, and ``RayBackend``.

Thin by design: every number is computed by the Ray-free core (``entk_ray.features``,
``entk_ray.kernels``, ``entk_ray.solvers``); this package only decides where it runs.

* :mod:`~entk_ray.distributed.runtime` — join or start Ray (:func:`init_ray`, :func:`shutdown_ray`).
* :mod:`~entk_ray.distributed.actors` — feature actors and the ``ray.wait`` shard scheduler.
* :mod:`~entk_ray.distributed.blocks` — kernel-block tasks and assembly of K / K_e.
* :mod:`~entk_ray.distributed.sweep` — the telescopic β search as Ray Tune runs.
* :mod:`~entk_ray.distributed.metrics` — custom dashboard metrics.
* :mod:`~entk_ray.distributed.backend` — :class:`RayBackend`, the pipeline's Ray backend.
* :mod:`~entk_ray.distributed.testing` — a tiny model and benchmark for tests and smoke checks.
"""
from entk_ray.distributed.runtime import NAMESPACE, init_ray, shutdown_ray

__all__ = ["NAMESPACE", "RayBackend", "init_ray", "shutdown_ray"]


def __getattr__(name: str):
    # Lazy: Tune trial workers import entk_ray.distributed.sweep and should not pay for torch.
    if name == "RayBackend":
        from entk_ray.distributed.backend import RayBackend

        return RayBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
