"""The telescopic β search as one Ray Tune run.

One ``Tuner`` runs the whole search: :class:`~entk_ray.distributed.sweep_trials.TelescopicSearcher`
proposes round 0's r values, waits for their results and proposes each zoomed round, following
:func:`entk_ray.solvers.telescopic_search` itself; trials
(:class:`~entk_ray.distributed.sweep_trials.SweepTrial`, named ``entk_sweep_<method>``) solve one
r each by default (``rs_per_trial`` for batches) on reused actors and report one result per r.
After the run the driver replays ``telescopic_search`` over the trials' results, so the returned
:class:`~entk_ray.solvers.SolverRun` list (order, rounds, tie-breaking) is exactly that of the
single-process :func:`entk_ray.solvers.solve_sweep`.

What reaches a trial (a :class:`~entk_ray.distributed.sweep_trials.PathBatch`, put in the object
store once for the whole sweep through ``tune.with_parameters`` and read once per trial actor):

* ``solver.method == "spectral"``: the driver does the one ``eigh`` and ships only the
  :class:`~entk_ray.solvers.Spectrum` — eigenvalues, c = UᵀY, K_e U per evaluation set, labels —
  O(n·(C + Σm_e)) numbers instead of K and U. Each trial runs :meth:`SpectralSolver.path` on it.
* ``solver.method == "nag"``: the iterative solver needs K itself, so the whole
  :class:`KernelProblem` goes (once), with λ_max/λ_min computed once on the driver.

Tune's files go to ``<tune storage>/<name>`` (:func:`tune_storage`: the artifact store's prefix
when it is remote, so every node of a cluster reaches it, else ``<out_dir>/tune``), one folder per
trial named by round and r (``round1_r=3.162e-05_<id>``) holding ``result.json`` (one line per r)
and the trial's ``params.json``/``params.pkl``; no checkpoints, CSV or TensorBoard files. A small
sweep runs on one reused trial actor (:func:`trial_slots`) that asks for the cores the node would
otherwise leave idle (:func:`cpus_per_trial`); ``ray.tune_max_concurrent`` overrides.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from entk_ray.distributed import metrics
from entk_ray.distributed.runtime import cluster_cpus, cluster_gpus, node_cpus
from entk_ray.solvers import KernelProblem, SolverRun, SolverSettings, telescopic_search
from entk_ray.storage import filesystem_for, is_remote, join_url

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Where Tune writes
# --------------------------------------------------------------------------------------------
def tune_storage(cfg):
    """``(storage_path, storage_filesystem)`` for Tune.

    Multi-node clusters need storage every node reaches: the artifact store's prefix when it is
    remote (``s3://bucket/prefix`` → ``bucket/prefix/tune``), else the run's output folder
    (``<out_dir>/tune``, absolute; remote too when ``out_dir`` is a URL). A remote path comes
    with a pyarrow filesystem over the same fsspec filesystem (and ``cfg.storage_options``) the
    store uses; a local path with ``None``.
    """
    artifact_store = cfg.store.artifact_store
    base = artifact_store if artifact_store and is_remote(artifact_store) else str(cfg.store.out_dir)
    if not is_remote(base):
        return str((Path(base) / "tune").resolve()), None
    return credential_free_filesystem(join_url(base, "tune"), cfg.storage_options)


def credential_free_filesystem(url: str, storage_options: dict | None):
    """``(path inside the filesystem, pyarrow filesystem)`` for Tune's or Ray Train's
    ``storage_filesystem`` at a remote ``url``: the run's fsspec filesystem (its
    ``storage_options``), whose pickle holds no credentials (:func:`_tune_filesystem_handler`)."""
    from pyarrow.fs import PyFileSystem

    options = dict(storage_options or {})
    fs, inner = filesystem_for(url, options)
    return inner, PyFileSystem(_tune_filesystem_handler(fs, url, options))


def _tune_filesystem_handler(fs, url: str, options: dict, options_ref=None):
    """pyarrow's handler over ``fs`` whose pickle holds no credentials.

    Why: Tune (and Ray Train) pickle their storage filesystem twice — to ship it to the trial actors, which need
    the credentials, and into ``tuner.pkl`` and the searcher state, which it writes next to the
    results — and an fsspec filesystem pickles its options, S3 key and secret included. This
    handler pickles as the URL and a reference to the options in Ray's object store (just an id;
    put there on the first pickle, which happens inside the Tune run): a trial actor gets them
    from there, and no file ever holds them."""
    from pyarrow.fs import FSSpecHandler

    class CredentialFreeHandler(FSSpecHandler):
        def __reduce__(self):
            import ray

            nonlocal options_ref
            if options_ref is None:
                if not ray.is_initialized():  # ray.put would start (or join) a Ray of its own
                    raise TypeError("the Tune storage filesystem holds credentials: it pickles only inside Ray")
                options_ref = ray.put(options)
            return _handler_from_object_store, (url, options_ref)

    return CredentialFreeHandler(fs)


def _handler_from_object_store(url: str, options_ref):
    import ray

    options = ray.get(options_ref, timeout=60)
    return _tune_filesystem_handler(filesystem_for(url, options)[0], url, options, options_ref)


@contextlib.contextmanager
def _quiet_tune():
    """Tune without its console tables and without files nobody asked for.

    The legacy reporter at verbose=0 prints nothing (the new one still prints a box per run);
    Tune's INFO lines and its "Tune detects GPUs, but no trials are using GPUs" warning (trials are
    CPU work by design) are silenced; the automatic CSV and TensorBoard loggers are not created
    (the JSON logger, which Tune's result grid reads, is passed explicitly). Results, errors and
    the files under the storage path are otherwise unaffected."""
    env = {"RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    old_env = {key: os.environ.get(key) for key in env}
    tune_logger = logging.getLogger("ray.tune.tune")
    old_level = tune_logger.level
    os.environ.update(env)
    tune_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tune_logger.setLevel(old_level)
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------------
# How many trials at once
# --------------------------------------------------------------------------------------------
#: Work (floating-point operations) that pays for starting one more trial actor: a new actor costs
#: about 1.5 s of one core (a worker process importing Ray Tune), ~3·10¹⁰ flops of NumPy/BLAS.
ACTOR_START_FLOPS = 3e10


def path_flops(problem: KernelProblem, settings: SolverSettings) -> float:
    """Rough cost of one r's path: the recurrence (spectral: O(n) per step; nag: a K product per
    step) plus scoring every recorded step on every evaluation set."""
    n, classes = problem.n, problem.targets.shape[1]
    recorded = math.ceil(settings.max_steps / settings.eval_every)
    scoring = 2.0 * sum(k.shape[0] for k in problem.eval_kernels.values()) * n * classes * recorded
    per_step = 12.0 * n if settings.method == "spectral" else 2.0 * n * n * classes
    return settings.max_steps * per_step + scoring


def trial_slots(problem: KernelProblem, settings: SolverSettings, cpu_slots: int, rs_per_trial: int = 1) -> int:
    """Trials to run at once: enough actors for a round's work, at most one per CPU slot and per
    trial of the largest round, and at least one. A small sweep (the quick-start's) runs on one
    reused actor: a second one would cost more to start than the work it takes over."""
    largest_round = settings.largest_round
    trials = math.ceil(largest_round / rs_per_trial)
    worth = math.ceil(largest_round * path_flops(problem, settings) / ACTOR_START_FLOPS)
    return max(1, min(cpu_slots, trials, worth))


def cpus_per_trial(nodes: list[float], trials: int, minimum: float = 1.0) -> float:
    """CPUs each of ``trials`` CPU trials asks for: the most (whole CPUs) that still lets all of
    them run at once on nodes with ``nodes`` CPUs, never below ``minimum``.

    Why: a trial's solver is BLAS work whose threads follow its CPU request (Ray sets
    ``OMP_NUM_THREADS`` to it), and a small sweep runs on fewer trials than CPUs — the quick-start
    on one trial — which at one CPU each would leave the other cores idle."""
    for cpus in range(int(max(nodes, default=0.0)), 0, -1):
        if cpus <= minimum:
            break
        if sum(int(n // cpus) for n in nodes) >= trials:
            return float(cpus)
    return float(minimum)


# --------------------------------------------------------------------------------------------
# Trials on GPUs
# --------------------------------------------------------------------------------------------
#: Most sweep trials sharing one GPU (spectral trials are small: the spectrum and a round's scores).
MAX_TRIALS_PER_GPU = 4
#: Fraction of a GPU's memory a trial layout plans to use (the rest: CUDA context, fragmentation).
USABLE_GPU_FRACTION = 0.9


@dataclass(frozen=True)
class SweepLayout:
    """How the sweep's trials use the cluster: r values per trial, GPUs per trial (0: CPU trials;
    a fraction when several trials share a GPU), trials at once."""

    rs_per_trial: int
    gpus_per_trial: float
    concurrent: int

    def describe(self) -> str:
        where = f"{self.gpus_per_trial:g} GPU each" if self.gpus_per_trial else "on CPUs"
        return f"{self.rs_per_trial} r per trial, {self.concurrent} trial(s) at once, {where}"


def spectral_trial_bytes(problem: KernelProblem, settings: SolverSettings, rs: int) -> float:
    """GPU memory of a spectral trial solving ``rs`` r values: the spectrum (Λ, ‖c_i‖², c, K_e U),
    the recorded coefficients of its r values and one r's scores (weights n × T·C and
    K_e U · weights), plus a CUDA context."""
    n, classes = problem.n, problem.targets.shape[1]
    m = sum(k.shape[0] for k in problem.eval_kernels.values())
    recorded = math.ceil(settings.max_steps / settings.eval_every) + 1
    spectrum = 8.0 * (n * (2 + classes) + m * n)
    work = 8.0 * (rs * recorded * n + recorded * classes * (n + m))
    return spectrum + work + 1e9


def sweep_layout(problem: KernelProblem, settings: SolverSettings, *, cpu_slots: int, gpus: float,
                 gpu_memory: float = 0.0, rs_per_trial: int | None = None) -> SweepLayout:
    """Trials for ``settings.device``: on CPUs (``cpu``, or ``auto`` on a cluster without GPUs) one r
    per trial by default and :func:`trial_slots` at once; on GPUs (``cuda``, or ``auto`` with GPUs)
    a round's r values are split over the GPUs and each trial solves its share as one batch —

    * NAG: one trial per GPU (a whole GPU: each trial holds its own K), ⌈P / GPUs⌉ r each, so K is
      read once per step for every r of the trial;
    * spectral: as many trials per GPU as fit ``gpu_memory`` (at most :data:`MAX_TRIALS_PER_GPU`,
      a fraction of a GPU each), ⌈P / trials⌉ r each;

    P being the largest round's size. ``rs_per_trial`` overrides the batch size."""
    device = settings.device
    if device.startswith("cuda") and gpus <= 0:
        raise ValueError(f"solver.device={device!r} but the Ray cluster has no GPU for the sweep's trials "
                         "(use solver.device=auto or cpu)")
    if device == "cpu" or (device == "auto" and gpus <= 0):
        k = int(rs_per_trial or 1)
        return SweepLayout(k, 0.0, trial_slots(problem, settings, cpu_slots, k))
    largest = settings.largest_round
    per_gpu = 1
    if settings.method == "spectral" and gpu_memory > 0:
        share = math.ceil(largest / max(gpus, 1.0))
        fit = int(USABLE_GPU_FRACTION * gpu_memory // spectral_trial_bytes(problem, settings, share))
        per_gpu = max(1, min(MAX_TRIALS_PER_GPU, fit, share))
    slots = max(1, int(gpus * per_gpu))
    if cpu_slots > 0:
        slots = min(slots, cpu_slots)
    k = int(rs_per_trial or math.ceil(largest / min(slots, largest)))
    return SweepLayout(k, 1.0 / per_gpu, max(1, min(slots, math.ceil(largest / k))))


def cluster_gpu_memory() -> float:
    """Memory of the cluster's GPUs: this process's GPU when it sees one, else the GPU type Ray
    reports (``accelerator_type``) from the planner's table; 0 when unknown."""
    from entk_ray.arrays import ArrayNamespace, cuda_available

    if cuda_available():
        return ArrayNamespace("torch", "cuda").memory_bytes()
    try:
        import ray

        from entk_ray.plan import resources_from_ray_nodes

        return float(resources_from_ray_nodes(ray.nodes(), disk_bytes=0.0).gpu_memory)
    except Exception:  # noqa: BLE001 - unknown memory: one trial per GPU
        return 0.0


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def tune_sweep(cfg, problem: KernelProblem, *, name: str = "sweep", trial_cpus: float = 1.0,
               rs_per_trial: int | None = None,
               on_round: Callable[[int, list[SolverRun]], None] | None = None,
               completed: Mapping[float, SolverRun] | None = None,
               on_result: Callable[[list[SolverRun]], None] | None = None) -> list[SolverRun]:
    """The telescopic β search of ``cfg.solver`` as one Ray Tune run (see the module docstring).

    ``rs_per_trial`` r values are solved per trial (default: one per trial on CPUs, one trial, and
    one folder, per β; on GPUs a round's share per trial, see :func:`sweep_layout`); every r still
    gets its own Tune result. A CPU trial asks for at least ``trial_cpus`` CPUs, more when fewer
    trials run at once than the cluster has cores (:func:`cpus_per_trial`). ``on_round(index, runs)`` is called on the driver for each
    round, in order, once the search is done. Returns the runs of :func:`solve_sweep`, equal.

    Resuming: ``completed`` holds runs an interrupted sweep already solved (r → run); the search
    takes them as done and no trial solves them again. ``on_result(runs)`` is called on the
    driver as each trial completes, so a caller can store every run as soon as it exists."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from entk_ray.distributed.sweep_trials import (
        PathBatch,
        TelescopicSearcher,
        trainable_for,
        trial_dirname,
        trial_name,
        trial_paths,
    )

    settings = SolverSettings.from_config(cfg.solver)
    layout = sweep_layout(problem, settings, cpu_slots=int(cluster_cpus() // trial_cpus), gpus=cluster_gpus(),
                          gpu_memory=cluster_gpu_memory() if settings.device != "cpu" else 0.0,
                          rs_per_trial=rs_per_trial)
    batch = PathBatch.for_problem(problem, settings)  # validates the method before any Tune work
    searcher = TelescopicSearcher(settings, problem.select_on, layout.rs_per_trial)
    done = {float(r): run for r, run in (completed or {}).items()}
    searcher.completed.update({r: run.to_dict() for r, run in done.items()})
    receiver_id = uuid.uuid4().hex
    callbacks = [JsonLoggerCallback()]
    if on_result is not None:
        _RESULT_RECEIVERS[receiver_id] = on_result
        callbacks.append(_trial_runs_callback(receiver_id))
    storage_path, storage_filesystem = tune_storage(cfg)
    concurrent = layout.concurrent if cfg.ray.tune_max_concurrent is None else cfg.ray.tune_max_concurrent
    if layout.gpus_per_trial == 0:  # CPU trials: the cores the concurrent trials leave idle go to their BLAS
        trial_cpus = cpus_per_trial(node_cpus(), concurrent, trial_cpus)
    tuner = tune.Tuner(
        trainable_for(batch, trial_cpus, layout.gpus_per_trial),
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=-1, reuse_actors=True, max_concurrent_trials=concurrent,
            trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_filesystem, verbose=0,
            log_to_file=True, callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),  # a path is one result
    )
    try:
        with _quiet_tune():
            grid = tuner.fit()
    finally:
        _RESULT_RECEIVERS.pop(receiver_id, None)
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} sweep trial(s) failed; the first: {grid.errors[0]}")
    if searcher.failure is not None:  # the search itself raised (this process ran the searcher)
        raise searcher.failure

    by_r: dict[float, SolverRun] = dict(done)
    for result in grid:
        if "paths" in (result.metrics or {}):
            for run in trial_paths(result.metrics):
                by_r[run.r] = run

    def replay_round(rs: list[float], round_index: int) -> list[SolverRun]:
        missing = [r for r in rs if float(r) not in by_r]
        if missing:
            raise RuntimeError(f"sweep round {round_index}: Tune returned no result for r = {missing}")
        runs = [by_r[float(r)] for r in rs]
        for run in runs:
            metrics.record("solver_steps", run.final_step, method=run.method)
            metrics.record("solver_trials", 1, method=run.method)
        return runs

    # The same search over the trials' results: the driver's list is solve_sweep's, by construction.
    runs = telescopic_search(replay_round, settings.r_grid, settings.rounds, settings.points_per_round,
                             problem.select_on, max_extensions=settings.max_extensions,
                             progress=False)  # the searcher's thread already showed it
    if on_round is not None:
        for round_index in sorted({run.round for run in runs}):
            on_round(round_index, [run for run in runs if run.round == round_index])
    log.info("sweep %s: %d r values in %d Tune trials (%s), %d at a time, %g CPU each", name, len(runs),
             len(grid), layout.describe(), concurrent, trial_cpus)
    return runs


#: Driver-side receivers of trial results, by id: a Tune callback names its receiver instead of
#: holding it, because Tune pickles its callbacks into ``tuner.pkl`` (and the receiver holds the
#: artifact store, whose options may hold credentials).
_RESULT_RECEIVERS: dict[str, Callable[[list[SolverRun]], None]] = {}


def _trial_runs_callback(receiver_id: str):
    """A Tune callback handing each completed trial's runs to ``_RESULT_RECEIVERS[receiver_id]``."""
    from ray.tune import Callback

    class TrialRuns(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            from entk_ray.distributed import sweep  # by reference: a pickled copy holds only the id
            from entk_ray.distributed.sweep_trials import trial_paths

            receiver = sweep._RESULT_RECEIVERS.get(receiver_id)
            result = trial.last_result or {}
            if receiver is not None and "paths" in result:
                receiver(trial_paths(result))

    return TrialRuns()
