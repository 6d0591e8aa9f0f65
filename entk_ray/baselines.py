"""Baselines reported beside the eNTK: the linear probe (Kumar et al., ICLR 2022 protocol).

Penultimate features g_θ(x) are standardized with the training set's mean and standard deviation,
then a multinomial logistic regression with L2 penalty is fit for each inverse strength C in a
grid; C is chosen by accuracy on the selection set (ID validation by default). A tie on accuracy
(common on a small selection set) goes to the lower cross-entropy on the selection set
(:data:`entk_ray.solvers.TIE_BREAK`, the same rule as the eNTK's), then to the smaller C.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


@dataclass
class ProbeResult:
    c: float
    accuracy: dict[str, float]  # at the chosen C, per evaluation set
    sweep: list[dict]  # every C: {"C": …, <set>: acc, …, "selection_loss": cross-entropy on the selection set}
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # at the chosen C, per evaluation set
    tied: int = 1  # values of C that shared the best selection accuracy
    # The fitted probe at the chosen C, for LP-FT's head: decision(x) = coef·((x − mean)/scale) + intercept,
    # one row per label in ``classes`` (one row in all for two classes, as scikit-learn fits it).
    coef: np.ndarray | None = None
    intercept: np.ndarray | None = None
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    classes: np.ndarray | None = None


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, eval_sets: dict[str, tuple[np.ndarray, np.ndarray]],
                 select_on: str, c_grid: Sequence[float], max_iter: int = 1000,
                 progress: bool = False) -> ProbeResult:
    """Fit a logistic regression per C (warm-started, smallest C first) and pick C on ``select_on``:
    highest accuracy, ties to the lowest cross-entropy there, then to the smallest C.
    ``progress`` shows one step per C (:func:`entk_ray.progress.progress_bar`)."""
    from entk_ray.progress import progress_bar

    if select_on not in eval_sets:
        raise ValueError(f"select_on={select_on!r} is not among the evaluation sets {list(eval_sets)}")
    scaler = StandardScaler().fit(train_x)
    xs = scaler.transform(train_x)
    evals = {k: (scaler.transform(x), y) for k, (x, y) in eval_sets.items()}
    clf = LogisticRegression(max_iter=max_iter, warm_start=True)
    sweep, predictions, fits = [], [], []
    grid = sorted(float(c) for c in c_grid)
    with progress_bar(total=len(grid), desc="linear probe", unit="C", enabled=progress, rate=False) as bar:
        for c in grid:
            clf.set_params(C=c)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(xs, train_y)
            predicted = {k: clf.predict(x) for k, (x, _y) in evals.items()}
            x_sel, y_sel = evals[select_on]
            loss = cross_entropy(clf.predict_proba(x_sel), clf.classes_, y_sel)
            sweep.append({"C": c, **{k: float(np.mean(predicted[k] == y)) for k, (_x, y) in evals.items()},
                          "selection_loss": loss})
            predictions.append(predicted)
            fits.append((clf.coef_.copy(), clf.intercept_.copy()))
            bar.set_postfix_str(f"C={c:.3g}: {select_on} {100 * sweep[-1][select_on]:.1f}%")
            bar.update(1)
    best_acc = max(row[select_on] for row in sweep)
    tied = [i for i, row in enumerate(sweep) if row[select_on] == best_acc]
    best = min(tied, key=lambda i: sweep[i]["selection_loss"])  # first of equal losses: the smallest C
    return ProbeResult(c=sweep[best]["C"], accuracy={k: sweep[best][k] for k in eval_sets}, sweep=sweep,
                       predictions=predictions[best], tied=len(tied), coef=fits[best][0], intercept=fits[best][1],
                       mean=scaler.mean_.copy(), scale=scaler.scale_.copy(), classes=clf.classes_.copy())


def cross_entropy(proba: np.ndarray, classes: np.ndarray, labels: np.ndarray, eps: float = 1e-15) -> float:
    """Mean −log p(label) with p clipped at ``eps``; a label the training set never showed (a
    small training subset may miss a class) has p = 0, so it costs −log eps rather than failing."""
    column = {int(c): i for i, c in enumerate(classes)}
    p = np.array([proba[i, column[int(y)]] if int(y) in column else 0.0 for i, y in enumerate(labels)])
    return float(-np.mean(np.log(np.clip(p, eps, 1.0))))
