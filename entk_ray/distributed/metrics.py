"""Custom Ray metrics: what to watch on the dashboard's Metrics tab (and in Prometheus/Grafana).

All names carry the ``entk_`` prefix (Prometheus shows them as ``ray_entk_…``). Feature metrics
are recorded by the driver when it collects a shard: actors are released as soon as their work is
done, and a killed process's last metric updates would never be exported.

* ``entk_examples_total`` (Counter, tags ``split``, ``worker``): examples whose features are done.
* ``entk_examples_per_second`` (Gauge, tag ``worker``): throughput of each feature actor's last shard.
* ``entk_shards_done_total`` (Counter, tag ``split``): feature shards gathered by the driver.
* ``entk_blocks_done_total`` (Counter, tag ``kind``: ``train``/``eval``/``cached``): kernel blocks placed into K.
* ``entk_solver_steps_total`` (Counter, tag ``method``): solver iterations run by sweep trials.
* ``entk_solver_trials_total`` (Counter, tag ``method``): finished sweep trials.

Metric objects are created lazily, once per process, and every update is best-effort: a process
that cannot export metrics (no metrics agent) still runs the pipeline.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

_SPECS = {
    "examples": ("counter", "entk_examples_total", "Examples whose eNTK features are computed.", ("split", "worker")),
    "examples_per_s": ("gauge", "entk_examples_per_second", "Feature throughput of a feature actor's last shard.",
                       ("worker",)),
    "shards": ("counter", "entk_shards_done_total", "Feature shards gathered by the driver.", ("split",)),
    "blocks": ("counter", "entk_blocks_done_total", "Kernel blocks placed into K or K_e.", ("kind",)),
    "solver_steps": ("counter", "entk_solver_steps_total", "Solver iterations run by sweep trials.", ("method",)),
    "solver_trials": ("counter", "entk_solver_trials_total", "Finished sweep trials.", ("method",)),
}


@functools.cache
def _metric(name: str):
    from ray.util import metrics

    kind, metric_name, description, tag_keys = _SPECS[name]
    cls = metrics.Counter if kind == "counter" else metrics.Gauge
    return cls(metric_name, description=description, tag_keys=tag_keys)


def record(name: str, value: float = 1.0, **tags: str) -> None:
    """Increment a counter (or set a gauge) by name; never raises."""
    try:
        metric = _metric(name)
        tags = {k: str(v) for k, v in tags.items()}
        if _SPECS[name][0] == "counter":
            if value > 0:
                metric.inc(value, tags=tags)
        else:
            metric.set(value, tags=tags)
    except Exception as exc:  # noqa: BLE001 - metrics must never break a run
        log.debug("metric %s not recorded: %s", name, exc)
