"""The telescopic β search as Ray Tune runs: one Tuner (a grid over the round's r values) per round.

:func:`entk_ray.solvers.telescopic_search` drives the rounds; its ``run_round`` here launches one
Tune run whose trials each solve one r and report every recorded step with ``ray.tune.report``
(step, r, β, relative gradient norm, the accuracy of each evaluation set). The result grid is
turned back into :class:`~entk_ray.solvers.SolverRun` objects in the order of the round's r values,
so the search, its tie-breaking and the report are exactly those of the single-process
:func:`entk_ray.solvers.solve_sweep`.

What reaches a trial (through ``tune.with_parameters``, i.e. put in the object store once for the
whole sweep and read zero-copy by every trial):

* ``solver.method == "spectral"``: the driver does the one ``eigh`` and ships only the
  :class:`~entk_ray.solvers.Spectrum` — eigenvalues, c = UᵀY, K_e U per evaluation set, labels —
  O(n·(C + Σm_e)) numbers instead of K and U. Each trial runs :meth:`SpectralSolver.path` on it
  (O(steps·n) plus one GEMM for its evaluations), so its numbers are those of the local path.
* ``solver.method == "nag"``: the iterative solver needs K itself, so the whole
  :class:`KernelProblem` goes (once), with λ_max/λ_min computed once on the driver.

Tune's files go to ``<out_dir>/tune/<name>-round<k>`` (absolute path); no checkpoints are written.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path


from entk_ray.distributed import metrics
from entk_ray.solvers import (
    KernelProblem,
    SolverRun,
    SolverSettings,
    SpectralSolver,
    Spectrum,
    extreme_eigenvalues,
    nag_solve,
    telescopic_search,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------
def _report(run: SolverRun) -> None:
    """One ``tune.report`` per recorded step; the last also carries the whole path as JSON so the
    driver rebuilds the :class:`SolverRun` exactly (Tune's data frames round floats)."""
    from ray import tune

    last = len(run.steps) - 1
    for i, step in enumerate(run.steps):
        result = {"step": int(step), "r": run.r, "beta": run.beta, "grad_norm": float(run.grad_norm[i]),
                  "accuracy": {name: float(acc[i]) for name, acc in run.accuracy.items()},
                  "converged": bool(run.converged and i == last), "method": run.method}
        if i == last:
            result["path"] = json.dumps(run.to_dict())
        tune.report(result)


def spectral_trial(config: dict, spectrum: Spectrum, settings: SolverSettings) -> None:
    """Tune trial: the exact NAG path at one r from the precomputed spectrum."""
    s = settings
    _report(SpectralSolver(spectrum).path(config["r"], s.max_steps, s.eval_every, s.tol, s.momentum))


def nag_trial(config: dict, problem: KernelProblem, extremes: tuple[float, float], settings: SolverSettings) -> None:
    """Tune trial: iterative NAG at one r (needs K; λ_max/λ_min come from the driver)."""
    s = settings
    _report(nag_solve(problem, config["r"], s.max_steps, s.eval_every, s.tol, s.momentum,
                      lam_max=extremes[0], lam_min=extremes[1]))


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_tune():
    """Tune without its console tables: the legacy reporter at verbose=0 prints nothing (the new
    one still prints a box per run), and Tune's INFO lines and its "Tune detects GPUs, but no
    trials are using GPUs" warning (trials are CPU work by design) are silenced. Results, errors
    and the files under the storage path are unaffected."""
    old_env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    tune_logger = logging.getLogger("ray.tune.tune")
    old_level = tune_logger.level
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    tune_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tune_logger.setLevel(old_level)
        if old_env is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old_env


def tune_storage_path(out_dir: str) -> str:
    """Absolute Tune storage path under the run's output folder (URIs pass through)."""
    if "://" in str(out_dir):
        return f"{str(out_dir).rstrip('/')}/tune"
    return str((Path(out_dir) / "tune").resolve())


def tune_sweep(cfg, problem: KernelProblem, *, name: str = "sweep", trial_cpus: float = 1.0,
               on_round: Callable[[int, list[SolverRun]], None] | None = None,
               load_round: Callable[[list[float], int], list[SolverRun] | None] | None = None) -> list[SolverRun]:
    """The telescopic β search of ``cfg.solver`` with one Ray Tune run per round.

    ``load_round(rs, index)`` may return a round's runs from an earlier, interrupted run (then no
    Tune run starts for it); ``on_round(index, runs)`` is called after each round that ran."""
    from ray import tune

    s = settings = SolverSettings.from_config(cfg.solver)
    if s.method == "spectral":
        spectrum, _ = Spectrum.of(problem)  # the one eigh, on the driver; U stays here
        trainable = tune.with_parameters(spectral_trial, spectrum=spectrum, settings=settings)
    elif s.method == "nag":
        extremes = extreme_eigenvalues(problem.kernel)
        trainable = tune.with_parameters(nag_trial, problem=problem, extremes=extremes, settings=settings)
    else:
        raise ValueError(f"solver method must be 'spectral' or 'nag', got {s.method!r}")
    trainable = tune.with_resources(trainable, {"cpu": trial_cpus})
    storage = tune_storage_path(cfg.store.out_dir)

    def run_round(rs: list[float], round_index: int) -> list[SolverRun]:
        if not rs:
            return []
        stored = load_round(rs, round_index) if load_round is not None else None
        if stored is not None:
            return stored
        tuner = tune.Tuner(
            trainable,
            param_space={"r": tune.grid_search(list(rs))},
            tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=cfg.ray.tune_max_concurrent),
            run_config=tune.RunConfig(name=f"{name}-round{round_index}", storage_path=storage, verbose=0,
                                      log_to_file=True),
        )
        with _quiet_tune():
            grid = tuner.fit()
        if grid.errors:
            raise RuntimeError(f"{len(grid.errors)} sweep trial(s) of round {round_index} failed: {grid.errors[0]}")
        by_r: dict[float, SolverRun] = {}
        for result in grid:
            run = SolverRun.from_dict(json.loads(result.metrics["path"]))
            by_r[float(result.config["r"])] = run
        missing = [r for r in rs if float(r) not in by_r]
        if missing:
            raise RuntimeError(f"sweep round {round_index}: no result for r = {missing}")
        runs = [by_r[float(r)] for r in rs]
        for run in runs:  # recorded by the driver (trial actors may exit before exporting)
            metrics.record("solver_steps", run.final_step, method=run.method)
            metrics.record("solver_trials", 1, method=run.method)
        if on_round is not None:
            on_round(round_index, runs)
        return runs

    return telescopic_search(run_round, s.r_grid, s.rounds, s.points_per_round, problem.select_on)
