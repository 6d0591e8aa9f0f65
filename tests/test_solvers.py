"""Solvers: NAG and the spectral path against the closed form and against each other."""
import dataclasses

import numpy as np
import pytest
from references import assert_accuracies_close

from entk_ray.solvers import (SolverRun, SolverSettings, SpectralSolver, beta_from_r, choose_converged,
                              choose_early_stopping, eval_steps, holdout_split, kernel_ridge, make_problem, nag_solve,
                              one_hot_targets, predictions_at, search_limits, search_summary, solve_sweep, squared_loss,
                              telescopic_search, zoom_grid)


def synthetic_problem(n=150, m=80, classes=4, width=60, seed=0, selection="id", targets="onehot"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + 2 * m, width))
    w = rng.normal(size=(width, classes))
    labels = np.argmax(x @ w + 2.0 * rng.normal(size=(n + 2 * m, classes)), axis=1)
    x[n + m:] += 0.7 * rng.normal(size=(m, width))  # a shifted "OOD" set
    k = x[:n] @ x[:n].T
    evals = {"id_val": x[n:n + m] @ x[:n].T, "ood:shift": x[n + m:] @ x[:n].T}
    labs = {"id_val": labels[n:n + m], "ood:shift": labels[n + m:]}
    return make_problem(k, labels[:n], evals, labs, classes, targets=targets, selection=selection,
                        holdout_fraction=0.2, seed=1)


@pytest.mark.parametrize("momentum", ["strongly_convex", "schedule"])
def test_both_solvers_converge_to_kernel_ridge(momentum):
    problem = synthetic_problem()
    r = 0.05
    exact = kernel_ridge(problem.kernel, problem.targets, beta_from_r(problem.kernel, r))
    spectral = SpectralSolver.from_problem(problem)
    run, iterates = nag_solve(problem, r, max_steps=20000, eval_every=50, tol=1e-10, momentum=momentum,
                              return_iterates=True)
    assert run.converged and run.final_step < 20000
    np.testing.assert_allclose(iterates[-1], exact, rtol=1e-7, atol=1e-7 * np.abs(exact).max())
    beta, steps, coefs, norms, converged = spectral.coefficients(r, 20000, 50, 1e-10, momentum)
    assert converged and norms[-1] < 1e-10
    np.testing.assert_allclose(spectral.iterate(coefs[-1]), exact, rtol=1e-7, atol=1e-7 * np.abs(exact).max())
    scores = problem.eval_kernels["id_val"] @ exact
    labels = problem.eval_labels["id_val"]  # NAG's last iterate vs the exact solution: round-off apart
    assert_accuracies_close(run.accuracy["id_val"][-1], np.mean(np.argmax(scores, 1) == labels), len(labels))


@pytest.mark.parametrize("momentum", ["strongly_convex", "schedule"])
@pytest.mark.parametrize("r", [1e-4, 1e-2, 1.0])
def test_spectral_path_reproduces_iterative_nag(momentum, r):
    problem = synthetic_problem(seed=2)
    spectral = SpectralSolver.from_problem(problem)
    run, iterates = nag_solve(problem, r, max_steps=400, eval_every=7, tol=1e-9, momentum=momentum,
                              lam_max=spectral.lam_max, lam_min=spectral.lam_min, return_iterates=True)
    path = spectral.path(r, max_steps=400, eval_every=7, tol=1e-9, momentum=momentum)
    _, steps, coefs, _, _ = spectral.coefficients(r, 400, 7, 1e-9, momentum)
    assert np.array_equal(path.steps, run.steps) and path.final_step == run.final_step
    for name in problem.eval_kernels:  # two algorithms whose iterates agree to round-off
        assert_accuracies_close(path.accuracy[name], run.accuracy[name], len(problem.eval_labels[name]), name)
    scale = max(np.abs(a).max() for a in iterates)
    for coef, alpha in zip(coefs, iterates):
        np.testing.assert_allclose(spectral.iterate(coef), alpha, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(path.grad_norm, run.grad_norm, rtol=1e-6, atol=1e-12)


def test_early_stopping_picks_the_best_id_step_lowest_loss_on_ties():
    problem = synthetic_problem(seed=3)
    runs = [SpectralSolver.from_problem(problem).path(r, 300, 5, 1e-12) for r in (1e-3, 1e-1)]
    choice = choose_early_stopping(runs, "id_val")
    best = max(float(run.accuracy["id_val"].max()) for run in runs)
    assert choice.accuracy["id_val"] == best
    tied = [(run, i) for run in runs for i in np.flatnonzero(run.accuracy["id_val"] == best)]
    assert choice.tied == len(tied)
    run, index = min(tied, key=lambda c: c[0].loss["id_val"][c[1]])
    assert (choice.r, choice.step) == (run.r, run.steps[index])
    assert choice.accuracy["ood:shift"] == run.accuracy["ood:shift"][index]
    assert choice.selection_loss == run.loss["id_val"][index]
    final = choose_converged(runs, "id_val")
    assert final.step in {run.final_step for run in runs}


def fake_run(r, accuracy, loss, stage="grid"):
    steps = np.arange(1, len(accuracy) + 1) * 10
    return SolverRun(r=r, beta=10 * r, steps=steps, accuracy={"id_val": np.asarray(accuracy, dtype=float)},
                     grad_norm=np.ones(len(steps)), converged=False, final_step=int(steps[-1]),
                     loss={"id_val": np.asarray(loss, dtype=float)}, stage=stage)


def test_ties_on_selection_accuracy_go_to_the_lowest_loss_and_are_counted():
    runs = [fake_run(1e-3, [0.5, 1.0, 1.0], [0.9, 0.4, 0.3]),
            fake_run(1e-2, [1.0, 1.0, 0.9], [0.5, 0.2, 0.1]),
            fake_run(1e-1, [0.8, 1.0, 1.0], [0.9, 0.6, 0.25])]
    early = choose_early_stopping(runs, "id_val")
    assert (early.r, early.step, early.tied, early.selection_loss) == (1e-2, 20, 6, 0.2)
    converged = choose_converged(runs, "id_val")  # final iterates: 1.0 (loss 0.3), 0.9, 1.0 (loss 0.25)
    assert (converged.r, converged.step, converged.tied) == (1e-1, 30, 2)
    assert runs[0].best_index("id_val") == 2  # within a run too: the later step has the lower loss
    # without losses (old cached runs) the earliest tied point wins, as before
    plain = [dataclasses.replace(run, loss=None) for run in runs]
    assert (choose_early_stopping(plain, "id_val").r, choose_early_stopping(plain, "id_val").step) == (1e-3, 20)


def test_recorded_loss_is_the_squared_error_of_the_scores():
    problem = synthetic_problem(seed=6, targets="centered")
    solver = SpectralSolver.from_problem(problem)
    path = solver.path(1e-2, 60, 20, 1e-12)
    run, iterates = nag_solve(problem, 1e-2, 60, 20, 1e-12, lam_max=solver.lam_max, lam_min=solver.lam_min,
                              return_iterates=True)
    classes = problem.targets.shape[1]
    for name, ke in problem.eval_kernels.items():
        y = one_hot_targets(problem.eval_labels[name], classes, centered=True)
        expected = [np.mean(np.sum((ke @ alpha - y) ** 2, axis=1)) for alpha in iterates]
        np.testing.assert_allclose(run.loss[name], expected, rtol=1e-12, err_msg="NAG records its own loss")
        # the spectral path's scores differ from K_e α by round-off only
        np.testing.assert_allclose(path.loss[name], expected, rtol=1e-8, err_msg=name)
    assert squared_loss(np.eye(3), np.arange(3)) == 0.0


@pytest.mark.parametrize("method", ["spectral", "nag"])
def test_predictions_at_a_chosen_point_reproduce_its_accuracy(method):
    problem = synthetic_problem(seed=7)
    settings = SolverSettings(method=method, max_steps=120, eval_every=10, tol=1e-8, r_grid=(1e-3, 1e-1), rounds=1)
    runs = solve_sweep(problem, settings, progress=False)
    for choice in (choose_early_stopping(runs, "id_val"), choose_converged(runs, "id_val")):
        predicted = predictions_at(problem, choice.r, choice.step, settings)
        for name, labels in problem.eval_labels.items():
            assert np.mean(predicted[name] == labels) == choice.accuracy[name], (choice.method, name)
    with pytest.raises(ValueError, match="step"):
        predictions_at(problem, 1e-3, 0, settings)


def test_solver_run_round_trips_with_loss_and_stage():
    run = fake_run(1e-3, [0.5, 1.0], [0.3, 0.1], stage="extension")
    back = SolverRun.from_dict(run.to_dict())
    assert back.stage == "extension" and np.array_equal(back.loss["id_val"], run.loss["id_val"])
    old = run.to_dict()
    del old["loss"], old["stage"]  # a sweep cached before losses were recorded
    assert SolverRun.from_dict(old).loss is None and SolverRun.from_dict(old).stage == "grid"


def test_eval_steps_include_the_last_step():
    assert eval_steps(25, 10).tolist() == [10, 20, 25]
    assert eval_steps(20, 10).tolist() == [10, 20]


def test_telescopic_search_zooms_around_the_best_r_and_keeps_every_point():
    calls = []

    def run_round(rs, round_index):
        calls.append((round_index, list(rs)))
        runs = []
        for r in rs:  # a fake accuracy peaked at r = 10**-2.3
            acc = 1.0 - abs(np.log10(r) + 2.3) / 10
            runs.append(type("Run", (), {"r": r, "accuracy": {"id_val": np.array([acc])}, "round": None})())
        return runs

    grid = [10.0**k for k in range(-6, 3)]
    runs = telescopic_search(run_round, grid, rounds=3, points_per_round=6, select_on="id_val")
    assert [c[0] for c in calls] == [0, 1, 2]
    assert np.allclose(calls[0][1], grid)
    # round 1: 6 points over 4 decades around 1e-2, less the two (1e-4, 1) already run
    assert np.allclose(np.log10(calls[1][1]), [-3.2, -2.4, -1.6, -0.8])
    # round 2: 2 decades around the best so far (10**-2.4)
    r2 = np.log10(calls[2][1])
    assert r2.min() >= -3.4 - 1e-9 and r2.max() <= -1.4 + 1e-9
    assert len(runs) == len({round(np.log10(run.r), 9) for run in runs})  # no r evaluated twice
    assert len(runs) == sum(len(c[1]) for c in calls)
    best = max(runs, key=lambda run: run.accuracy["id_val"][0])
    assert abs(np.log10(best.r) + 2.3) < 0.3
    assert np.allclose(np.log10(zoom_grid(1e-2, 2.0, 3)), [-3, -2, -1])


def peaked_round(peak_log_r, calls):
    """A fake ``run_round``: selection accuracy peaks at r = 10**peak_log_r; records its calls."""
    def run_round(rs, round_index):
        calls.append((round_index, list(rs)))
        return [fake_run(r, [1.0 - abs(np.log10(r) - peak_log_r) / 100], [0.0]) for r in rs]
    return run_round


def test_a_best_r_on_the_grid_edge_extends_the_search_past_it():
    calls = []
    grid = [10.0**k for k in range(-6, 3)]
    runs = telescopic_search(peaked_round(-7.6, calls), grid, rounds=3, points_per_round=5, select_on="id_val",
                             max_extensions=3, progress=False)
    # round 0: the grid; its best (1e-6) is its lower edge, so round 1 goes three decades further down
    assert np.allclose(np.log10(calls[1][1]), [-7, -8, -9])
    assert {run.stage for run in runs if run.round == 1} == {"extension"}
    limits = search_limits(grid, 3)
    assert limits.lower == pytest.approx(1e-9) and limits.upper == pytest.approx(1e5)
    assert min(run.r for run in runs) >= 1e-9 * (1 - 1e-9)  # zoom rounds stay inside the limits
    best = max(runs, key=lambda run: run.accuracy["id_val"][0])
    assert abs(np.log10(best.r) + 7.6) < 0.3
    summary = search_summary(runs, grid, 3, "id_val")
    assert summary["at_limit"] is None and summary["extended"] == pytest.approx([1e-9, 1e-8, 1e-7])
    assert "extended below 1e-06" in summary["message"]


def test_a_best_r_past_the_limit_is_reported_at_the_limit():
    calls = []
    grid = [1e-4, 1e-2, 1.0]  # two-decade spacing: the extension keeps it
    runs = telescopic_search(peaked_round(4.5, calls), grid, rounds=2, points_per_round=3, select_on="id_val",
                             max_extensions=2, progress=False)
    assert np.allclose(np.log10(calls[1][1]), [2, 4])
    assert max(run.r for run in runs) == pytest.approx(1e4)
    summary = search_summary(runs, grid, 2, "id_val")
    assert summary["at_limit"] == "upper" and summary["best_r"] == pytest.approx(1e4)
    assert "upper limit" in summary["message"] and "max_extensions" in summary["message"]
    # max_extensions = 0: no r outside the grid at all, and the edge is reported
    calls = []
    runs = telescopic_search(peaked_round(4.5, calls), grid, rounds=2, points_per_round=3, select_on="id_val",
                             max_extensions=0, progress=False)
    assert max(run.r for run in runs) == pytest.approx(1.0) and len(calls) == 2
    assert search_summary(runs, grid, 0, "id_val")["at_limit"] == "upper"


def test_search_progress_is_plain_lines_when_not_a_terminal(capsys):
    telescopic_search(peaked_round(-2.0, []), [1e-4, 1e-2, 1.0], rounds=2, points_per_round=3, select_on="id_val")
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("β search: 1/2 round (50%)") and "best r=0.01" in err
    assert "\r" not in err and "\x1b" not in err


@pytest.mark.parametrize("method", ["spectral", "nag"])
def test_solve_sweep_reports_every_point(method):
    problem = synthetic_problem(seed=4)
    runs = solve_sweep(problem, SolverSettings(method=method, max_steps=200, eval_every=20, tol=1e-8,
                                               r_grid=(1e-3, 1e-1, 10.0), rounds=2, points_per_round=3))
    assert {run.round for run in runs} == {0, 1}
    assert all(run.method == method for run in runs)
    points = [p for run in runs for p in run.to_records()]
    assert all({"r", "beta", "step", "id_val", "ood:shift"} <= set(p) for p in points)


def test_spectral_and_nag_sweeps_agree():
    problem = synthetic_problem(seed=5)
    settings = SolverSettings(max_steps=150, eval_every=10, tol=1e-8, r_grid=(1e-3, 1e-1, 10.0), rounds=2,
                              points_per_round=3)
    a = solve_sweep(problem, settings)
    b = solve_sweep(problem, dataclasses.replace(settings, method="nag"))
    assert [run.r for run in a] == pytest.approx([run.r for run in b])
    for x, y in zip(a, b):
        assert_accuracies_close(x.accuracy["id_val"], y.accuracy["id_val"], len(problem.eval_labels["id_val"]))


def test_holdout_selection_selects_on_a_train_slice_and_reports_id():
    problem = synthetic_problem(selection="holdout")
    assert problem.select_on == "holdout" and "id_val" in problem.eval_kernels
    assert problem.n == 150 - problem.eval_kernels["holdout"].shape[0]
    runs = solve_sweep(problem, SolverSettings(max_steps=100, eval_every=10, tol=1e-8, r_grid=(1e-2, 1.0), rounds=1,
                                               points_per_round=2))
    choice = choose_early_stopping(runs, "holdout")
    run = next(run for run in runs if run.r == choice.r)
    idx = list(run.steps).index(choice.step)
    assert choice.accuracy["holdout"] == run.accuracy["holdout"].max()
    assert choice.accuracy["id_val"] == run.accuracy["id_val"][idx]


def test_holdout_split_is_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), 25)
    fit, hold = holdout_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(fit, hold)) == 0 and len(fit) + len(hold) == 100
    assert np.bincount(labels[hold]).tolist() == [5, 5, 5, 5]


def test_targets_and_bad_input():
    y = one_hot_targets(np.array([0, 2]), 3, centered=True)
    np.testing.assert_allclose(y, [[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]])
    with pytest.raises(ValueError, match="labels must lie"):
        one_hot_targets(np.array([3]), 3)
    with pytest.raises(ValueError, match="beta must be positive"):
        kernel_ridge(np.eye(2), np.eye(2), 0.0)
    with pytest.raises(ValueError, match="select_on"):
        make_problem(np.eye(2), np.array([0, 1]), {"x": np.eye(2)}, {"x": np.array([0, 1])}, 2)
