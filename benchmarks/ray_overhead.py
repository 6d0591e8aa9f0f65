#!/usr/bin/env python
"""Ray's overhead on one machine: the quick-start's features + kernels + β sweep on local Ray
(RayBackend) divided by the same work in one process (LocalBackend).

    python benchmarks/ray_overhead.py            # the quick-start as configured (slow on 2 cores)
    python benchmarks/ray_overhead.py --quick    # a smaller digits run (a few minutes)
    python benchmarks/ray_overhead.py --quick --repeats 5 --set features.p=50000
    python benchmarks/ray_overhead.py --sweep-only   # the β sweep alone, on a random problem (seconds)

Both backends get the same config, data and number of cores; Ray is started once before the
timed runs (its start-up time is printed separately: a long-lived cluster pays it once), and the
artifact store is off so nothing is reused between repetitions. Repetitions alternate the order
of the two backends. Prints per-stage medians, checks that both produced the same K, and ends
with ``ratio: <median Ray time / median single-process time>`` (target ≤ 1.3 on 2 cores).

``--sweep-only`` times the telescopic β sweep alone at the quick-start's size (n = 1,000 train,
m = 500 + 500 evaluation rows, C = 10, its solver settings: 3 rounds, 1,000 steps; 19 r values,
as in the quick-start, whose best r is also the grid's smallest) on a seeded random kernel (no
features): the Ray Tune sweep (``tune_sweep``) against the one-process ``solve_sweep``, both
including the driver's eigh, after checking that both give the same runs. It also times Tune's
own floor on the same Ray: one Tune run of one no-op trial with the sweep's Tune settings (a fresh
trial actor, i.e. a new Python worker importing Ray Tune, plus the controller's start and end),
which no sweep through Tune can go below. Its last line is
``ratio: <median Tune sweep / median one-process sweep>`` (target ≤ 2).
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


def random_problem(n: int = 1000, m: int = 500, classes: int = 10, dim: int = 1024, seed: int = 0):
    """A seeded kernel problem of the quick-start's shape: K = XXᵀ for n points in ``classes``
    noisy clusters, ID and OOD evaluation sets of ``m`` points each (OOD noisier)."""
    from entk_ray.solvers import make_problem

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim))

    def points(count: int, noise: float):
        labels = rng.integers(0, classes, count)
        return centers[labels] + noise * rng.normal(size=(count, dim)), labels

    x, y = points(n, 3.0)
    xe, ye = points(m, 3.0)
    xo, yo = points(m, 4.5)
    x, xe, xo = (a / np.sqrt(dim) for a in (x, xe, xo))
    return make_problem(x @ x.T, y, {"id_val": xe @ x.T, "ood:random": xo @ x.T}, {"id_val": ye, "ood:random": yo},
                        classes)


def tune_floor(cfg: Config, name: str) -> float:
    """Seconds of one Tune run of a single no-op trial, with the sweep's Tune settings (quiet, JSON
    results only, no checkpoints, reused actors, the same storage): Tune's fixed cost per run."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from entk_ray.distributed.sweep import _quiet_tune, tune_storage

    class NoOp(tune.Trainable):
        def step(self):
            return {"done": True}

    storage_path, storage_filesystem = tune_storage(cfg)
    t0 = time.perf_counter()
    with _quiet_tune():
        grid = tune.Tuner(
            NoOp, param_space={},
            tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True, max_concurrent_trials=1),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      verbose=0, callbacks=[JsonLoggerCallback()],
                                      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
        ).fit()
    elapsed = time.perf_counter() - t0
    if grid.errors:
        raise SystemExit(f"the no-op Tune run failed: {grid.errors[0]}")
    return elapsed


def sweep_only(cfg: Config, repeats: int, rs_per_trial: int) -> int:
    """The β sweep alone: Tune (one Tuner) against one process, on a random quick-start-sized problem."""
    from entk_ray.distributed import init_ray, shutdown_ray
    from entk_ray.distributed.sweep import tune_sweep
    from entk_ray.solvers import SolverSettings, solve_sweep

    problem = random_problem(n=cfg.data.n_train, m=cfg.data.n_id_val, classes=10)
    settings = SolverSettings.from_config(cfg.solver)
    scratch = tempfile.mkdtemp(prefix="entk_ray_sweep_")
    cfg.store.out_dir = scratch
    start = time.perf_counter()
    started = init_ray(None, include_dashboard=False)
    import ray

    print(f"random problem n={problem.n}, eval {[k.shape[0] for k in problem.eval_kernels.values()]}, C=10; "
          f"solver {settings.method}, {settings.rounds} rounds, max_steps {settings.max_steps}; "
          f"{rs_per_trial} r per trial", flush=True)
    print(f"ray {ray.__version__} start-up: {time.perf_counter() - start:.1f}s (not in the ratio); "
          f"resources {ray.cluster_resources()}", flush=True)
    times: dict[str, list[float]] = {"local": [], "tune": [], "floor": []}
    try:
        for rep in range(repeats):
            order = ["local", "tune", "floor"] if rep % 2 == 0 else ["floor", "tune", "local"]
            runs = {}
            for name in order:
                if name == "floor":
                    times[name].append(tune_floor(cfg, f"floor-{rep}"))
                    continue
                t0 = time.perf_counter()
                if name == "local":
                    runs[name] = solve_sweep(problem, settings)
                else:
                    runs[name] = tune_sweep(cfg, problem, name=f"bench-{rep}", rs_per_trial=rs_per_trial)
                times[name].append(time.perf_counter() - t0)
            same = [(r.r, r.beta, r.round, r.final_step) for r in runs["tune"]] == \
                [(r.r, r.beta, r.round, r.final_step) for r in runs["local"]] and all(
                np.array_equal(a.accuracy[k], b.accuracy[k]) for a, b in zip(runs["tune"], runs["local"])
                for k in b.accuracy)
            print(f"rep {rep}: {len(runs['local'])} r values; local {times['local'][-1]:6.2f}s  "
                  f"tune {times['tune'][-1]:6.2f}s  Tune floor {times['floor'][-1]:6.2f}s  same runs: {same}",
                  flush=True)
            if not same:
                raise SystemExit("the Tune sweep and the one-process sweep differ")
    finally:
        shutdown_ray(started)
        shutil.rmtree(scratch, ignore_errors=True)
    local, tune, floor = (statistics.median(times[k]) for k in ("local", "tune", "floor"))
    print(f"medians over {repeats} repetitions: one process {local:.2f}s, Tune {tune:.2f}s; "
          f"Tune's floor (one no-op trial) {floor:.2f}s = {floor / local:.2f}x the one-process sweep; "
          f"the sweep beyond the floor {tune - floor:.2f}s = {(tune - floor) / local:.2f}x")
    print(f"ratio: {tune / local:.3f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smaller run: {QUICK}")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each backend")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--sweep-only", action="store_true",
                        help="time only the β sweep (Tune vs one process) on a random quick-start-sized problem")
    parser.add_argument("--rs-per-trial", type=int, default=1, help="--sweep-only: r values per Tune trial")
    args = parser.parse_args(argv)
    if args.sweep_only:
        return sweep_only(base_config(False, args.set), args.repeats, args.rs_per_trial)

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
