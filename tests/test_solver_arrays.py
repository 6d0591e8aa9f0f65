"""Solvers on an array namespace: torch (CPU) gives numpy's results, and batched-β NAG gives
each β's own NAG path (issue 13, item 4)."""
import dataclasses

import numpy as np
import pytest
from references import assert_accuracies_close

from entk_ray.arrays import NUMPY, ArrayNamespace, namespace_for
from entk_ray.solvers import (NagSolver, SolverSettings, SpectralSolver, Spectrum, extreme_eigenvalues,
                              float32_eigh_error, momentum_coefficient, momentum_schedule, nag_solve, ridge_beta,
                              round_runner, solve_sweep, squared_loss)
from test_solvers import synthetic_problem

TORCH_CPU = ArrayNamespace("torch", "cpu")
RS = [1e-4, 3e-3, 0.1, 1.0]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These matrices are tiny (n = 150): torch's thread pool only adds synchronization, which a
    busy shared machine turns into seconds per step. Results do not depend on it (tolerances)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def textbook_nag(problem, r, lam_max, lam_min, max_steps, momentum):
    """NAG written out per β with a fresh product with K every step (no carried Kα):
    v = α_t + μ_t(α_t − α_{t−1}), α_{t+1} = v − η((K + βI)v − Y). Returns α_1 … α_max_steps."""
    k, y = problem.kernel, problem.targets
    beta = ridge_beta(r, problem.trace, problem.n)
    eta = 1.0 / (lam_max + beta)
    mus = momentum_schedule(momentum, max_steps, momentum_coefficient(lam_max, lam_min, beta))
    alpha = np.zeros_like(y)
    prev = np.zeros_like(y)
    out = []
    for t in range(max_steps):
        v = alpha + mus[t] * (alpha - prev)
        prev, alpha = alpha, v - eta * (k @ v + beta * v - y)
        out.append(alpha)
    return out


@pytest.mark.parametrize("namespace", [NUMPY, TORCH_CPU], ids=str)
@pytest.mark.parametrize("momentum", ["strongly_convex", "schedule"])
def test_batched_nag_equals_per_beta_nag(namespace, momentum):
    problem = synthetic_problem(seed=3)
    lam_max, lam_min = extreme_eigenvalues(problem.kernel)
    # tol 1e-7 makes the large β converge (and leave the batch) before the others: the batch shrinks
    steps, every, tol = 300, 7, 1e-7
    batched, batched_alphas = NagSolver(problem, namespace, lam_max, lam_min).paths(
        RS, steps, every, tol, momentum, return_iterates=True)
    assert any(run.converged for run in batched) and not all(run.converged for run in batched)
    for r, run, alphas in zip(RS, batched, batched_alphas):
        alone, alone_alphas = nag_solve(problem, r, steps, every, tol, momentum, lam_max, lam_min,
                                        return_iterates=True, namespace=namespace)
        assert np.array_equal(run.steps, alone.steps) and run.final_step == alone.final_step
        assert run.converged == alone.converged and run.beta == alone.beta
        for name in problem.eval_kernels:
            # reason: argmaxes of scores equal to round-off; at most one example may sit on a tie
            assert_accuracies_close(run.accuracy[name], alone.accuracy[name], len(problem.eval_labels[name]),
                                    f"{r} {name}")
            # reason: the losses of the same scores up to round-off of the batched GEMM
            np.testing.assert_allclose(run.loss[name], alone.loss[name], rtol=1e-10)
            scores = [problem.eval_kernels[name] @ a for a in alphas]
            np.testing.assert_allclose(run.loss[name], [squared_loss(sc, problem.eval_labels[name]) for sc in scores],
                                       rtol=1e-10)
        reference = textbook_nag(problem, r, lam_max, lam_min, run.final_step, momentum)
        scale = max(np.abs(a).max() for a in reference)
        for step, a_batched, a_alone in zip(run.steps, alphas, alone_alphas):
            # reason: the same float64 arithmetic in another order (one GEMM for the batch vs one
            # per β; Kα carried vs recomputed): equal up to round-off, 1e-10 of the iterates' size
            np.testing.assert_allclose(a_batched, a_alone, rtol=0, atol=1e-10 * scale)
            np.testing.assert_allclose(a_batched, reference[step - 1], rtol=0, atol=1e-10 * scale)
        np.testing.assert_allclose(run.grad_norm, alone.grad_norm, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["spectral", "nag"])
def test_torch_on_cpu_gives_numpys_sweep(method):
    problem = synthetic_problem(seed=4)
    settings = SolverSettings(method=method, max_steps=200, eval_every=10, tol=1e-8, r_grid=(1e-3, 1e-1, 10.0),
                              rounds=2, points_per_round=3)
    on_numpy = solve_sweep(problem, settings)
    on_torch = solve_sweep(problem, dataclasses.replace(settings, device="torch-cpu"))
    assert [run.r for run in on_torch] == [run.r for run in on_numpy]
    for a, b in zip(on_torch, on_numpy):
        assert np.array_equal(a.steps, b.steps) and a.converged == b.converged and a.round == b.round
        # reason: torch's and numpy's BLAS sum in different orders; accuracies count argmaxes of
        # scores that agree to ~1e-12 relative: at most one example may sit on a tie
        for name in problem.eval_kernels:
            assert_accuracies_close(a.accuracy[name], b.accuracy[name], len(problem.eval_labels[name]),
                                    f"{method} r={a.r} {name}")
            np.testing.assert_allclose(a.loss[name], b.loss[name], rtol=1e-9)
        np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=1e-8, atol=1e-12)
        assert a.beta == pytest.approx(b.beta, rel=1e-14)


def test_spectrum_on_torch_equals_numpys():
    problem = synthetic_problem(seed=5)
    ref, u_ref = Spectrum.of(problem, NUMPY)
    got, u = Spectrum.of(problem, TORCH_CPU)
    assert got.eigh_dtype == "float64" and got.n == ref.n and got.trace == ref.trace
    # reason: both are LAPACK eigh in float64; eigenvalues agree to round-off of λ_max
    np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-12 * ref.lam_max)
    # eigenvectors are defined up to sign: compare what the path uses, c_i² and (K_e U)_i c_i
    np.testing.assert_allclose(got.c**2, ref.c**2, rtol=1e-8, atol=1e-12)
    for name in ref.projected:
        np.testing.assert_allclose(got.projected[name] * got.c[:, 0], ref.projected[name] * ref.c[:, 0],
                                   rtol=1e-7, atol=1e-9 * np.abs(ref.projected[name]).max())
    np.testing.assert_allclose(np.abs(u), np.abs(u_ref), rtol=1e-6, atol=1e-9)


def test_batched_spectral_recurrence_equals_one_r_at_a_time():
    problem = synthetic_problem(seed=6)
    for namespace in (NUMPY, TORCH_CPU):
        solver = SpectralSolver.from_problem(problem, namespace)
        batch = solver.paths(RS, 250, 5, 1e-7)
        for r, run in zip(RS, batch):
            alone = solver.path(r, 250, 5, 1e-7)
            assert np.array_equal(run.steps, alone.steps) and run.converged == alone.converged
            for name in problem.eval_kernels:  # reason: as above, one example of slack at a tie
                assert_accuracies_close(run.accuracy[name], alone.accuracy[name], len(problem.eval_labels[name]))
            np.testing.assert_allclose(run.grad_norm, alone.grad_norm, rtol=1e-12, atol=1e-15)


def test_round_runner_batches_on_torch_and_matches_numpy():
    problem = synthetic_problem(seed=7)
    settings = SolverSettings(method="nag", max_steps=120, eval_every=12, tol=1e-9)
    cpu = round_runner(problem, settings)(RS)
    torch_runs = round_runner(problem, dataclasses.replace(settings, device="torch-cpu"))(RS)
    for a, b in zip(torch_runs, cpu):
        assert a.r == b.r and np.array_equal(a.steps, b.steps)
        np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=1e-8, atol=1e-12)  # reason: BLAS order; norms reach ~1e-9


def test_float32_eigh_error_reports_its_accuracy_against_float64_nag():
    problem = synthetic_problem(n=120, seed=8)
    settings = SolverSettings(max_steps=150, eval_every=10, tol=1e-8, r_grid=(1e-2, 1.0))
    report = float32_eigh_error(problem, settings, sample=100)
    assert report["n"] == 100 and report["rs"] == [1e-2, 1.0] and len(report["per_r"]) == 2
    # float32 eigh: ~1e-7 relative on the eigenvalues; the paths' accuracies barely move
    assert 0 < report["eigenvalue_rel_error"] < 1e-4
    assert report["max_accuracy_diff"] <= 0.05
    assert all(0 <= entry["alpha_rel_error"] < 1e-2 for entry in report["per_r"])
    assert set(report["early_stopping"]) == {"float32", "float64"}


def test_namespace_choices_and_bad_devices():
    assert namespace_for("cpu") is NUMPY and namespace_for("torch-cpu") == TORCH_CPU
    assert namespace_for("auto") in (NUMPY, ArrayNamespace("torch", "cuda"))
    with pytest.raises(ValueError, match="cpu, cuda or auto"):
        namespace_for("tpu")
    with pytest.raises(ValueError, match="CPU"):
        ArrayNamespace("numpy", "cuda")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            namespace_for("cuda")
    with pytest.raises(ValueError, match="float64"):
        round_runner(synthetic_problem(n=40, m=20), SolverSettings(method="nag", dtype="float32"))
