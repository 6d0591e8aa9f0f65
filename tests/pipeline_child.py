"""The whole pipeline (tiny model and benchmark, RayBackend with its artifact store) in a process
of its own, for tests that kill the driver or inspect everything a run writes.

Usage: ``python pipeline_child.py SPEC.json`` where SPEC holds

* ``out_dir``, ``store`` (the artifact store: a folder or ``s3://…``), ``storage_options``;
* ``address``: the Ray to join (the test session's, so no child starts its own);
* ``events``: a file that gets one JSON line per backend event (``event``, ``key``), flushed
  before anything else happens;
* ``kill``: ``{"event": "shard", "count": 2}`` — SIGKILL this process at that event (after the
  line is written), as a crash or an OOM kill would; null: run to the end.

At the end the backend's counters go to ``<out_dir>/stats.json``.
"""
from __future__ import annotations

import json
import os
import signal
import sys

SIZES = {"n_train": 64, "n_id_val": 32, "n_ood": 32}
OVERRIDES = ["features.p=200", "features.batch_size=16", "ray.shard_size=16", "ray.max_blocks_in_flight=2",
             "solver.r_grid=[0.001, 0.1, 10.0]", "solver.rounds=2", "solver.points_per_round=2",
             "solver.max_steps=60", "solver.eval_every=10", "probe.c_grid=[0.1, 10.0]"]


def event_key(event: str, payload: dict) -> str | None:
    """The store key of what the event reports (None for events about no artifact)."""
    if event == "shard":
        return payload["result"].shard.key("phi")
    if event == "shard_loaded":
        return payload["shard"].key("phi")
    if event == "block":
        return payload["block"].key
    if event == "sweep_trial":
        return ",".join(f"r={run.r!r}" for run in payload["runs"])
    return None


def make_config(out_dir: str, store: str, storage_options: dict | None = None, address: str | None = None):
    from entk_ray.config import Config

    cfg = Config().with_overrides(OVERRIDES)
    cfg.store.out_dir = out_dir
    cfg.store.artifact_store = store
    cfg.storage_options = storage_options or {}
    cfg.ray.address = address
    cfg.use_ray = True
    return cfg


def benchmark(_cfg=None):
    """Stands in for ``pipeline.build_benchmark`` (the pipeline's own data step)."""
    from entk_ray.distributed.testing import tiny_benchmark

    return tiny_benchmark(**SIZES, seed=5)


def factory(cfg):
    from entk_ray.distributed.testing import TinyFeaturizerFactory

    return TinyFeaturizerFactory(cfg.features, seed=2)


def main(spec_path: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    from entk_ray import pipeline
    from entk_ray.distributed import RayBackend

    cfg = make_config(spec["out_dir"], spec["store"], spec.get("storage_options"), spec["address"])
    pipeline.build_benchmark = benchmark
    counts: dict[str, int] = {}
    kill = spec.get("kill")

    def hook(event, backend=None, **payload):
        counts[event] = counts.get(event, 0) + 1
        with open(spec["events"], "a") as fh:
            fh.write(json.dumps({"event": event, "key": event_key(event, payload)}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if kill and event == kill["event"] and counts[event] >= kill["count"]:
            os.kill(os.getpid(), signal.SIGKILL)

    backend = RayBackend(cfg, featurizer_factory=factory(cfg), on_event=hook)
    try:
        pipeline.run(cfg, backend=backend, progress=False, log=lambda _msg: None)
        stats = {k: v for k, v in backend.stats.items() if isinstance(v, (int, float, str, bool))}
        with open(os.path.join(spec["out_dir"], "stats.json"), "w") as fh:
            json.dump(stats, fh)
    finally:
        backend.close()


if __name__ == "__main__":
    main(sys.argv[1])
