"""The β sweep on Ray Tune: one Tuner, the telescopic searcher, batched trials, names, files, storage,
and the runtime_env a driver ships when it joins a cluster.

The searcher is exercised first without Ray (a miniature of Tune's suggest / complete loop), then
whole sweeps run through Tune on the session's local Ray (tests/conftest.py) and are compared with
the one-process :func:`entk_ray.solvers.solve_sweep`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from references import assert_accuracies_close, random_problem
from ray.tune.search import Searcher

from entk_ray.config import Config
from entk_ray.distributed import runtime
from entk_ray.distributed.sweep import cpus_per_trial, trial_slots, tune_storage, tune_sweep
from entk_ray.distributed.sweep_trials import (
    PathBatch,
    TelescopicSearcher,
    r_label,
    trial_dirname,
    trial_name,
)
from entk_ray.solvers import (
    SolverSettings,
    solve_sweep,
    telescopic_search,
)

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = SolverSettings(max_steps=60, eval_every=10, r_grid=(1e-4, 1e-3, 1e-2, 0.1, 1.0), rounds=3,
                          points_per_round=5)


def one_process_rounds(problem, settings):
    """The r values each round of the one-process search runs (the searcher must propose these)."""
    solve = PathBatch.for_problem(problem, settings)
    rounds = []

    def run_round(rs, round_index):
        if rs:
            rounds.append([float(r) for r in rs])
        return solve(rs)

    runs = telescopic_search(run_round, settings.r_grid, settings.rounds, settings.points_per_round,
                             problem.select_on)
    return rounds, runs


def drive(searcher: TelescopicSearcher, solve, *, fail_first: bool = False, stop_after_rounds: int | None = None):
    """Tune's loop in miniature: ask for trials until told FINISHED; when none is offered, complete
    the oldest running trial with the paths ``solve`` gives. Returns the trial configs in order."""
    configs, running = [], []
    while True:
        if stop_after_rounds is not None and len(searcher.proposed) > stop_after_rounds:
            return configs
        config = searcher.suggest(f"trial{len(configs)}")
        if config == Searcher.FINISHED:
            return configs
        if config is not None:
            configs.append(config)
            running.append((f"trial{len(configs) - 1}", config))
            continue
        assert running, "the searcher offered nothing while no trial was running (Tune would stall)"
        trial_id, config = running.pop(0)
        if fail_first:
            searcher.on_trial_complete(trial_id, None, error=True)
            fail_first = False
        else:
            paths = json.dumps([run.to_dict() for run in solve(config["rs"])])
            searcher.on_trial_complete(trial_id, {"paths": paths})


# --------------------------------------------------------------------------------------------
# The searcher, without Ray
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rs_per_trial", [1, 2, 5])
def test_searcher_proposes_the_rounds_of_the_one_process_search(rs_per_trial):
    problem = random_problem()
    expected_rounds, expected_runs = one_process_rounds(problem, SETTINGS)
    # round 0's best r sits on the grid's upper edge, so the search extends past it before zooming
    assert len(expected_rounds[0]) == 5 and expected_rounds[1] == pytest.approx([10.0, 100.0, 1000.0])
    assert len(expected_rounds) == 4

    searcher = TelescopicSearcher(SETTINGS, problem.select_on, rs_per_trial=rs_per_trial)
    configs = drive(searcher, PathBatch.for_problem(problem, SETTINGS))
    assert searcher.proposed == expected_rounds
    # Each round is cut into trials of rs_per_trial r values (the last one may be shorter).
    for index, rs in enumerate(expected_rounds):
        chunks = [c["rs"] for c in configs if c["round"] == index]
        assert chunks == [rs[i:i + rs_per_trial] for i in range(0, len(rs), rs_per_trial)]
    assert searcher.suggest("late") == Searcher.FINISHED and searcher.failure is None
    assert sorted(searcher.completed) == sorted(run.r for run in expected_runs)
    for run in expected_runs:
        doc = searcher.completed[run.r]
        assert doc["beta"] == run.beta and doc["steps"] == run.steps.tolist()
        assert doc["accuracy"] == {k: v.tolist() for k, v in run.accuracy.items()}


def test_searcher_honours_the_extension_limit():
    """solver.max_extensions reaches the searcher: with 0 the edge-best grid is not extended."""
    import dataclasses

    problem = random_problem()
    settings = dataclasses.replace(SETTINGS, max_extensions=0)
    searcher = TelescopicSearcher(settings, problem.select_on, rs_per_trial=5)
    drive(searcher, PathBatch.for_problem(problem, settings))
    assert max(max(rs) for rs in searcher.proposed) <= max(SETTINGS.r_grid)
    assert len(searcher.proposed) == SETTINGS.rounds


def test_restored_searcher_does_not_run_finished_r_again(tmp_path):
    problem = random_problem(seed=1)
    solve = PathBatch.for_problem(problem, SETTINGS)
    expected_rounds, expected_runs = one_process_rounds(problem, SETTINGS)

    first = TelescopicSearcher(SETTINGS, problem.select_on)
    drive(first, solve, stop_after_rounds=1)  # round 0 done, round 1 proposed
    assert set(first.completed) == set(expected_rounds[0])
    first.save(str(tmp_path / "searcher.pkl"))

    restored = TelescopicSearcher(SETTINGS, problem.select_on)
    restored.restore(str(tmp_path / "searcher.pkl"))
    drive(restored, solve)
    assert restored.proposed == expected_rounds[1:]  # round 0 is not proposed again
    assert sorted(restored.completed) == sorted(run.r for run in expected_runs)


def test_a_failed_trial_ends_the_search_and_a_search_error_is_kept():
    problem = random_problem()
    solve = PathBatch.for_problem(problem, SETTINGS)
    searcher = TelescopicSearcher(SETTINGS, problem.select_on)
    configs = drive(searcher, solve, fail_first=True)
    assert len(searcher.proposed) == 1 and len(configs) == 5  # round 0 was handed out, nothing after
    assert searcher.suggest("next") == Searcher.FINISHED
    assert searcher.failure is None  # a trial's error is Tune's to report (the driver raises it)

    broken = TelescopicSearcher(SETTINGS, "no-such-set")  # telescopic_search raises after round 0
    drive(broken, solve)
    assert isinstance(broken.failure, KeyError) and "no-such-set" in str(broken.failure)


def test_searcher_pickles_before_it_runs():
    import pickle

    searcher = TelescopicSearcher(SETTINGS, "id_val", rs_per_trial=3)
    copy = pickle.loads(pickle.dumps(searcher))  # Tune writes tuner.pkl with the searcher in it
    assert copy.rs_per_trial == 3 and copy.settings == SETTINGS and copy.proposed == []
    with pytest.raises(ValueError, match="rs_per_trial"):
        TelescopicSearcher(SETTINGS, "id_val", rs_per_trial=0)


# --------------------------------------------------------------------------------------------
# Names, concurrency, storage, runtime_env, SIGTERM (no Ray)
# --------------------------------------------------------------------------------------------
def test_trial_names_and_folders_carry_r():
    class Trial:
        trainable_name, trial_id = "entk_sweep_spectral", "ab12cd34"

    one, batch = Trial(), Trial()
    one.config = {"rs": [1e-06], "round": 0}
    batch.config = {"rs": [3.1622776601683795e-05, 1e-4, 0.01], "round": 2}
    assert trial_name(one) == "entk_sweep_spectral_r=1e-06"
    assert trial_dirname(one) == "round0_r=1e-06_ab12cd34"
    assert trial_dirname(batch) == "round2_r=3.162e-05..0.01_ab12cd34"
    assert r_label([100.0]) == "r=100" and r_label([0.31622776601683794]) == "r=0.3162"


def test_trial_slots_one_actor_for_a_small_sweep_more_for_a_large_one():
    from types import SimpleNamespace

    quick_start = SolverSettings()  # 9 r values a round, 1,000 steps
    small = SimpleNamespace(n=1000, targets=np.zeros((1000, 10)), eval_kernels={"a": np.zeros((500, 1)),
                                                                                "b": np.zeros((500, 1))})
    assert trial_slots(small, quick_start, cpu_slots=16) == 1
    living17 = SimpleNamespace(n=44_200, targets=np.zeros((1, 17)),
                               eval_kernels={"a": np.zeros((1700, 1)), "b": np.zeros((1700, 1))})
    assert trial_slots(living17, quick_start, cpu_slots=16) == 9  # one per r of a round
    assert trial_slots(living17, quick_start, cpu_slots=4) == 4  # one per CPU slot
    assert trial_slots(living17, quick_start, cpu_slots=16, rs_per_trial=4) == 3  # trials of a round
    assert trial_slots(living17, quick_start, cpu_slots=0) == 1


def test_cpu_trials_take_the_cores_the_other_trials_leave_idle():
    assert cpus_per_trial([2.0], trials=1) == 2.0  # the quick-start: one trial, both cores
    assert cpus_per_trial([16.0], trials=3) == 5.0
    assert cpus_per_trial([16.0, 16.0], trials=3) == 8.0  # all three still run at once (2 + 2 fit)
    assert cpus_per_trial([16.0, 4.0], trials=2) == 8.0  # both on the big node beats 4 each
    assert cpus_per_trial([16.0], trials=16) == 1.0
    assert cpus_per_trial([2.0], trials=5) == 1.0  # more trials than cores: the minimum
    assert cpus_per_trial([16.0], trials=16, minimum=2.0) == 2.0
    assert cpus_per_trial([], trials=1) == 1.0


def test_tune_storage_is_the_run_folder_or_the_remote_artifact_store(tmp_path):
    cfg = Config()
    cfg.store.out_dir = str(tmp_path / "out")
    assert tune_storage(cfg) == (str((tmp_path / "out" / "tune").resolve()), None)
    cfg.store.artifact_store = str(tmp_path / "artifacts")  # a local store: Tune stays in out_dir
    assert tune_storage(cfg)[0] == str((tmp_path / "out" / "tune").resolve())

    cfg.store.artifact_store = "s3://bucket/prefix/"
    cfg.storage_options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}}
    import ray

    was_initialized = ray.is_initialized()
    path, fs = tune_storage(cfg)
    assert ray.is_initialized() == was_initialized  # no Ray started (or joined) to hold the options
    from pyarrow.fs import PyFileSystem

    assert path == "bucket/prefix/tune" and isinstance(fs, PyFileSystem)
    s3 = fs.handler.fs  # the fsspec filesystem, with the run's storage options
    assert s3.protocol[0] == "s3" and s3.key == "k" and s3.client_kwargs["endpoint_url"] == "http://127.0.0.1:1"


def test_cluster_runtime_env_ships_the_code_unless_local_or_already_shipped(tmp_path):
    env = runtime.cluster_runtime_env("auto", environ={})  # this source checkout: its working_dir
    assert Path(env["working_dir"]) == ROOT and (ROOT / "entk_ray" / "distributed" / "sweep_trials.py").is_file()
    assert {"/.git", "/.venv/", "/results/"} <= set(env["excludes"])
    assert runtime.cluster_runtime_env("ray://head:10001", environ={}) == env
    assert runtime.cluster_runtime_env(None, environ={}) is None
    assert runtime.cluster_runtime_env("local", environ={}) is None
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}})}
    assert runtime.cluster_runtime_env("auto", environ=job) is None  # ray job submit --working-dir .
    bare_job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {"A": "1"}}})}
    assert runtime.cluster_runtime_env("auto", environ=bare_job) == env
    installed = tmp_path / "site-packages" / "entk_ray"  # no pyproject.toml beside it
    installed.mkdir(parents=True)
    assert runtime.cluster_runtime_env("auto", environ={}, package=installed)["py_modules"] == [str(installed)]


def test_a_stopped_trial_process_survives_sigterm():
    """The trial's cleanup ignores SIGTERM (see sweep_trials.ignore_sigterm): a process that set it
    keeps running after a SIGTERM instead of raising SystemExit."""
    code = ("import os, signal, time\n"
            "from entk_ray.distributed.sweep_trials import SweepTrial\n"
            "signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(SystemExit(1)))  # like Ray's\n"
            "SweepTrial.cleanup(None)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.2)\n"
            "print('still here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "still here", done.stderr


# --------------------------------------------------------------------------------------------
# Whole sweeps through Tune (local Ray)
# --------------------------------------------------------------------------------------------
def sweep_config(tmp_path) -> Config:
    cfg = Config()
    s = cfg.solver
    s.r_grid, s.rounds, s.points_per_round = list(SETTINGS.r_grid), SETTINGS.rounds, SETTINGS.points_per_round
    s.max_steps, s.eval_every = SETTINGS.max_steps, SETTINGS.eval_every
    cfg.store.out_dir = str(tmp_path / "out")
    return cfg


def assert_same_runs(got, want, examples):
    """Same r, β, rounds and steps; accuracies equal up to one example and gradient norms up to
    round-off (a trial sums in another process, with its own thread count)."""
    assert [(run.r, run.beta, run.round, run.method, run.final_step, run.converged) for run in got] == \
        [(run.r, run.beta, run.round, run.method, run.final_step, run.converged) for run in want]
    for a, b in zip(got, want):
        assert np.array_equal(a.steps, b.steps)
        assert a.accuracy.keys() == b.accuracy.keys()
        for name in b.accuracy:
            assert_accuracies_close(a.accuracy[name], b.accuracy[name], len(examples[name]), f"r={a.r} {name}")
        np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=1e-9)


def test_batched_trials_give_the_runs_of_one_r_trials(ray_local, tmp_path):
    """Two r per trial: the runs of solve_sweep (which one-r trials give too: test_distributed), one
    Tune result per r, trial folders named by round and r, and no CSV or TensorBoard files."""
    cfg = sweep_config(tmp_path)
    problem = random_problem(seed=2)
    rounds_seen = []
    runs = tune_sweep(cfg, problem, name="batched", rs_per_trial=2,
                      on_round=lambda i, rs: rounds_seen.append((i, [run.r for run in rs])))
    direct = solve_sweep(problem, SETTINGS)
    assert_same_runs(runs, direct, problem.eval_labels)
    expected_rounds, _ = one_process_rounds(problem, SETTINGS)
    assert [rs for _, rs in rounds_seen] == expected_rounds

    experiment = tmp_path / "out" / "tune" / "batched"
    trials = sorted(p for p in experiment.iterdir() if p.is_dir())
    labels = {p.name.rsplit("_", 1)[0] for p in trials}
    expected = {f"round{i}_{r_label(rs[j:j + 2])}" for i, rs in enumerate(expected_rounds) for j in range(0, len(rs), 2)}
    assert labels == expected and len(trials) == len(expected)
    lines = [json.loads(line) for trial in trials for line in (trial / "result.json").read_text().splitlines()]
    assert sorted(line["r"] for line in lines) == sorted(run.r for run in direct)  # one result per r
    files = {p.name for p in experiment.rglob("*") if p.is_file()}
    assert not any(name.startswith("events.out.tfevents") or name == "progress.csv" for name in files), files
    assert {p.name for trial in trials for p in trial.iterdir()} <= {"result.json", "params.json", "params.pkl"}


def test_sweep_on_s3_storage(ray_local, tmp_path):
    """With a remote artifact store, Tune's experiment goes under its prefix (every node reaches it)."""
    from s3_server import MotoS3Server

    cfg = sweep_config(tmp_path)
    cfg.solver.rounds = 1
    problem = random_problem(seed=3)
    with MotoS3Server() as s3:
        s3.make_bucket("sweeps")
        cfg.store.artifact_store = "s3://sweeps/artifacts"
        cfg.storage_options = s3.storage_options
        runs = tune_sweep(cfg, problem, name="on-s3", rs_per_trial=5)
        keys = s3.filesystem().find("sweeps/artifacts/tune/on-s3")
    assert [run.r for run in runs if run.stage == "grid"] == list(SETTINGS.r_grid)  # (and any edge extension)
    names = {key.rsplit("/", 1)[1] for key in keys}
    assert "tuner.pkl" in names and "result.json" in names
    assert any(f"/round0_{r_label(list(SETTINGS.r_grid))}_" in key for key in keys)
    assert not (tmp_path / "out" / "tune").exists()


# --------------------------------------------------------------------------------------------
# Joining a cluster ships the package
# --------------------------------------------------------------------------------------------
def test_joining_a_cluster_ships_this_package(ray_cluster):
    """init_ray(address) with the runtime_env: workers import entk_ray from Ray's upload of this
    checkout, not from a copy at the driver's path (which Ray would otherwise put first)."""
    import ray

    @ray.remote(num_cpus=0)
    def where_is_entk_ray():
        import entk_ray

        return entk_ray.__file__

    address = ray_cluster.address
    ray.shutdown()
    try:
        assert runtime.init_ray(address)
        path = ray.get(where_is_entk_ray.remote(), timeout=120)
        assert "runtime_resources" in path and path.endswith(os.path.join("entk_ray", "__init__.py")), path
        assert (Path(path).parents[1] / "pyproject.toml").is_file()  # the checkout, as working_dir
    finally:
        ray.shutdown()
        ray.init(address=address, namespace="entk_ray_tests")
