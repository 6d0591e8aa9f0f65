r"""Kernel ridge regression on the dual: closed form, Nesterov's method, and its exact spectral path.

All functions take plain numpy arrays (float64) and know nothing of Ray.

Objective. With train kernel K (n×n), targets Y (n×C) and ridge β > 0,

    G(α) = ½ αᵀKα + ½ β‖α‖² − tr(αᵀY),     ∇G(α) = (K + βI)α − Y,     α* = (K + βI)⁻¹Y.

−∇G is the write-up's dual update −(Kα − Y) − βα. An evaluation set e with kernel K_e = Φ_eΦᵀ is
scored as argmax_c (K_e α)_c. β is given relative to the mean eigenvalue, β = r · tr(K)/n.

Nesterov (NAG), from α₀ = α₋₁ = 0 with step η = 1/(λ_max + β):

    v_t = α_t + μ_t (α_t − α_{t−1}),     α_{t+1} = v_t − η ∇G(v_t),

μ = (√κ − 1)/(√κ + 1), κ = (λ_max + β)/(λ_min + β) ("strongly_convex"), or μ_t = (t − 1)/(t + 2)
("schedule").

Exact spectral path. With K = UΛUᵀ and c = UᵀY, every iterate is α_t = U (a_t ⊙ c) where a_t ∈ R^n
follows the scalar recurrence, per eigenvalue λ_i,

    a_{t+1} = (1 − η(λ_i + β)) (a_t + μ_t (a_t − a_{t−1})) + η,     a_0 = a_{−1} = 0,

because each eigendirection evolves independently and linearly in c. One ``eigh`` then gives every
step for every β at O(n) per step, and evaluation is K_e α_t = (K_e U)(a_t ⊙ c).
‖∇G(α_t)‖_F² = Σ_i ((λ_i + β) a_{t,i} − 1)² ‖c_i‖².
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from entk_ray.arrays import NUMPY, ArrayNamespace, namespace_for


# --------------------------------------------------------------------------------------------
# Problem set-up
# --------------------------------------------------------------------------------------------
def one_hot_targets(labels: np.ndarray, num_classes: int, centered: bool = False) -> np.ndarray:
    """Y (n×C): one-hot rows, optionally centered (Y − 1/C)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    y = np.zeros((labels.shape[0], num_classes), dtype=np.float64)
    y[np.arange(labels.shape[0]), labels] = 1.0
    return y - 1.0 / num_classes if centered else y


def ridge_beta(r: float, trace: float, n: int) -> float:
    """β = r · tr(K)/n: ridge strength relative to the mean eigenvalue of K (the one place it is written)."""
    return float(r) * float(trace) / int(n)


def beta_from_r(kernel: np.ndarray, r: float) -> float:
    """:func:`ridge_beta` for a kernel matrix."""
    return ridge_beta(r, float(np.trace(kernel)), kernel.shape[0])


@dataclass
class KernelProblem:
    """Everything a solver needs: K, targets, and labelled evaluation kernels.

    ``select_on`` names the evaluation set used for early stopping and choosing β (the ID set,
    as in the write-up, or a holdout slice of train); ``id_name`` is the ID evaluation set.
    """

    kernel: np.ndarray
    targets: np.ndarray
    eval_kernels: dict[str, np.ndarray]
    eval_labels: dict[str, np.ndarray]
    select_on: str = "id_val"
    id_name: str = "id_val"

    def __post_init__(self):
        n = self.kernel.shape[0]
        if self.kernel.shape != (n, n):
            raise ValueError(f"K must be square, got shape {self.kernel.shape}")
        if self.targets.shape[0] != n:
            raise ValueError(f"targets have {self.targets.shape[0]} rows but K has {n}")
        for name, ke in self.eval_kernels.items():
            if ke.ndim != 2 or ke.shape[1] != n:
                raise ValueError(f"evaluation kernel {name!r} must be (m, {n}), got {ke.shape}")
            if self.eval_labels[name].shape[0] != ke.shape[0]:
                raise ValueError(f"evaluation kernel {name!r} has {ke.shape[0]} rows but "
                                 f"{self.eval_labels[name].shape[0]} labels")
        if self.select_on not in self.eval_kernels:
            raise ValueError(f"select_on={self.select_on!r} is not an evaluation set: {list(self.eval_kernels)}")

    @property
    def n(self) -> int:
        return self.kernel.shape[0]

    @property
    def trace(self) -> float:
        return float(np.trace(self.kernel))

    @property
    def target_offset(self) -> float:
        """The constant in the targets: rows are one-hot plus this (0, or −1/C when centered)."""
        return target_offset(self.targets)


def target_offset(targets: np.ndarray) -> float:
    """Targets are one-hot rows plus a constant; that constant is their smallest entry."""
    return float(targets.min()) if targets.size and targets.shape[1] > 1 else 0.0


def squared_loss(scores: np.ndarray, labels: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """Mean over examples of ‖s_i − y_i‖², y_i one-hot(label_i) + ``offset``: the regression loss the
    dual solves, on an evaluation set. ``scores`` is (m, C) or (m, T, C) (one loss per step T)."""
    y = np.zeros((labels.shape[0], scores.shape[-1]), dtype=np.float64) + offset
    y[np.arange(labels.shape[0]), labels] += 1.0
    diff = scores - (y if scores.ndim == 2 else y[:, None, :])
    return np.mean(np.sum(diff**2, axis=-1), axis=0)


def eval_targets(xp: ArrayNamespace, labels: dict[str, np.ndarray], num_classes: int,
                 offset: float) -> dict:
    """Per evaluation set, its targets one-hot + ``offset`` as an (m, 1, C) array of ``xp``: what
    :func:`squared_loss` compares the scores of every β or step (the middle axis) with."""
    out = {}
    for name, lab in labels.items():
        y = np.zeros((lab.shape[0], num_classes), dtype=np.float64) + offset
        y[np.arange(lab.shape[0]), lab] += 1.0
        out[name] = xp.asarray(y[:, None, :])
    return out


def make_problem(kernel: np.ndarray, train_labels: np.ndarray, eval_kernels: dict[str, np.ndarray],
                 eval_labels: dict[str, np.ndarray], num_classes: int, targets: str = "onehot",
                 selection: str = "id", holdout_fraction: float = 0.1, seed: int = 0,
                 id_name: str = "id_val") -> KernelProblem:
    """Build the solver problem; with ``selection="holdout"`` a seeded, stratified slice of train
    is removed from K and becomes the selection set, and ID is still reported on ``id_name``."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    if selection == "id":
        y = one_hot_targets(train_labels, num_classes, centered=targets == "centered")
        return KernelProblem(kernel, y, dict(eval_kernels), dict(eval_labels), select_on=id_name, id_name=id_name)
    if selection != "holdout":
        raise ValueError(f"selection must be 'id' or 'holdout', got {selection!r}")
    fit, hold = holdout_split(train_labels, holdout_fraction, seed)
    y = one_hot_targets(train_labels[fit], num_classes, centered=targets == "centered")
    kernels = {"holdout": kernel[np.ix_(hold, fit)], **{k: v[:, fit] for k, v in eval_kernels.items()}}
    labels = {"holdout": train_labels[hold], **eval_labels}
    return KernelProblem(kernel[np.ix_(fit, fit)], y, kernels, labels, select_on="holdout", id_name=id_name)


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, holdout) index arrays: about ``fraction`` of each class is held out."""
    rng = np.random.default_rng(seed)
    hold = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * members.size))
        if k >= members.size:
            k = members.size - 1
        hold.extend(rng.choice(members, size=max(k, 0), replace=False).tolist())
    hold = np.sort(np.asarray(hold, dtype=np.int64))
    if hold.size == 0:
        raise ValueError(f"holdout_fraction={fraction} holds out no training example")
    fit = np.setdiff1d(np.arange(labels.shape[0]), hold)
    return fit, hold


# --------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------
def kernel_ridge(kernel: np.ndarray, targets: np.ndarray, beta: float) -> np.ndarray:
    """α* = (K + βI)⁻¹ Y by a Cholesky solve."""
    import scipy.linalg  # here: Tune trial actors import this module and never need SciPy

    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    a = kernel + beta * np.eye(kernel.shape[0])
    return scipy.linalg.solve(a, targets, assume_a="pos")


def momentum_coefficient(lam_max: float, lam_min: float, beta: float) -> float:
    """μ = (√κ − 1)/(√κ + 1), κ = (λ_max + β)/(λ_min + β)."""
    kappa = (lam_max + beta) / (max(lam_min, 0.0) + beta)
    root = math.sqrt(kappa)
    return (root - 1.0) / (root + 1.0)


def momentum_schedule(momentum: str, steps: int, mu: float) -> np.ndarray:
    """μ_t for t = 0..steps−1: constant μ, or the (t − 1)/(t + 2) schedule."""
    if momentum == "strongly_convex":
        return np.full(steps, mu)
    if momentum == "schedule":
        t = np.arange(steps, dtype=np.float64)
        return np.maximum(t - 1.0, 0.0) / (t + 2.0)
    raise ValueError(f"momentum must be 'strongly_convex' or 'schedule', got {momentum!r}")


def eval_steps(last_step: int, eval_every: int) -> np.ndarray:
    """Steps at which accuracy is recorded: every ``eval_every`` steps, and the last step."""
    steps = list(range(eval_every, last_step + 1, eval_every))
    if not steps or steps[-1] != last_step:
        steps.append(last_step)
    return np.asarray(steps, dtype=np.int64)


@dataclass
class SolverRun:
    """The path of one solver run at one β: accuracy (and squared loss, :func:`squared_loss`) of
    every evaluation set at recorded steps. ``stage`` says why the search ran this r: ``grid``
    (round 0), ``extension`` (past an edge of the grid) or ``zoom`` (a later round)."""

    r: float
    beta: float
    steps: np.ndarray
    accuracy: dict[str, np.ndarray]
    grad_norm: np.ndarray  # relative ‖∇G(α_t)‖_F / ‖Y‖_F at the recorded steps
    converged: bool
    final_step: int
    method: str = "spectral"
    round: int = 0
    loss: dict[str, np.ndarray] | None = None
    stage: str = "grid"

    def best_index(self, select_on: str) -> int:
        """Recorded step with the best selection accuracy; ties go to the lowest selection loss,
        then to the earliest step."""
        return best_point_index(self.accuracy[select_on], _loss_of(self, select_on))

    def point(self, index: int) -> dict:
        point = {"r": self.r, "beta": self.beta, "step": int(self.steps[index]),
                 **{name: float(acc[index]) for name, acc in self.accuracy.items()}}
        for name, loss in (self.loss or {}).items():
            point[f"{name}:loss"] = float(loss[index])
        return point

    def to_records(self) -> list[dict]:
        """Every (r, β, step, accuracies…) point of the path."""
        return [dict(self.point(i), grad_norm=float(self.grad_norm[i]), round=self.round, stage=self.stage,
                     converged=self.converged, final_step=self.final_step)
                for i in range(len(self.steps))]

    def to_dict(self) -> dict:
        """A JSON document that :meth:`from_dict` turns back into an equal run (floats exact)."""
        return {"r": self.r, "beta": self.beta, "steps": [int(s) for s in self.steps],
                "accuracy": {k: [float(x) for x in v] for k, v in self.accuracy.items()},
                "grad_norm": [float(x) for x in self.grad_norm], "converged": bool(self.converged),
                "final_step": int(self.final_step), "method": self.method, "round": int(self.round),
                "loss": None if self.loss is None else {k: [float(x) for x in v] for k, v in self.loss.items()},
                "stage": self.stage}

    @classmethod
    def from_dict(cls, doc: dict) -> "SolverRun":
        loss = doc.get("loss")
        return cls(r=float(doc["r"]), beta=float(doc["beta"]), steps=np.asarray(doc["steps"], dtype=np.int64),
                   accuracy={k: np.asarray(v, dtype=np.float64) for k, v in doc["accuracy"].items()},
                   grad_norm=np.asarray(doc["grad_norm"], dtype=np.float64), converged=bool(doc["converged"]),
                   final_step=int(doc["final_step"]), method=doc["method"], round=int(doc.get("round", 0)),
                   loss=None if loss is None else {k: np.asarray(v, dtype=np.float64) for k, v in loss.items()},
                   stage=doc.get("stage", "grid"))


def best_point_index(accuracy: np.ndarray, loss: np.ndarray | None = None) -> int:
    """Index of the highest accuracy; among tied indices the lowest loss (if given), then the first."""
    accuracy = np.asarray(accuracy)
    tied = np.flatnonzero(accuracy == accuracy.max())
    if loss is None or tied.size == 1:
        return int(tied[0])
    return int(tied[np.argmin(np.asarray(loss)[tied])])  # argmin: first of equal losses


def _loss_of(run, select_on: str) -> np.ndarray | None:
    loss = getattr(run, "loss", None)
    return None if not loss or select_on not in loss else loss[select_on]


@dataclass(frozen=True)
class SolverSettings:
    """How each β is solved and how β is searched: the solver part of the config, in one object.

    ``method`` is ``spectral`` (exact NAG path from one eigh) or ``nag`` (iterative); each path runs
    at most ``max_steps`` steps, records accuracy every ``eval_every`` steps and stops once
    ‖∇G‖_F/‖Y‖_F < ``tol``; ``momentum`` is ``strongly_convex`` or ``schedule``. The telescopic
    search starts from ``r_grid``, extends past an edge of it by up to ``max_extensions`` grid
    steps when the best r sits there, and zooms ``rounds − 1`` times with ``points_per_round`` values.
    ``device`` is where the paths run (``cpu``: numpy; ``cuda``: torch on a GPU, all β of a round in
    one batched pass; ``auto``: the GPU when the process sees one) and ``dtype`` the eigh's dtype
    (``float32`` only for ``spectral``; the recurrences and NAG are float64).
    """

    method: str = "spectral"
    max_steps: int = 1000
    eval_every: int = 10
    tol: float = 1e-6
    momentum: str = "strongly_convex"
    r_grid: tuple[float, ...] = tuple(10.0**k for k in range(-6, 3))
    rounds: int = 3
    points_per_round: int = 9
    device: str = "cpu"
    dtype: str = "float64"
    max_extensions: int = 3

    @classmethod
    def from_config(cls, solver_cfg) -> "SolverSettings":
        """From :class:`entk_ray.config.SolverConfig` (or anything with the same fields)."""
        return cls(method=solver_cfg.method, max_steps=solver_cfg.max_steps, eval_every=solver_cfg.eval_every,
                   tol=solver_cfg.tol, momentum=solver_cfg.momentum, r_grid=tuple(solver_cfg.r_grid),
                   rounds=solver_cfg.rounds, points_per_round=solver_cfg.points_per_round,
                   max_extensions=getattr(solver_cfg, "max_extensions", cls.max_extensions),
                   device=getattr(solver_cfg, "device", "cpu"), dtype=getattr(solver_cfg, "dtype", "float64"))

    @property
    def largest_round(self) -> int:
        """r values in the largest round of the telescopic search."""
        return max(len(self.r_grid), self.points_per_round if self.rounds > 1 else 0)


def _to_host_run(r, beta, steps, accuracy, norms, converged, final_step, method, loss) -> SolverRun:
    return SolverRun(r=float(r), beta=beta, steps=np.asarray(steps), grad_norm=np.asarray(norms),
                     accuracy={k: np.asarray(v) for k, v in accuracy.items()}, converged=converged,
                     final_step=final_step, method=method, loss={k: np.asarray(v) for k, v in loss.items()})


class NagSolver:
    """Iterative NAG on the dual for many β at once, on an array namespace.

    All β advance together: the state of B values of β is an (n, B, C) array, and each step reads
    K once for all of them, as one (n×n)·(n×B·C) product; β, η and μ are per-β columns. Each β
    stops when its own ‖∇G(α_t)‖_F/‖Y‖_F < tol (it leaves the batch), so every β follows exactly
    the path :func:`nag_solve` gives it alone. The gradient at every iterate is free: u_t = Kα_t is
    carried along, since Kv_t is linear in (u_t, u_{t−1}) and u_{t+1} = Kv_t − ηK∇G(v_t).

    λ_max and λ_min default to :func:`extreme_eigenvalues` (λ_min clipped at 0), the values
    :class:`SpectralSolver` uses, so both follow the same path. K, Y and the evaluation kernels
    are moved to the namespace's device once, here.
    """

    def __init__(self, problem: KernelProblem, namespace: ArrayNamespace = NUMPY, lam_max: float | None = None,
                 lam_min: float | None = None):
        if lam_max is None or lam_min is None:
            top, bottom = extreme_eigenvalues(problem.kernel, namespace=namespace)
            lam_max = top if lam_max is None else lam_max
            lam_min = bottom if lam_min is None else lam_min
        xp = self.xp = namespace
        self.lam_max, self.lam_min = float(lam_max), float(lam_min)
        self.n, self.trace = problem.n, problem.trace
        self.classes = problem.targets.shape[1]
        self.y_norm = np.linalg.norm(problem.targets)
        self.kernel = xp.asarray(problem.kernel)
        self.targets = xp.asarray(problem.targets)[:, None, :]  # (n, 1, C): broadcast over β
        self.eval_kernels = {name: xp.asarray(ke) for name, ke in problem.eval_kernels.items()}
        self.eval_labels = {name: xp.asarray(lab, "int64")[:, None] for name, lab in problem.eval_labels.items()}
        self.eval_targets = eval_targets(xp, problem.eval_labels, self.classes, problem.target_offset)

    def _metrics(self, alpha) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Accuracy and squared loss (:func:`squared_loss`) of every evaluation set for each β of
        ``alpha`` (n, B, C): one GEMM per set."""
        n, b, c = alpha.shape
        flat = alpha.reshape(n, b * c)
        acc, loss = {}, {}
        for name, ke in self.eval_kernels.items():
            scores = (ke @ flat).reshape(ke.shape[0], b, c)
            acc[name] = self.xp.mean_equal(self.xp.argmax(scores, -1), self.eval_labels[name])
            loss[name] = self.xp.mean_square_rows(scores - self.eval_targets[name])
        return acc, loss

    def paths(self, rs: Sequence[float], max_steps: int = 1000, eval_every: int = 10, tol: float = 1e-6,
              momentum: str = "strongly_convex", return_iterates: bool = False):
        """One :class:`SolverRun` per r (and, with ``return_iterates``, the recorded α_t of each,
        as host arrays)."""
        xp, n, C = self.xp, self.n, self.classes
        rs = [float(r) for r in rs]
        B = len(rs)
        betas = np.asarray([ridge_beta(r, self.trace, n) for r in rs])
        etas = 1.0 / (self.lam_max + betas)
        mus = np.stack([momentum_schedule(momentum, max_steps, momentum_coefficient(self.lam_max, self.lam_min, b))
                        for b in betas])  # (B, steps)
        active = list(range(B))  # batch column → index of its r
        beta = xp.asarray(betas.reshape(1, B, 1))
        eta = xp.asarray(etas.reshape(1, B, 1))
        mu_all = xp.asarray(mus.reshape(B, max_steps).T.copy())  # (steps, B): row t, every β
        y = self.targets
        alpha = xp.zeros((n, B, C))
        alpha_prev = xp.zeros((n, B, C))
        u = xp.zeros((n, B, C))  # K α_t
        u_prev = xp.zeros((n, B, C))
        steps = [[] for _ in rs]
        norms = [[] for _ in rs]
        acc: list[dict[str, list[float]]] = [{name: [] for name in self.eval_kernels} for _ in rs]
        loss: list[dict[str, list[float]]] = [{name: [] for name in self.eval_kernels} for _ in rs]
        iterates: list[list[np.ndarray]] = [[] for _ in rs]
        converged = [False] * B
        final = [0] * B
        t = 0
        while t < max_steps and active:
            mu = mu_all[t].reshape(1, len(active), 1)
            v = alpha + mu * (alpha - alpha_prev)
            kv = u + mu * (u - u_prev)
            g = kv + beta * v - y
            alpha_prev, u_prev = alpha, u
            alpha = v - eta * g
            u = kv - eta * (self.kernel @ g.reshape(n, len(active) * C)).reshape(n, len(active), C)
            t += 1
            step_norms = xp.slice_norms(u + beta * alpha - y, axis=1) / self.y_norm
            done = step_norms < tol
            record = [j for j in range(len(active)) if t % eval_every == 0 or done[j] or t == max_steps]
            if record:
                accuracies, losses = self._metrics(alpha)
                for j in record:
                    i = active[j]
                    steps[i].append(t)
                    norms[i].append(float(step_norms[j]))
                    for name in accuracies:
                        acc[i][name].append(float(accuracies[name][j]))
                        loss[i][name].append(float(losses[name][j]))
                    if return_iterates:
                        iterates[i].append(xp.to_numpy(alpha[:, j, :]).copy())
            for j in range(len(active)):
                final[active[j]] = t
                converged[active[j]] = bool(done[j])
            if done.any():  # converged β leave the batch
                keep = [j for j in range(len(active)) if not done[j]]
                active = [active[j] for j in keep]
                if active:
                    alpha, alpha_prev, u, u_prev = (xp.take_rows(x, keep, axis=1) for x in (alpha, alpha_prev, u, u_prev))
                    beta, eta = xp.take_rows(beta, keep, axis=1), xp.take_rows(eta, keep, axis=1)
                    mu_all = xp.take_rows(mu_all, keep, axis=1)
        runs = [_to_host_run(rs[i], float(betas[i]), steps[i], acc[i], norms[i], converged[i], final[i], "nag",
                             loss[i]) for i in range(B)]
        return (runs, iterates) if return_iterates else runs


def nag_solve(problem: KernelProblem, r: float, max_steps: int = 1000, eval_every: int = 10,
              tol: float = 1e-6, momentum: str = "strongly_convex", lam_max: float | None = None,
              lam_min: float | None = None, return_iterates: bool = False, namespace: ArrayNamespace = NUMPY):
    """Iterative NAG on the dual at one β (the faithful reference; one K-product per step): a
    :class:`NagSolver` batch of one.

    λ_max and λ_min default to :func:`extreme_eigenvalues` (λ_min clipped at 0), the same values
    :class:`SpectralSolver` uses, so both follow the same path. Stops when ‖∇G(α_t)‖_F/‖Y‖_F < tol.
    Returns a :class:`SolverRun` (and the recorded iterates α_t when ``return_iterates``).
    """
    solver = NagSolver(problem, namespace, lam_max, lam_min)
    out = solver.paths([r], max_steps, eval_every, tol, momentum, return_iterates)
    if return_iterates:
        runs, iterates = out
        return runs[0], iterates[0]
    return out[0]


def symmetric_eigh(kernel: np.ndarray, vectors: bool = True, dtype: str = "float64"):
    """Eigenvalues (ascending) [and eigenvectors] of a symmetric matrix, computed in ``dtype``.

    torch's LAPACK binding (divide and conquer) is ~2× faster than scipy's default here."""
    import torch

    k = torch.from_numpy(np.ascontiguousarray(kernel, dtype=np.float64))
    if dtype != "float64":
        k = k.to(getattr(torch, dtype))
    if not vectors:
        return torch.linalg.eigvalsh(k).numpy()
    lam, u = torch.linalg.eigh(k)
    return lam.numpy(), u.numpy()


#: Seed of the Lanczos start vector of :func:`extreme_eigenvalues` (a fixed start: same λ every run).
LANCZOS_SEED = 0


def extreme_eigenvalues(kernel: np.ndarray, exact_up_to: int = 8192,
                        namespace: ArrayNamespace = NUMPY) -> tuple[float, float]:
    """(λ_max, max(λ_min, 0)) of a symmetric PSD matrix: LAPACK for n ≤ ``exact_up_to`` (bitwise
    the values :class:`SpectralSolver` gets from its eigh up to round-off), Lanczos (ARPACK) from a
    seeded start vector beyond, its products with K on ``namespace``'s device (one pass over K
    each: on a GPU, K is read at the memory's rate)."""
    n = kernel.shape[0]
    if n <= exact_up_to:
        lam = symmetric_eigh(kernel, vectors=False)
        return float(lam[-1]), float(max(lam[0], 0.0))
    from scipy.sparse.linalg import LinearOperator, eigsh

    v0 = np.random.default_rng(LANCZOS_SEED).standard_normal(n)
    if namespace.is_numpy:
        operator = kernel
    else:
        xp, k = namespace, namespace.asarray(kernel)
        operator = LinearOperator((n, n), matvec=lambda v: xp.to_numpy(k @ xp.asarray(np.ravel(v))), dtype=np.float64)
    lo, hi = sorted(eigsh(operator, k=2, which="BE", return_eigenvectors=False, tol=1e-10, v0=v0))
    return float(hi), float(max(lo, 0.0))


@dataclass
class Spectrum:
    """What the exact NAG path needs of a problem, without K or its eigenvectors.

    For K = UΛUᵀ: the eigenvalues Λ (ascending), c = UᵀY, the projected evaluation kernels
    K_e U, their labels, and tr(K), n, ‖Y‖_F (and the targets' constant, :func:`target_offset`).
    That is O(n·(C + Σ m_e)) numbers instead of K's n²,
    so a sweep trial can receive it (through the object store) and run any β. Host float64 arrays
    whatever the eigh's device and dtype (``eigh_dtype``).
    """

    eigenvalues: np.ndarray
    c: np.ndarray  # (n, C)
    projected: dict[str, np.ndarray]  # name -> K_e U, (m_e, n)
    eval_labels: dict[str, np.ndarray]
    trace: float
    n: int
    y_norm: float
    eigh_dtype: str = "float64"
    target_offset: float = 0.0

    @classmethod
    def of(cls, problem: KernelProblem, namespace: ArrayNamespace = NUMPY, dtype: str = "float64",
           vectors: bool = True) -> tuple["Spectrum", np.ndarray | None]:
        """One ``eigh`` of K in ``dtype`` on ``namespace``'s device: the spectrum and the
        eigenvectors U (a host float64 array; None unless ``vectors``). On a GPU, K_e U and UᵀY
        are formed there in the eigh's dtype, and only the spectrum comes back."""
        if namespace.is_numpy and dtype == "float64":
            lam, u = symmetric_eigh(problem.kernel)
            spectrum = cls(eigenvalues=lam, c=u.T @ problem.targets,
                           projected={name: ke @ u for name, ke in problem.eval_kernels.items()},
                           eval_labels=dict(problem.eval_labels), trace=problem.trace, n=problem.n,
                           y_norm=float(np.linalg.norm(problem.targets)), target_offset=problem.target_offset)
            problem.spectrum = spectrum  # kept for the span analysis (entk_ray.span): no second eigh
            return spectrum, u
        xp = namespace
        lam, u = xp.eigh(problem.kernel, dtype)
        c = u.T @ xp.asarray(problem.targets, dtype)
        projected = {name: xp.to_numpy(xp.asarray(ke, dtype) @ u).astype(np.float64)
                     for name, ke in problem.eval_kernels.items()}
        spectrum = cls(eigenvalues=xp.to_numpy(lam).astype(np.float64), c=xp.to_numpy(c).astype(np.float64),
                       projected=projected, eval_labels=dict(problem.eval_labels), trace=problem.trace,
                       n=problem.n, y_norm=float(np.linalg.norm(problem.targets)), eigh_dtype=dtype,
                       target_offset=problem.target_offset)
        problem.spectrum = spectrum
        host_u = xp.to_numpy(u).astype(np.float64) if vectors else None
        del u
        return spectrum, host_u

    @property
    def lam_max(self) -> float:
        return float(self.eigenvalues[-1])

    @property
    def lam_min(self) -> float:
        """λ_min clipped at 0 (K is PSD; round-off may make its smallest eigenvalue negative)."""
        return float(max(self.eigenvalues[0], 0.0))


class SpectralSolver:
    """The exact NAG path for many β at once, from one eigendecomposition of K.

    Holds a :class:`Spectrum` (Λ, c = UᵀY and K_e U for each evaluation set), so each β costs
    O(n) per step plus one GEMM for all of its evaluations; U itself is needed only to form the
    iterates α_t (:meth:`iterate`). λ_min is clipped at 0. The recurrences run on ``namespace``
    (the spectrum is moved to its device once, on first use); :meth:`paths` advances a batch of β
    together as a (B, n) array.
    """

    def __init__(self, spectrum: Spectrum, eigenvectors: np.ndarray | None = None,
                 namespace: ArrayNamespace = NUMPY):
        self.spectrum = spectrum
        self.eigenvectors = eigenvectors
        self.xp = namespace
        self.c_sq = np.sum(spectrum.c**2, axis=1)  # ‖c_i‖²
        self._device: dict | None = None

    @classmethod
    def from_problem(cls, problem: KernelProblem, namespace: ArrayNamespace = NUMPY,
                     dtype: str = "float64", vectors: bool = True) -> "SpectralSolver":
        """The solver of ``problem``'s K from one eigh; ``vectors=False`` keeps only the spectrum
        (paths and scores need no U: on a GPU, no n × n copy to the host)."""
        spectrum, u = Spectrum.of(problem, namespace, dtype, vectors=vectors)
        return cls(spectrum, u if vectors else None, namespace)

    @property
    def lam_max(self) -> float:
        return self.spectrum.lam_max

    @property
    def lam_min(self) -> float:
        return self.spectrum.lam_min

    def _on_device(self) -> dict:
        if self._device is None:
            xp, sp = self.xp, self.spectrum
            self._device = {"lam": xp.asarray(sp.eigenvalues), "c": xp.asarray(sp.c), "c_sq": xp.asarray(self.c_sq),
                            "projected": {name: xp.asarray(p) for name, p in sp.projected.items()},
                            "labels": {name: xp.asarray(lab, "int64")[:, None] for name, lab in sp.eval_labels.items()},
                            "targets": eval_targets(xp, sp.eval_labels, sp.c.shape[1], sp.target_offset)}
        return self._device

    def _coefficients(self, rs: Sequence[float], max_steps: int, eval_every: int, tol: float, momentum: str):
        """The scalar recurrence for every r at once, as a (B, n) array. Per r: (β, recorded steps,
        a at those steps (device arrays), norms, converged)."""
        xp, sp = self.xp, self.spectrum
        dev = self._on_device()
        lam, c_sq = dev["lam"], dev["c_sq"]
        B = len(rs)
        betas = np.asarray([ridge_beta(r, sp.trace, sp.n) for r in rs])
        etas = 1.0 / (self.lam_max + betas)
        mus = np.stack([momentum_schedule(momentum, max_steps, momentum_coefficient(self.lam_max, self.lam_min, b))
                        for b in betas])
        active = list(range(B))
        beta = xp.asarray(betas[:, None])
        eta = xp.asarray(etas[:, None])
        mu_all = xp.asarray(mus.T.copy())  # (steps, B)
        shrink = 1.0 - eta * (lam + beta)  # (B, n)
        a = xp.zeros((B, sp.n))
        a_prev = xp.zeros((B, sp.n))
        steps, coefs, norms = [[] for _ in rs], [[] for _ in rs], [[] for _ in rs]
        converged = [False] * B
        t = 0
        while t < max_steps and active:
            w = a + mu_all[t][:, None] * (a - a_prev)
            a_prev = a
            a = shrink * w + eta
            t += 1
            step_norms = np.sqrt(xp.row_dots(((lam + beta) * a - 1.0) ** 2, c_sq)) / sp.y_norm
            done = step_norms < tol
            for j, i in enumerate(active):
                converged[i] = bool(done[j])
                if t % eval_every == 0 or done[j] or t == max_steps:
                    steps[i].append(t)
                    coefs[i].append(a[j])
                    norms[i].append(float(step_norms[j]))
            if done.any():
                keep = [j for j in range(len(active)) if not done[j]]
                active = [active[j] for j in keep]
                if active:
                    a, a_prev, shrink = (xp.take_rows(x, keep) for x in (a, a_prev, shrink))
                    beta, eta = xp.take_rows(beta, keep), xp.take_rows(eta, keep)
                    mu_all = xp.take_rows(mu_all, keep, axis=1)
        return [(float(betas[i]), steps[i], coefs[i], norms[i], converged[i]) for i in range(B)]

    def coefficients(self, r: float, max_steps: int, eval_every: int, tol: float,
                     momentum: str = "strongly_convex"):
        """Run the scalar recurrence; returns (β, recorded steps, a at those steps, norms, converged),
        host arrays."""
        beta, steps, coefs, norms, converged = self._coefficients([r], max_steps, eval_every, tol, momentum)[0]
        return (beta, np.asarray(steps), self.xp.to_numpy(self.xp.stack(coefs)), np.asarray(norms),
                bool(converged))

    def paths(self, rs: Sequence[float], max_steps: int = 1000, eval_every: int = 10, tol: float = 1e-6,
              momentum: str = "strongly_convex") -> list[SolverRun]:
        """One :class:`SolverRun` per r, the recurrences of all r advanced together."""
        xp = self.xp
        dev = self._on_device()
        c = dev["c"]
        runs = []
        for r, (beta, steps, coefs, norms, converged) in zip(rs, self._coefficients(rs, max_steps, eval_every, tol,
                                                                                     momentum)):
            coefs = xp.stack(coefs)
            n_steps, n_classes = coefs.shape[0], c.shape[1]
            # scores[:, t] = (K_e U)(a_t ⊙ c) for every recorded t: one GEMM with an (n, T·C) right side
            weights = (coefs.T[:, :, None] * c[:, None, :]).reshape(c.shape[0], n_steps * n_classes)
            acc, loss = {}, {}
            for name, proj in dev["projected"].items():
                scores = (proj @ weights).reshape(proj.shape[0], n_steps, n_classes)
                acc[name] = xp.mean_equal(xp.argmax(scores, -1), dev["labels"][name])
                loss[name] = xp.mean_square_rows(scores - dev["targets"][name])
            runs.append(_to_host_run(r, beta, steps, acc, norms, converged, int(steps[-1]), "spectral", loss))
        return runs

    def path(self, r: float, max_steps: int = 1000, eval_every: int = 10, tol: float = 1e-6,
             momentum: str = "strongly_convex") -> SolverRun:
        return self.paths([r], max_steps, eval_every, tol, momentum)[0]

    def scores_at(self, r: float, step: int, tol: float = 1e-6, momentum: str = "strongly_convex") -> dict[str, np.ndarray]:
        """(K_e α_t) for every evaluation set at ridge r after ``step`` steps (or at convergence, if
        earlier), computed as (K_e U)(a_t ⊙ c) like :meth:`path` (host arrays)."""
        _, steps, coefs, _, _ = self.coefficients(r, step, step, tol, momentum)
        weights = coefs[-1][:, None] * self.spectrum.c
        return {name: proj @ weights for name, proj in self.spectrum.projected.items()}

    def iterate(self, coefficients: np.ndarray) -> np.ndarray:
        """α = U (a ⊙ c) for one recorded coefficient vector (needs the eigenvectors)."""
        if self.eigenvectors is None:
            raise ValueError("this SpectralSolver was built from a Spectrum without eigenvectors: "
                             "use SpectralSolver.from_problem to form iterates")
        return self.eigenvectors @ (np.asarray(coefficients)[:, None] * self.spectrum.c)


# --------------------------------------------------------------------------------------------
# Where the solver runs, and what float32 eigh costs in accuracy
# --------------------------------------------------------------------------------------------
def solver_namespace(settings: SolverSettings) -> ArrayNamespace:
    """The array namespace of ``settings.device`` in this process (see :func:`entk_ray.arrays.namespace_for`)."""
    return namespace_for(settings.device)


def round_runner(problem: KernelProblem, settings: SolverSettings,
                 namespace: ArrayNamespace | None = None) -> Callable[[list[float]], list[SolverRun]]:
    """``run(rs) -> [SolverRun]`` for one round of r values, with the one-off work (the eigh, or
    λ_max/λ_min and K on the device) done once, up front.

    On numpy each r runs alone (the results the CPU always gave); on torch (a GPU) all r of the
    round run as one batch: for NAG one pass over K per step for every β."""
    s = settings
    xp = namespace or solver_namespace(s)
    if s.method == "spectral":
        solver = SpectralSolver.from_problem(problem, xp, s.dtype, vectors=False)
    elif s.method == "nag":
        if s.dtype != "float64":
            raise ValueError(f"the NAG solver runs in float64, got solver.dtype={s.dtype!r}")
        lam_max, lam_min = extreme_eigenvalues(problem.kernel, namespace=xp)
        solver = NagSolver(problem, xp, lam_max, lam_min)
    else:
        raise ValueError(f"solver method must be 'spectral' or 'nag', got {s.method!r}")
    return batch_caller(solver, s, xp.is_numpy)


def batch_caller(solver, settings: SolverSettings, one_at_a_time: bool) -> Callable[[list[float]], list[SolverRun]]:
    """``solver.paths`` for a round of r values: r by r, or as one batch."""
    s = settings

    def run(rs: list[float]) -> list[SolverRun]:
        if one_at_a_time:
            return [run for r in rs for run in solver.paths([r], s.max_steps, s.eval_every, s.tol, s.momentum)]
        return solver.paths(list(rs), s.max_steps, s.eval_every, s.tol, s.momentum) if rs else []

    return run


def subproblem(problem: KernelProblem, rows: int) -> KernelProblem:
    """The problem on the first ``rows`` training examples: K's leading principal block (PSD),
    the same columns of every K_e, the same targets' rows."""
    if rows >= problem.n:
        return problem
    return KernelProblem(problem.kernel[:rows, :rows], problem.targets[:rows],
                         {name: ke[:, :rows] for name, ke in problem.eval_kernels.items()},
                         dict(problem.eval_labels), problem.select_on, problem.id_name)


def float32_eigh_error(problem: KernelProblem, settings: SolverSettings = SolverSettings(),
                       rs: Sequence[float] | None = None, sample: int = 2048,
                       namespace: ArrayNamespace = NUMPY) -> dict:
    """The accuracy of the spectral path from a **float32** eigh against float64 NAG, measured on
    ``problem`` (its first ``sample`` training examples when larger), for the results file.

    For each r (default: ``settings.r_grid``, round 0) both solvers run ``settings``' path; the
    report has, per r and overall, the largest difference of any recorded accuracy, whether the
    recorded steps agree, and the relative error ‖α₃₂ − α₆₄‖_F/‖α₆₄‖_F of the last iterate; and the
    early-stopping choice (r, step, selection accuracy) of each over these r. Both run on
    ``namespace`` (float64 NAG: one batch of every r when it is a GPU)."""
    sub = subproblem(problem, sample)
    rs = [float(r) for r in (settings.r_grid if rs is None else rs)]
    s = settings
    spectral = SpectralSolver.from_problem(sub, namespace, "float32")
    eig64 = symmetric_eigh(sub.kernel, vectors=False)  # NAG's λ_max/λ_min and the eigenvalues' reference
    lam_max, lam_min = float(eig64[-1]), float(max(eig64[0], 0.0))
    reference, iterates = NagSolver(sub, namespace, lam_max, lam_min).paths(
        rs, s.max_steps, s.eval_every, s.tol, s.momentum, return_iterates=True)
    per_r, worst = [], 0.0
    runs32 = []
    for r, ref, alphas in zip(rs, reference, iterates):
        _, _, coefs, _, _ = spectral.coefficients(r, s.max_steps, s.eval_every, s.tol, s.momentum)
        run = spectral.path(r, s.max_steps, s.eval_every, s.tol, s.momentum)
        runs32.append(run)
        common = min(len(run.steps), len(ref.steps))
        diff = max(float(np.max(np.abs(run.accuracy[name][:common] - ref.accuracy[name][:common])))
                   for name in ref.accuracy)
        alpha32 = spectral.iterate(coefs[common - 1])
        alpha64 = alphas[common - 1]
        scale = float(np.linalg.norm(alpha64))
        per_r.append({"r": r, "max_accuracy_diff": diff, "same_steps": bool(np.array_equal(run.steps, ref.steps)),
                      "alpha_rel_error": float(np.linalg.norm(alpha32 - alpha64) / scale) if scale else 0.0,
                      "step": int(run.steps[common - 1])})
        worst = max(worst, diff)

    def choice(runs: list[SolverRun]) -> dict:
        best = max(runs, key=lambda run: (float(np.max(run.accuracy[sub.select_on])), -runs.index(run)))
        i = best.best_index(sub.select_on)
        return {"r": best.r, "step": int(best.steps[i]), "accuracy": float(best.accuracy[sub.select_on][i])}

    return {"n": sub.n, "eigh_dtype": "float32", "reference": "nag float64", "rs": rs,
            "max_accuracy_diff": worst, "per_r": per_r,
            "eigenvalue_rel_error": float(np.max(np.abs(spectral.spectrum.eigenvalues - eig64)) / abs(eig64[-1])),
            "early_stopping": {"float32": choice(runs32), "float64": choice(reference)}}


# --------------------------------------------------------------------------------------------
# The telescopic β search
# --------------------------------------------------------------------------------------------
#: What breaks a tie on selection accuracy, for the eNTK (squared loss of K_e α against the one-hot
#: targets) and for the linear probe (its cross-entropy): the lower loss on the selection set wins.
TIE_BREAK = "lowest loss on the selection set"

log = logging.getLogger(__name__)


def zoom_grid(center_r: float, width_decades: float, points: int) -> list[float]:
    """``points`` values of r log-spaced over ``width_decades`` decades centred on ``center_r``."""
    c = math.log10(center_r)
    return [10.0**x for x in np.linspace(c - width_decades / 2, c + width_decades / 2, points)]


def selection_score(run: SolverRun, select_on: str) -> float:
    """The quality of a β: its best early-stopped selection accuracy."""
    return float(np.max(run.accuracy[select_on]))


def selection_key(run: SolverRun, select_on: str) -> tuple[float, float]:
    """(best selection accuracy, −selection loss at that step): larger is better, so ties on
    accuracy go to the lower loss (:data:`TIE_BREAK`)."""
    loss = _loss_of(run, select_on)
    index = best_point_index(run.accuracy[select_on], loss)
    return float(run.accuracy[select_on][index]), (-float(loss[index]) if loss is not None else 0.0)


def best_run(runs: Sequence[SolverRun], select_on: str) -> SolverRun:
    """The run with the best :func:`selection_key` (the first such run on exact ties)."""
    best = runs[0]
    for run in runs[1:]:
        if selection_key(run, select_on) > selection_key(best, select_on):
            best = run
    return best


@dataclass(frozen=True)
class SearchLimits:
    """The r range the search may explore: ``r_grid`` widened by ``max_extensions`` grid steps on
    each side, a step being the grid's own log spacing at that edge (one decade by default)."""

    lower: float
    upper: float
    lower_step_decades: float
    upper_step_decades: float

    def contains(self, r: float) -> bool:
        return self.lower * (1 - 1e-9) <= r <= self.upper * (1 + 1e-9)


def search_limits(r_grid: Sequence[float], max_extensions: int) -> SearchLimits:
    grid = sorted(float(r) for r in r_grid)
    low_step = math.log10(grid[1] / grid[0]) if len(grid) > 1 else 1.0
    high_step = math.log10(grid[-1] / grid[-2]) if len(grid) > 1 else 1.0
    return SearchLimits(grid[0] * 10.0 ** (-low_step * max_extensions), grid[-1] * 10.0 ** (high_step * max_extensions),
                        low_step, high_step)


def _extension(runs: Sequence[SolverRun], best: SolverRun, limits: SearchLimits) -> list[float]:
    """Grid-spaced r values past the explored edge the best r sits on, up to the limit ([] if none)."""
    explored = [run.r for run in runs]
    lowest, highest = min(explored), max(explored)
    if _key(best.r) == _key(lowest):
        step, sign, edge = limits.lower_step_decades, -1.0, lowest
    elif _key(best.r) == _key(highest):
        step, sign, edge = limits.upper_step_decades, 1.0, highest
    else:
        return []
    values = []
    for i in range(1, 10_000):
        r = edge * 10.0 ** (sign * step * i)
        if not limits.contains(r):
            break
        values.append(r)
    return values


def telescopic_search(run_round: Callable[[list[float], int], list[SolverRun]], r_grid: Sequence[float],
                      rounds: int, points_per_round: int, select_on: str, *, max_extensions: int = 3,
                      progress: bool = True) -> list[SolverRun]:
    """Sweep r over ``r_grid``, then zoom ``rounds − 1`` times around the best r so far with a
    log-space grid half as wide each round. ``run_round(rs, round)`` evaluates a list of r (a
    Ray Tune round, or a local loop) and returns one :class:`SolverRun` per r; ``round`` counts
    the calls. Every run is returned (already-evaluated r values are not run twice).

    The best r is the one with the highest early-stopped selection accuracy, ties going to the
    lower selection loss (:func:`selection_key`). When, after a round, the best r is the smallest
    (largest) value evaluated so far, the search does not stop at that wall: it evaluates r past it,
    at the grid's own spacing, down (up) to :func:`search_limits` (``max_extensions`` grid steps past
    ``r_grid``) in one extra round, and logs that. Zoom rounds stay inside the same limits.
    """
    from entk_ray.progress import progress_bar

    grid = sorted({_key(r): float(r) for r in r_grid}.values())
    limits = search_limits(grid, max_extensions)
    width = math.log10(grid[-1] / grid[0]) if len(grid) > 1 else 2.0
    runs: list[SolverRun] = []
    seen: set[float] = set()
    calls = 0
    bar = progress_bar(total=rounds, desc="β search", unit="round", enabled=progress, rate=False)

    def evaluate(rs: list[float], stage: str) -> None:
        nonlocal calls
        todo = [r for r in rs if _key(r) not in seen]
        if not todo:
            return
        for run in run_round(todo, calls):
            run.round, run.stage = calls, stage
            runs.append(run)
            seen.add(_key(run.r))
        calls += 1
        best = best_run(runs, select_on)
        bar.set_postfix_str(f"{len(runs)} r values, best r={best.r:.3g} ({select_on} "
                            f"{100 * selection_key(best, select_on)[0]:.1f}%)")
        bar.update(0 if stage == "extension" else 1)

    def extend() -> None:
        while True:
            best = best_run(runs, select_on)
            values = _extension(runs, best, limits)
            if not values:
                return
            side = "lower" if values[0] < best.r else "upper"
            log.info("β search: the best r so far, %.3g, is the %s edge of the values tried; extending to %s "
                     "(limit: solver.max_extensions = %d grid steps past solver.r_grid)", best.r, side,
                     ", ".join(f"{r:.3g}" for r in values), max_extensions)
            bar.set_postfix_str(f"best r={best.r:.3g} on the {side} edge: extending to {values[-1]:.3g}")
            evaluate(values, "extension")

    try:
        evaluate(grid, "grid")
        extend()
        for _ in range(rounds - 1):
            width /= 2.0
            center = best_run(runs, select_on).r
            evaluate([r for r in zoom_grid(center, width, points_per_round) if limits.contains(r)], "zoom")
            extend()
    finally:
        bar.close()
    return runs


def _key(r: float) -> float:
    return float(f"{r:.10e}")


def search_summary(runs: Sequence[SolverRun], r_grid: Sequence[float], max_extensions: int,
                   select_on: str) -> dict:
    """What the search explored and whether it stopped at a wall, for the results and the log.

    ``extended`` lists the r values evaluated past ``r_grid`` because the best r sat on an edge;
    ``at_limit`` is ``"lower"``/``"upper"`` when the chosen r is still the extreme value tried and
    that value is the limit (a wider search might do better), else None.
    """
    limits = search_limits(r_grid, max_extensions)
    best = best_run(runs, select_on)
    explored = sorted(run.r for run in runs)
    extended = sorted(run.r for run in runs if run.stage == "extension")
    at_limit = None
    if _key(best.r) == _key(explored[0]) and not limits.contains(best.r * 10.0 ** -limits.lower_step_decades):
        at_limit = "lower"
    elif _key(best.r) == _key(explored[-1]) and not limits.contains(best.r * 10.0 ** limits.upper_step_decades):
        at_limit = "upper"
    grid = sorted(float(r) for r in r_grid)
    parts = [f"{len(runs)} values of r in [{explored[0]:.3g}, {explored[-1]:.3g}]"]
    if extended:
        below = [r for r in extended if r < grid[0]]
        above = [r for r in extended if r > grid[-1]]
        where = " and ".join(w for w in (f"below {grid[0]:.3g} (to {below[0]:.3g})" if below else "",
                                         f"above {grid[-1]:.3g} (to {above[-1]:.3g})" if above else "") if w)
        parts.append(f"extended {where} because the best r sat on the edge of the values tried")
    if at_limit:
        parts.append(f"the chosen r = {best.r:.3g} is at the {at_limit} limit of the search "
                     f"(solver.max_extensions = {max_extensions}): widen solver.r_grid or raise "
                     "solver.max_extensions to look further")
    return {"r_grid": grid, "max_extensions": int(max_extensions), "limits": [limits.lower, limits.upper],
            "explored": [explored[0], explored[-1]], "values": len(runs), "extended": extended,
            "best_r": best.r, "at_limit": at_limit, "message": "; ".join(parts)}


# --------------------------------------------------------------------------------------------
# Summaries: the table's eNTK rows
# --------------------------------------------------------------------------------------------
@dataclass
class Choice:
    """A selected (β, step) and its accuracies on every evaluation set; ``tied`` counts the
    candidates that shared the best selection accuracy (broken by :data:`TIE_BREAK`)."""

    method: str
    r: float
    beta: float
    step: int
    accuracy: dict[str, float]
    converged: bool | None = None
    tied: int = 1
    # the loss is round-off-sensitive (BLAS, thread count): equal choices are the same point
    selection_loss: float | None = field(default=None, compare=False)


def choose_early_stopping(runs: Sequence[SolverRun], select_on: str) -> Choice:
    """Best (β, step) by selection accuracy over all runs and recorded steps; ties go to the
    lowest selection loss, then to the earliest run and step."""
    best = max(float(np.max(run.accuracy[select_on])) for run in runs)
    candidates = [(run, int(i)) for run in runs for i in np.flatnonzero(run.accuracy[select_on] == best)]
    run, index = min(candidates, key=lambda c: _candidate_loss(c[0], select_on, c[1]))
    return _choice("eNTK (early stopping)", run, index, select_on, len(candidates), converged=None)


def choose_converged(runs: Sequence[SolverRun], select_on: str) -> Choice:
    """Best β by the selection accuracy of its final iterate (converged or at max_steps); ties go
    to the lowest selection loss there, then to the earliest run."""
    best = max(float(run.accuracy[select_on][-1]) for run in runs)
    candidates = [run for run in runs if float(run.accuracy[select_on][-1]) == best]
    run = min(candidates, key=lambda run: _candidate_loss(run, select_on, len(run.steps) - 1))
    return _choice("eNTK (converged)", run, len(run.steps) - 1, select_on, len(candidates), converged=run.converged)


def _candidate_loss(run: SolverRun, select_on: str, index: int) -> float:
    loss = _loss_of(run, select_on)
    return float(loss[index]) if loss is not None else 0.0


def _choice(method: str, run: SolverRun, index: int, select_on: str, tied: int, converged: bool | None) -> Choice:
    loss = _loss_of(run, select_on)
    return Choice(method, run.r, run.beta, int(run.steps[index]),
                  {name: float(acc[index]) for name, acc in run.accuracy.items()}, converged=converged,
                  tied=tied, selection_loss=None if loss is None else float(loss[index]))


def solve_sweep(problem: KernelProblem, settings: SolverSettings = SolverSettings(),
                progress: bool = True) -> list[SolverRun]:
    """The telescopic search run in this process (the Ray layer runs rounds as Tune trials), on
    ``settings.device`` (see :func:`round_runner`)."""
    run_round = round_runner(problem, settings)
    return telescopic_search(lambda rs, _round: run_round(rs), settings.r_grid, settings.rounds,
                             settings.points_per_round, problem.select_on, max_extensions=settings.max_extensions,
                             progress=progress)


def predictions_at(problem: KernelProblem, r: float, step: int, settings: SolverSettings,
                   solver: SpectralSolver | None = None) -> dict[str, np.ndarray]:
    """argmax_c (K_e α_t)_c for every evaluation set at ridge r after ``step`` steps: the per-example
    predictions behind a chosen point of the sweep (for confidence intervals).

    ``spectral`` recomputes the exact path from one eigh of K (pass ``solver`` to reuse one);
    ``nag`` reruns the iterative solver for ``step`` steps. Both on ``settings.device`` (``cuda``
    as ``auto`` here: this process may be a driver without a GPU) in ``settings.dtype``.
    """
    if step < 1:
        raise ValueError(f"step must be a positive integer, got {step}")
    xp = namespace_for("cpu" if settings.device == "cpu" else "auto")
    if settings.method == "spectral":
        solver = solver or SpectralSolver.from_problem(problem, xp, settings.dtype, vectors=False)
        scores = solver.scores_at(r, step, settings.tol, settings.momentum)
    elif settings.method == "nag":
        lam_max, lam_min = extreme_eigenvalues(problem.kernel, namespace=xp)
        _, iterates = nag_solve(problem, r, step, step, settings.tol, settings.momentum, lam_max=lam_max,
                                lam_min=lam_min, return_iterates=True, namespace=xp)
        scores = {name: ke @ iterates[-1] for name, ke in problem.eval_kernels.items()}
    else:
        raise ValueError(f"solver method must be 'spectral' or 'nag', got {settings.method!r}")
    return {name: np.argmax(s, axis=-1) for name, s in scores.items()}
