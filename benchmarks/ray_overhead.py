#!/usr/bin/env python
"""Ray's overhead on one machine: the quick-start's features + kernels + β sweep on local Ray
(RayBackend) divided by the same work in one process (LocalBackend).

    python benchmarks/ray_overhead.py            # the quick-start as configured (slow on 2 cores)
    python benchmarks/ray_overhead.py --quick    # a smaller digits run (a few minutes)
    python benchmarks/ray_overhead.py --quick --repeats 5 --set features.p=50000

Both backends get the same config, data and number of cores; Ray is started once before the
timed runs (its start-up time is printed separately: a long-lived cluster pays it once), and the
artifact store is off so nothing is reused between repetitions. Repetitions alternate the order
of the two backends. Prints per-stage medians, checks that both produced the same K, and ends
with ``ratio: <median Ray time / median single-process time>`` (target ≤ 1.3 on 2 cores).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from entk_ray.config import Config

QUICK = {"data.n_train": 300, "data.n_id_val": 150, "data.n_ood": 150, "features.p": 100_000,
         "ray.shard_size": 64}


def base_config(quick: bool, overrides: list[str]) -> Config:
    try:  # the quick-start's embedded default, when the CLI module provides it
        from entk_ray.cli import demo_config

        cfg = demo_config()
    except ImportError:
        cfg = Config()
    items = [f"{k}={v}" for k, v in QUICK.items()] if quick else []
    cfg = cfg.with_overrides(items + overrides)
    return cfg.validate()


def one_run(backend, cfg: Config, benchmark) -> tuple[dict, np.ndarray]:
    """features + kernels + sweep with ``backend``; returns stage timings and K."""
    from entk_ray.solvers import make_problem

    t0 = time.perf_counter()
    ks = backend.kernels(cfg, benchmark, progress=False)
    t1 = time.perf_counter()
    s = cfg.solver
    problem = make_problem(ks.train, benchmark.train.labels, ks.evals,
                           {n: d.labels for n, d in benchmark.eval_sets().items()}, benchmark.num_classes,
                           targets=s.targets, selection=s.selection, holdout_fraction=s.holdout_fraction, seed=s.seed)
    runs = backend.sweep(cfg, problem)
    t2 = time.perf_counter()
    assert runs, "the sweep returned no runs"
    return {"features+kernels": t1 - t0, "sweep": t2 - t1, "total": t2 - t0}, ks.train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smaller run: {QUICK}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each backend")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override (repeatable)")
    args = parser.parse_args(argv)

    from entk_ray.distributed import RayBackend
    from entk_ray.backends import LocalBackend
    from entk_ray.pipeline import build_benchmark

    cfg = base_config(args.quick, args.set)
    scratch = tempfile.mkdtemp(prefix="entk_ray_overhead_")
    cfg.store.out_dir = scratch  # Tune's files for every repetition; removed at the end
    benchmark = build_benchmark(cfg)
    sizes = {"train": len(benchmark.train), **{k: len(v) for k, v in benchmark.eval_sets().items()}}
    print(f"benchmark {benchmark.name} {sizes}, model {cfg.model.name} {cfg.data.image_size}px, "
          f"p={cfg.features.p}, shard_size={cfg.ray.shard_size}, solver={cfg.solver.method}, "
          f"rounds={cfg.solver.rounds}", flush=True)

    ray_backend = RayBackend(cfg, store=None, include_dashboard=False)
    import ray

    print(f"ray {ray.__version__} start-up: {ray_backend.init_s:.1f}s (not in the ratio); "
          f"resources {ray.cluster_resources()}", flush=True)
    local_backend = LocalBackend()
    times: dict[str, list[dict]] = {"local": [], "ray": []}
    try:
        for rep in range(args.repeats):
            order = [("local", local_backend), ("ray", ray_backend)]
            if rep % 2:
                order.reverse()
            kernels = {}
            for name, backend in order:
                timing, kernels[name] = one_run(backend, cfg, benchmark)
                times[name].append(timing)
                print(f"rep {rep} {name:5s} " + "  ".join(f"{k} {v:7.1f}s" for k, v in timing.items()), flush=True)
            err = float(np.linalg.norm(kernels["ray"] - kernels["local"]) / np.linalg.norm(kernels["local"]))
            print(f"rep {rep} K relative difference ray vs local: {err:.2e}", flush=True)
            if err > 1e-6:
                raise SystemExit(f"Ray and single-process K differ: relative error {err:.2e}")
    finally:
        ray_backend.close()
        shutil.rmtree(scratch, ignore_errors=True)

    print("medians over", args.repeats, "repetitions:")
    for stage in ("features+kernels", "sweep", "total"):
        local = statistics.median(t[stage] for t in times["local"])
        on_ray = statistics.median(t[stage] for t in times["ray"])
        print(f"  {stage:17s} local {local:7.1f}s  ray {on_ray:7.1f}s  ray/local {on_ray / local:5.2f}")
    ratio = statistics.median(t["total"] for t in times["ray"]) / statistics.median(t["total"] for t in times["local"])
    print(f"ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
