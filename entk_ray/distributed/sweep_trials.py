"""The Tune side of the β sweep: the trial (a ``Trainable``) and the telescopic ``Searcher``.

Imported only when a sweep runs (``ray.tune`` takes seconds to import). One Tuner runs the whole
telescopic search:

* :class:`TelescopicSearcher` proposes round 0's r values, waits for their results, proposes the
  zoomed round, and so on. The rules are those of :func:`entk_ray.solvers.telescopic_search`
  itself: the searcher runs that function (on a helper thread) with a ``run_round`` that hands
  each round to Tune and blocks until the round's trials are done, so the search here and the
  one-process :func:`~entk_ray.solvers.solve_sweep` cannot drift apart.
* :class:`SweepTrial` solves the r values of its config (``{"rs": [...], "round": k}``; one r
  by default) with a :class:`PathBatch` shipped once per sweep, and reports one result per r.
  Its actor is reused across trials and rounds (``reset_config``), so the spectrum is read
  from the object store once per actor, not once per trial.

A trial's results carry, per r: r, β, round, the last step, convergence and the best and final
accuracy of every evaluation set; its last result also carries ``paths``, the JSON of every
:class:`~entk_ray.solvers.SolverRun` it solved (every recorded step: floats exact), which is
what the searcher and the driver read.
"""
from __future__ import annotations

import json
import pickle
import queue
import signal
import threading
from dataclasses import dataclass
from typing import Any

import ray
from ray.tune import Trainable
from ray.tune.search import Searcher

from entk_ray.arrays import NUMPY, ArrayNamespace, cuda_available, namespace_for
from entk_ray.solvers import (
    KernelProblem,
    NagSolver,
    SolverRun,
    SolverSettings,
    SpectralSolver,
    Spectrum,
    batch_caller,
    extreme_eigenvalues,
    telescopic_search,
)

#: The trainable's name per solver method: Tune's trial names and the dashboard's actor class.
TRAINABLE_NAMES = {"spectral": "entk_sweep_spectral", "nag": "entk_sweep_nag"}


# --------------------------------------------------------------------------------------------
# What a trial solves
# --------------------------------------------------------------------------------------------
@dataclass
class PathBatch:
    """The β paths of a list of r values: what every trial needs, put in the object store once.

    ``spectral``: the :class:`~entk_ray.solvers.Spectrum` (K and U stay on the driver);
    ``nag``: the whole :class:`~entk_ray.solvers.KernelProblem` with λ_max/λ_min from the driver.
    Calling it solves the r values on ``settings.device`` as this process sees it
    (:func:`entk_ray.arrays.namespace_for`: a trial with a GPU runs torch there when
    ``device`` is ``cuda`` or ``auto``): on the CPU each r in turn (the results the one-process
    sweep gives), on a GPU all r of the call as one batch — for NAG one pass over K per step for
    all of them. The solver (the spectrum, or K and K_e, on its device) is built on the first
    call and kept, so a reused trial actor moves it to its GPU once.
    """

    settings: SolverSettings
    spectrum: Spectrum | None = None
    problem: KernelProblem | None = None
    extremes: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        self._run = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_run"] = None  # device arrays stay in the process that built them
        return state

    @classmethod
    def for_problem(cls, problem: KernelProblem, settings: SolverSettings) -> "PathBatch":
        """The one-off driver work (the eigh, or λ_max/λ_min) done here, once: on this process's
        GPU when ``settings.device`` asks for one and it has one; a ``cuda`` eigh without a GPU
        here runs as a Ray task that has one."""
        if settings.method == "spectral":
            if settings.device.startswith("cuda") and not cuda_available():
                spectrum = ray.get(_gpu_spectrum.options(num_gpus=1).remote(problem, settings.device, settings.dtype))
            else:
                spectrum, _ = Spectrum.of(problem, namespace_for(settings.device), settings.dtype, vectors=False)
            return cls(settings, spectrum=spectrum)  # U stays where the eigh ran
        if settings.method == "nag":
            here = namespace_for(settings.device) if settings.device != "cpu" and cuda_available() else NUMPY
            return cls(settings, problem=problem, extremes=extreme_eigenvalues(problem.kernel, namespace=here))
        raise ValueError(f"solver method must be 'spectral' or 'nag', got {settings.method!r}")

    def namespace(self) -> ArrayNamespace:
        """Where this process solves: ``settings.device`` as it sees it."""
        return namespace_for(self.settings.device)

    def __call__(self, rs: list[float]) -> list[SolverRun]:
        if self._run is None:
            xp = self.namespace()
            if self.spectrum is not None:
                solver = SpectralSolver(self.spectrum, namespace=xp)
            else:
                solver = NagSolver(self.problem, xp, *self.extremes)
            self._run = batch_caller(solver, self.settings, one_at_a_time=xp.is_numpy)
        return self._run(list(rs))


def _spectrum_task(problem: KernelProblem, device: str, dtype: str) -> Spectrum:
    """The eigh of K on the GPU Ray gave this task (when the driver has none)."""
    spectrum, _ = Spectrum.of(problem, namespace_for(device), dtype, vectors=False)
    return spectrum


_gpu_spectrum = ray.remote(max_retries=0)(_spectrum_task)


def run_summary(run: SolverRun) -> dict[str, Any]:
    """One r's Tune result: what the result table and the dashboard show (the path is in ``paths``)."""
    return {"r": run.r, "beta": run.beta, "final_step": int(run.final_step), "converged": bool(run.converged),
            "best_accuracy": {name: float(acc.max()) for name, acc in run.accuracy.items()},
            "final_accuracy": {name: float(acc[-1]) for name, acc in run.accuracy.items()}}


class SweepTrial(Trainable):
    """A sweep trial: the paths of the r values in its config, one result (one ``step``) per r.

    The paths are solved together on the first step (so a batched solver can share the work) and
    handed out one r per step; the last step also carries ``paths`` (JSON of every run) and ends
    the trial. ``reset_config`` takes the next trial's r values: actors are reused.
    """

    def setup(self, config: dict, solve: PathBatch) -> None:
        self._solve = solve
        self.reset_config(config)

    def reset_config(self, new_config: dict) -> bool:
        self._rs = [float(r) for r in new_config["rs"]]
        self._round = int(new_config.get("round", 0))
        self._runs: list[SolverRun] | None = None
        self._next = 0
        return True

    def step(self) -> dict:
        if self._runs is None:
            self._runs = self._solve(self._rs)
        run = self._runs[self._next]
        self._next += 1
        result = {"round": self._round, **run_summary(run), "done": self._next == len(self._runs)}
        if result["done"]:
            result["paths"] = json.dumps([r.to_dict() for r in self._runs])
        return result

    def cleanup(self) -> None:
        ignore_sigterm()


def ignore_sigterm() -> bool:
    """Ignore SIGTERM in this (trial actor) process, once Tune has stopped the trial for good.

    Why: Tune stops a trial actor and drops it; its worker then exits, and Ray's raylet sends the
    exiting worker's process group a SIGTERM. Ray's worker handler turns that into ``SystemExit``
    inside whatever Python finalizer is running, which Python prints as "Exception ignored in …
    sigterm_handler … SystemExit: 1" in successful runs. The process is on its way out (the
    raylet follows with SIGKILL), so there is nothing for the handler to do. Signal handlers can
    only be set from the main thread (where a default, single-threaded actor runs its tasks):
    returns whether it was set.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return True


def trainable_for(batch: PathBatch, trial_cpus: float, trial_gpus: float = 0.0):
    """The trial class for ``batch``'s method, named ``entk_sweep_<method>`` (Tune's trial names, the
    dashboard's actor class), asking for ``trial_cpus`` CPUs and ``trial_gpus`` GPUs (a fraction
    when several trials share one), with ``batch`` put in the object store once
    (``tune.with_parameters``)."""
    from ray import tune
    from ray.tune.execution.placement_groups import PlacementGroupFactory

    name = TRAINABLE_NAMES[batch.settings.method]

    def default_resource_request(cls, config):  # not tune.with_resources: it renames the class
        bundle = {"CPU": float(trial_cpus)}
        if trial_gpus > 0:
            bundle["GPU"] = float(trial_gpus)
        return PlacementGroupFactory([bundle])

    named = type(name, (SweepTrial,), {"__module__": __name__, "__qualname__": name,
                                       "default_resource_request": classmethod(default_resource_request)})
    trainable = tune.with_parameters(named, solve=batch)
    trainable.__qualname__ = name  # the dashboard's class name (with_parameters sets only __name__)
    return trainable


def trial_paths(result: dict) -> list[SolverRun]:
    """The runs in a trial's last result."""
    return [SolverRun.from_dict(doc) for doc in json.loads(result["paths"])]


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------
def r_label(rs: list[float]) -> str:
    """``r=1e-06`` for one r, ``r=1e-06..0.01`` for a batch (4 significant digits)."""
    return f"r={rs[0]:.4g}" if len(rs) == 1 else f"r={rs[0]:.4g}..{rs[-1]:.4g}"


def trial_name(trial) -> str:
    """``entk_sweep_spectral_r=1e-06``: Tune's display name of a trial."""
    return f"{trial.trainable_name}_{r_label(trial.config['rs'])}"


def trial_dirname(trial) -> str:
    """``round0_r=1e-06_<trial id>``: a trial's folder (unique: the id; readable: round and r)."""
    return f"round{trial.config.get('round', 0)}_{r_label(trial.config['rs'])}_{trial.trial_id}"


# --------------------------------------------------------------------------------------------
# The searcher
# --------------------------------------------------------------------------------------------
class _TrialFailed(RuntimeError):
    pass


class TelescopicSearcher(Searcher):
    """Proposes the telescopic search's rounds to one Tuner, one round at a time.

    :func:`~entk_ray.solvers.telescopic_search` runs on a helper thread; its ``run_round`` posts
    the round's r values (in trials of ``rs_per_trial``) and waits. When the round's last trial
    completes, the searcher hands the runs back and waits (briefly: the thread only computes the
    zoomed grid) for the next round or the end, so Tune is never left without a suggestion
    between rounds. Every completed r is kept in ``completed`` (saved and restored with Tune's
    experiment state: a restored search does not run those again). A failed trial ends the
    search; the driver reports the trial's error.

    Why a thread: the search's rules stay in the one function the single-process sweep runs,
    untouched, instead of a second copy written as a state machine. The thread is a daemon that
    only ever waits on a queue between rounds; it ends with the search or a failed trial.
    """

    def __init__(self, settings: SolverSettings, select_on: str, rs_per_trial: int = 1):
        super().__init__()
        if int(rs_per_trial) < 1:
            raise ValueError(f"rs_per_trial must be a positive integer, got {rs_per_trial!r}")
        self.settings = settings
        self.select_on = select_on
        self.rs_per_trial = int(rs_per_trial)
        self.completed: dict[float, dict] = {}  # r -> SolverRun.to_dict()
        self.proposed: list[list[float]] = []  # r values handed to Tune, per round
        self._reset_live()

    # ---------------------------------------------------------------- Searcher API
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the search space is the solver settings'; Tune's metric/mode are not used

    def suggest(self, trial_id: str):
        if self._thread is None and not self._finished:
            self._start()
        if self._todo:
            config = self._todo.pop(0)
            self._live[trial_id] = config["rs"]
            return config
        return Searcher.FINISHED if self._finished else None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        rs = self._live.pop(trial_id, None)
        if rs is None:
            return
        runs = None
        if not error and result and "paths" in result:
            runs = {run.r: run for run in trial_paths(result)}
        if runs is None or set(runs) != set(rs):
            self._abort(f"sweep trial {trial_id} (r = {rs}) " + ("failed" if error or not result
                                                                  else "returned other r values"))
            return
        for r in rs:
            self.completed[r] = runs[r].to_dict()
        if not self._live and not self._todo and not self._finished:
            self._to_search.put(None)  # the round is complete
            self._receive()

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"completed": self.completed}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.completed = dict(state["completed"])

    # ---------------------------------------------------------------- the search thread
    def _reset_live(self) -> None:
        self._thread: threading.Thread | None = None
        self._to_search: queue.Queue = queue.Queue()  # None (round done) or an exception
        self._to_tune: queue.Queue = queue.Queue()  # ("round", (index, rs)), ("done", None), ("failed", exc)
        self._todo: list[dict] = []  # trial configs of the current round not yet suggested
        self._live: dict[str, list[float]] = {}  # trial id -> its r values
        self._finished = False
        self.failure: BaseException | None = None

    def __getstate__(self) -> dict:
        # Tune pickles the searcher with the tuner before it runs: the thread and queues stay here.
        state = self.__dict__.copy()
        for key in ("_thread", "_to_search", "_to_tune", "_todo", "_live", "_finished", "failure"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_live()

    def _start(self) -> None:
        s = self.settings
        self._thread = threading.Thread(
            target=self._search, args=(s.r_grid, s.rounds, s.points_per_round), daemon=True,
            name="entk-telescopic-search")
        self._thread.start()
        self._receive()

    def _search(self, r_grid, rounds: int, points_per_round: int) -> None:
        try:
            telescopic_search(self._run_round, r_grid, rounds, points_per_round, self.select_on,
                              max_extensions=self.settings.max_extensions)
        except BaseException as exc:  # handed to the controller thread, never lost
            self._to_tune.put(("failed", exc))
        else:
            self._to_tune.put(("done", None))

    def _run_round(self, rs: list[float], round_index: int) -> list[SolverRun]:
        """``telescopic_search``'s ``run_round`` (search thread): post, wait, return the runs."""
        todo = [float(r) for r in rs if float(r) not in self.completed]
        if todo:
            self._to_tune.put(("round", (round_index, todo)))
            reply = self._to_search.get()
            if reply is not None:
                raise reply
        return [SolverRun.from_dict(self.completed[float(r)]) for r in rs]

    def _receive(self) -> None:
        """Wait (controller thread) for the search's next round, or its end."""
        kind, payload = self._to_tune.get()
        if kind == "round":
            round_index, rs = payload
            self.proposed.append(list(rs))
            k = self.rs_per_trial
            self._todo = [{"rs": rs[i:i + k], "round": round_index} for i in range(0, len(rs), k)]
            return
        self._finished = True
        self._thread = None
        if kind == "failed" and not isinstance(payload, _TrialFailed):
            self.failure = payload

    def _abort(self, reason: str) -> None:
        self._todo = []
        if not self._finished and self._thread is not None:
            self._to_search.put(_TrialFailed(reason))
            self._receive()
        self._finished = True
