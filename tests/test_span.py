"""The out-of-span fraction: 0 on training examples, the least-squares residual in general, and
the same from the solver's spectrum as from a direct solve; the run's span summary."""
import numpy as np
import pytest
from references import span_fractions_direct

from entk_ray.solvers import Spectrum, make_problem
from entk_ray.span import analyze, effective_ranks, span_fractions, write_span_analysis


def features(n=20, m=15, p=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, p)), rng.normal(size=(m, p)), rng.integers(0, 3, size=n), rng.integers(0, 3, size=m)


def test_zero_for_training_examples_and_least_squares_residual_otherwise():
    phi, phi_e, y, y_e = features()
    kernel = phi @ phi.T
    problem = make_problem(kernel, y, {"id_val": phi_e @ phi.T, "train_again": kernel}, {"id_val": y_e, "train_again": y}, 3)
    spectrum, _ = Spectrum.of(problem)
    eps = 1e-10 * np.trace(kernel) / len(kernel)
    train = span_fractions(spectrum.eigenvalues, spectrum.projected["train_again"], np.sum(phi**2, 1), eps)
    np.testing.assert_allclose(train, 0.0, atol=1e-7)  # ε/λ_min ≈ 1e-10·p/λ_min: far below this
    s = span_fractions(spectrum.eigenvalues, spectrum.projected["id_val"], np.sum(phi_e**2, 1), eps)
    # min_a ‖φ(x) − Φᵀa‖² / ‖φ(x)‖² by least squares
    coef = np.linalg.lstsq(phi.T, phi_e.T, rcond=None)[0]
    residual = np.sum((phi_e.T - phi.T @ coef) ** 2, 0) / np.sum(phi_e**2, 1)
    np.testing.assert_allclose(s, residual, rtol=1e-6, atol=1e-9)
    assert np.all((s > 0.3) & (s < 1))  # 20 random directions in R^60 leave about 2/3 outside
    # the spectrum formula equals the direct solve at any ε
    for r_eps in (1e-6, 1e-2, 1.0):
        e = r_eps * np.trace(kernel) / len(kernel)
        np.testing.assert_allclose(span_fractions(spectrum.eigenvalues, spectrum.projected["id_val"], np.sum(phi_e**2, 1), e),
                                   span_fractions_direct(kernel, phi_e @ phi.T, np.sum(phi_e**2, 1), e), rtol=1e-8, atol=1e-12)


def test_larger_epsilon_counts_more_outside():
    phi, phi_e, y, y_e = features()
    kernel = phi @ phi.T
    diag = np.sum(phi_e**2, 1)
    values = [span_fractions_direct(kernel, phi_e @ phi.T, diag, e).mean() for e in (1e-3, 1.0, 100.0)]
    assert values[0] < values[1] < values[2] <= 1.0
    with pytest.raises(ValueError, match="epsilon"):
        span_fractions(np.ones(3), np.ones((2, 3)), np.ones(2), 0.0)


def test_effective_ranks():
    ranks = effective_ranks(np.array([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert ranks["participation_ratio"] == pytest.approx(4.0) and ranks["entropy_rank"] == pytest.approx(4.0)
    assert effective_ranks(np.array([1.0, 1e-9, 1e-9]))["participation_ratio"] == pytest.approx(1.0, abs=1e-6)


def test_analysis_bins_correlation_and_files(tmp_path):
    s = {"id_val": np.linspace(0, 0.5, 50), "ood:x": np.linspace(0.3, 1.0, 50)}
    ok = {"id_val": s["id_val"] < 0.4, "ood:x": s["ood:x"] < 0.4}
    out = analyze(s, ok)
    assert out["sets"]["pooled"]["pearson"] < -0.5
    bins = out["sets"]["pooled"]["bins"]
    assert sum(b["count"] for b in bins) == 100 and bins[0]["accuracy"] == 1.0 and bins[-1]["accuracy"] == 0.0
    # a whole run: the spectrum left by the solver is reused, the chosen model's correctness used
    phi, phi_e, y, y_e = features(n=30, m=20, p=40)
    problem = make_problem(phi @ phi.T, y, {"id_val": phi_e @ phi.T}, {"id_val": y_e}, 3)
    Spectrum.of(problem)
    summary = write_span_analysis(tmp_path, problem, {"id_val": np.sum(phi_e**2, 1)}, r=1e-3, step=50)
    assert (tmp_path / "span.png").stat().st_size > 0 and (tmp_path / "spectrum.png").stat().st_size > 0
    assert summary["spectrum"]["n"] == 30 and 0 < summary["analysis"]["sets"]["id_val"]["mean"] < 1
    means = [summary["effect_of_epsilon"][k]["id_val"]["mean"] for k in sorted(summary["effect_of_epsilon"], key=float)]
    assert means == sorted(means)


def test_predictions_reproduce_the_solver_path_accuracy():
    from entk_ray.solvers import SpectralSolver
    from entk_ray.span import predictions

    phi, phi_e, y, y_e = features(n=30, m=25, p=40, seed=3)
    problem = make_problem(phi @ phi.T, y, {"id_val": phi_e @ phi.T}, {"id_val": y_e}, 3)
    spectrum, _ = Spectrum.of(problem)
    run = SpectralSolver(spectrum).path(1e-2, max_steps=40, eval_every=10, tol=1e-12)
    for index, step in enumerate(run.steps):
        preds = predictions(spectrum, 1e-2, int(step))
        assert np.mean(preds["id_val"] == y_e) == run.accuracy["id_val"][index]
