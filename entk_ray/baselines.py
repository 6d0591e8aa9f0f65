"""Baselines reported beside the eNTK: the linear probe (Kumar et al., ICLR 2022 protocol).

Penultimate features g_θ(x) are standardized with the training set's mean and standard deviation,
then a multinomial logistic regression with L2 penalty is fit for each inverse strength C in a
grid; C is chosen by accuracy on the selection set (ID validation by default).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler


@dataclass
class ProbeResult:
    c: float
    accuracy: dict[str, float]  # at the chosen C, per evaluation set
    sweep: list[dict]  # every C: {"C": …, <set>: acc, …}
    # The fitted probe at the chosen C, for LP-FT's head: decision(x) = coef·((x − mean)/scale) + intercept,
    # one row per label in ``classes`` (one row in all for two classes, as scikit-learn fits it).
    coef: np.ndarray | None = None
    intercept: np.ndarray | None = None
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    classes: np.ndarray | None = None


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, eval_sets: dict[str, tuple[np.ndarray, np.ndarray]],
                 select_on: str, c_grid: Sequence[float], max_iter: int = 1000) -> ProbeResult:
    """Fit a logistic regression per C (warm-started, smallest C first) and pick C on ``select_on``
    (earliest in the grid on ties)."""
    if select_on not in eval_sets:
        raise ValueError(f"select_on={select_on!r} is not among the evaluation sets {list(eval_sets)}")
    scaler = StandardScaler().fit(train_x)
    xs = scaler.transform(train_x)
    evals = {k: (scaler.transform(x), y) for k, (x, y) in eval_sets.items()}
    clf = LogisticRegression(max_iter=max_iter, warm_start=True)
    sweep, fits = [], []
    for c in sorted(float(c) for c in c_grid):
        clf.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xs, train_y)
        sweep.append({"C": c, **{k: float(clf.score(x, y)) for k, (x, y) in evals.items()}})
        fits.append((clf.coef_.copy(), clf.intercept_.copy()))
    index = max(range(len(sweep)), key=lambda i: (sweep[i][select_on], -i))
    best = sweep[index]
    return ProbeResult(c=best["C"], accuracy={k: best[k] for k in eval_sets}, sweep=sweep, coef=fits[index][0],
                       intercept=fits[index][1], mean=scaler.mean_.copy(), scale=scaler.scale_.copy(),
                       classes=clf.classes_.copy())
