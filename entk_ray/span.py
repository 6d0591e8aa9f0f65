"""How much of an example's feature lies outside the span of the training features.

For an evaluation example x with φ(x), the kernel row k_x = Φ φ(x) (its row of K_e) and
k(x, x) = ‖φ(x)‖², the *out-of-span fraction* is

    s_ε(x) = 1 − k_xᵀ (K + εI)⁻¹ k_x / k(x, x).

As ε → 0, k_xᵀ K⁺ k_x = ‖P φ(x)‖² with P the orthogonal projection onto span{φ(x_i)}, so s_0(x)
= ‖φ(x) − Pφ(x)‖² / ‖φ(x)‖² ∈ [0, 1]: the share of the squared feature norm no combination of
training features reaches (0 for a training example; the least-squares residual
min_a ‖φ(x) − Φᵀa‖² / ‖φ(x)‖² in general). ε > 0 regularizes directions of tiny eigenvalue
(they count as "outside"); ε is stated relative to the kernel's scale, ε = r_ε · tr(K)/n, like β,
and the analysis reports several r_ε to show its effect.

From the eigendecomposition K = UΛUᵀ the solver already has (``solvers.Spectrum``: Λ and
K_e U), k_xᵀ(K + εI)⁻¹k_x = Σ_i (K_e U)_{xi}² / (λ_i + ε): O(m·n) per ε, no new factorization.

:func:`analyze` turns the fractions and the chosen model's correctness into the summaries a run
reports (distribution per evaluation set, accuracy binned by s, correlation with correctness);
:func:`spectrum_summary` gives the kernel's eigenvalues and effective ranks; the figures are
:func:`plot_span` and :func:`plot_spectrum`; :func:`write_span_analysis` does all of it for a run.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from entk_ray.solvers import KernelProblem, Spectrum, SpectralSolver, ridge_beta

EPSILON_RS = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)  # ε = r_ε · tr(K)/n, the values whose effect is reported
PRIMARY_EPSILON_R = 1e-6
BINS = 5


def span_fractions(eigenvalues: np.ndarray, projected: np.ndarray, self_kernel: np.ndarray, epsilon: float) -> np.ndarray:
    """s_ε(x) = 1 − Σ_i P_{xi}²/(λ_i + ε) / k(x, x) for P = K_e U (m, n), λ clipped at 0.

    Rows with k(x, x) = 0 (a zero feature) get NaN. Values are clipped to [0, 1] (round-off)."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")
    lam = np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0)
    inside = (np.asarray(projected, dtype=np.float64) ** 2) @ (1.0 / (lam + epsilon))
    diag = np.asarray(self_kernel, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = np.where(diag > 0, 1.0 - inside / diag, np.nan)
    return np.clip(fraction, 0.0, 1.0)


def effective_ranks(eigenvalues: np.ndarray) -> dict[str, float]:
    """Participation ratio (Σλ)²/Σλ² and entropy rank exp(−Σ p log p), p = λ/Σλ (λ clipped at 0)."""
    lam = np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0)
    total = lam.sum()
    if total <= 0:
        return {"participation_ratio": 0.0, "entropy_rank": 0.0}
    p = lam[lam > 0] / total
    return {"participation_ratio": float(total**2 / np.sum(lam**2)), "entropy_rank": float(np.exp(-np.sum(p * np.log(p))))}


def spectrum_summary(eigenvalues: np.ndarray) -> dict:
    lam = np.sort(np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0))[::-1]
    cumulative = np.cumsum(lam) / max(lam.sum(), 1e-300)
    return {"n": int(lam.size), "lambda_max": float(lam[0]), "lambda_min": float(lam[-1]),
            "trace": float(lam.sum()), **effective_ranks(lam),
            "components_for_90pct": int(np.searchsorted(cumulative, 0.9) + 1),
            "components_for_99pct": int(np.searchsorted(cumulative, 0.99) + 1)}


def predictions(spectrum: Spectrum, r: float, step: int, tol: float = 1e-6,
                momentum: str = "strongly_convex") -> dict[str, np.ndarray]:
    """argmax_c (K_e α_t)_c of every evaluation set for the NAG iterate at (r, step) (spectral path)."""
    scores = SpectralSolver(spectrum).scores_at(r, int(step), tol, momentum)
    return {name: np.argmax(s, axis=1) for name, s in scores.items()}


def analyze(fractions: Mapping[str, np.ndarray], correct: Mapping[str, np.ndarray], bins: int = BINS) -> dict:
    """Distribution of s per set, accuracy in quantile bins of s (pooled edges), and the correlation
    of s with correctness (Pearson = point-biserial, and Spearman), per set and pooled."""
    from scipy.stats import spearmanr

    names = list(fractions)
    pooled = np.concatenate([fractions[n] for n in names])
    pooled_ok = np.concatenate([np.asarray(correct[n], dtype=np.float64) for n in names])
    finite = np.isfinite(pooled)
    edges = np.unique(np.quantile(pooled[finite], np.linspace(0, 1, bins + 1)))
    out = {"sets": {}, "bin_edges": edges.tolist()}

    def correlations(s, ok):
        keep = np.isfinite(s)
        s, ok = s[keep], ok[keep]
        if len(s) < 3 or np.std(s) == 0 or np.std(ok) == 0:
            return {"pearson": None, "spearman": None}
        return {"pearson": float(np.corrcoef(s, ok)[0, 1]), "spearman": float(spearmanr(s, ok).statistic)}

    def binned(s, ok):
        which = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2)
        return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(np.sum(which == b)),
                 "accuracy": float(np.mean(ok[which == b])) if np.any(which == b) else None}
                for b in range(len(edges) - 1)]

    for name in names + ["pooled"]:
        s = pooled if name == "pooled" else np.asarray(fractions[name], dtype=np.float64)
        ok = pooled_ok if name == "pooled" else np.asarray(correct[name], dtype=np.float64)
        q = np.nanquantile(s, [0.1, 0.25, 0.5, 0.75, 0.9])
        out["sets"][name] = {"count": int(len(s)), "mean": float(np.nanmean(s)), "quantiles": dict(zip(
            ["q10", "q25", "median", "q75", "q90"], map(float, q))), "accuracy": float(np.mean(ok)),
            "bins": binned(s, ok), **correlations(s, ok)}
    return out


def run_span_analysis(problem: KernelProblem, self_kernels: Mapping[str, np.ndarray], r: float, step: int,
                      epsilon_rs: Sequence[float] = EPSILON_RS, primary: float = PRIMARY_EPSILON_R,
                      spectrum: Spectrum | None = None, momentum: str = "strongly_convex") -> tuple[dict, dict]:
    """(summary, per-example arrays) for the model at (r, step), from the problem's spectrum
    (``problem.spectrum`` when the spectral solver left one, else one eigh here)."""
    spectrum = spectrum or getattr(problem, "spectrum", None) or Spectrum.of(problem)[0]
    eps = {float(r_eps): ridge_beta(r_eps, spectrum.trace, spectrum.n) for r_eps in sorted({*epsilon_rs, primary})}
    names = [n for n in problem.eval_kernels if n in self_kernels and n != "holdout"]
    preds = predictions(spectrum, r, step, momentum=momentum)
    correct = {n: preds[n] == problem.eval_labels[n] for n in names}
    by_eps = {r_eps: {n: span_fractions(spectrum.eigenvalues, spectrum.projected[n], self_kernels[n], e)
                      for n in names} for r_eps, e in eps.items()}
    summary = {"epsilon": {"rule": "epsilon = r_eps * tr(K)/n", "primary_r_eps": primary,
                           "primary": eps[float(primary)], "values": {str(k): v for k, v in eps.items()}},
               "model": {"r": float(r), "step": int(step)},
               "analysis": analyze(by_eps[float(primary)], correct),
               "effect_of_epsilon": {str(r_eps): {n: {"mean": float(np.nanmean(f[n])), "median": float(np.nanmedian(f[n]))}
                                                  for n in names} for r_eps, f in by_eps.items()},
               "spectrum": spectrum_summary(spectrum.eigenvalues)}
    arrays = {"fractions": by_eps, "correct": correct, "eigenvalues": np.asarray(spectrum.eigenvalues)}
    return summary, arrays


def _label(name: str) -> str:
    return "ID" if name == "id_val" else name.removeprefix("ood:")


def plot_span(summary: dict, arrays: dict, path: Path) -> None:
    """Three panels: histogram of s per set (primary ε), accuracy per bin of s, median s against ε."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = summary["epsilon"]["primary_r_eps"]
    fractions = arrays["fractions"][float(primary)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    upper = max(float(np.nanmax(f)) for f in fractions.values()) or 1.0
    grid = np.linspace(0, upper, 31)
    for name, f in fractions.items():
        axes[0].hist(f[np.isfinite(f)], bins=grid, alpha=0.5, density=True, label=_label(name))
    axes[0].set(xlabel=f"out-of-span fraction s (r_ε = {primary:g})", ylabel="density", title="distribution")
    axes[0].legend()
    for name, stats in summary["analysis"]["sets"].items():
        if name == "pooled":
            continue
        mids = [(b["lo"] + b["hi"]) / 2 for b in stats["bins"] if b["accuracy"] is not None]
        accs = [100 * b["accuracy"] for b in stats["bins"] if b["accuracy"] is not None]
        axes[1].plot(mids, accs, "o-", label=f"{_label(name)} (Pearson {stats['pearson'] or 0:+.2f})")
    axes[1].set(xlabel="s (bin centre, pooled quantile bins)", ylabel="accuracy (%)", title="accuracy by s")
    axes[1].legend()
    eps = sorted(float(k) for k in summary["effect_of_epsilon"])
    for name in fractions:
        axes[2].plot(eps, [summary["effect_of_epsilon"][str(e)][name]["median"] for e in eps], "o-", label=_label(name))
    axes[2].set(xscale="log", xlabel="r_ε (ε = r_ε · tr(K)/n)", ylabel="median s", title="effect of ε")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectrum(eigenvalues: np.ndarray, path: Path, title: str = "") -> None:
    """Eigenvalues of K (descending, log scale) and their cumulative share, with effective ranks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = np.sort(np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0))[::-1]
    ranks = effective_ranks(lam)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    index = np.arange(1, lam.size + 1)
    axes[0].loglog(index, np.maximum(lam / lam[0], 1e-18))
    axes[0].set(xlabel="index i", ylabel="λ_i / λ_max", title=title or "eigenvalues of K")
    for value, style, label in ((ranks["participation_ratio"], "--", "participation ratio"),
                                (ranks["entropy_rank"], ":", "entropy rank")):
        axes[0].axvline(value, ls=style, color="k", label=f"{label} {value:.1f}")
    axes[0].legend()
    axes[1].semilogx(index, np.cumsum(lam) / lam.sum())
    axes[1].set(xlabel="components", ylabel="share of tr(K)", title="cumulative spectrum")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_span_analysis(out_dir: str | Path, problem: KernelProblem, self_kernels: Mapping[str, np.ndarray],
                        r: float, step: int, momentum: str = "strongly_convex") -> dict:
    """``span.json`` (summary), ``span.png`` and ``spectrum.png`` in ``out_dir``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, arrays = run_span_analysis(problem, self_kernels, r, step, momentum=momentum)
    (out / "span.json").write_text(json.dumps(summary, indent=2))
    plot_span(summary, arrays, out / "span.png")
    plot_spectrum(arrays["eigenvalues"], out / "spectrum.png")
    return summary


def format_span_line(summary: dict) -> str:
    """One log line: median s per set and its correlation with correctness."""
    sets = summary["analysis"]["sets"]
    parts = [f"{_label(n)} median {s['quantiles']['median']:.3g} (corr. with correct {s['pearson'] or 0:+.2f})"
             for n, s in sets.items() if n != "pooled"]
    rank = summary["spectrum"]
    return (f"span (ε = {summary['epsilon']['primary_r_eps']:g}·tr(K)/n): " + "; ".join(parts)
            + f"; K effective rank {rank['participation_ratio']:.1f} (participation), {rank['entropy_rank']:.1f} (entropy)")
