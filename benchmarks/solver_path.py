"""Iterative NAG per β (as one sweep trial each) vs the exact spectral path for the whole grid.

n train, m evaluation rows, C classes, 9 values of β, 1000 NAG steps, accuracy every 10 steps,
float64, on a synthetic PSD kernel. Both must give the same accuracies (asserted). Prints the
median time of each over --repeats runs and, last, ``ratio: <iterative / spectral>``.

    python benchmarks/solver_path.py            # n=2000, m=1000, C=10
    python benchmarks/solver_path.py --quick    # a smaller problem for a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from entk_ray.solvers import SpectralSolver, extreme_eigenvalues, make_problem, nag_solve


def synthetic_kernel_problem(n: int, m: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    width = 2 * n
    centers = rng.normal(size=(classes, width)) / np.sqrt(width)
    labels = rng.integers(0, classes, size=n + m)
    x = centers[labels] + rng.normal(size=(n + m, width)) / np.sqrt(width) * 3.0
    x *= rng.uniform(0.5, 1.5, size=(1, width))  # a non-flat spectrum
    k = x[:n] @ x[:n].T
    half = m // 2
    evals = {"id_val": x[n:n + half] @ x[:n].T, "ood:synthetic": x[n + half:] @ x[:n].T}
    labs = {"id_val": labels[n:n + half], "ood:synthetic": labels[n + half:]}
    return make_problem(k, labels[:n], evals, labs, classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--betas", type=int, default=9)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n=400, m=200, 200 steps, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.n, args.m, args.steps, args.repeats = 400, 200, 200, 1

    problem = synthetic_kernel_problem(args.n, args.m, args.classes)
    rs = [10.0**k for k in np.linspace(-6, 2, args.betas)]
    tol = 0.0  # run every step: the benchmark compares equal work

    def iterative():
        # As a sweep trial would: each run finds its own step size and momentum (λ_max, λ_min).
        return [nag_solve(problem, r, args.steps, args.eval_every, tol) for r in rs]

    def iterative_shared_eigenvalues():
        lam_max, lam_min = extreme_eigenvalues(problem.kernel)
        return [nag_solve(problem, r, args.steps, args.eval_every, tol, lam_max=lam_max, lam_min=lam_min)
                for r in rs]

    def spectral():
        solver = SpectralSolver.from_problem(problem)
        return [solver.path(r, args.steps, args.eval_every, tol) for r in rs]

    times = {"iterative": [], "iterative_shared": [], "spectral": []}
    for _ in range(args.repeats):
        for name, fn in (("spectral", spectral), ("iterative", iterative),
                         ("iterative_shared", iterative_shared_eigenvalues)):
            start = time.perf_counter()
            runs = fn()
            times[name].append(time.perf_counter() - start)
            if name == "spectral":
                spectral_runs = runs
            else:
                for a, b in zip(runs, spectral_runs):
                    for key in a.accuracy:
                        assert np.array_equal(a.accuracy[key], b.accuracy[key]), (a.r, key)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"n={args.n} m={args.m} C={args.classes} betas={args.betas} steps={args.steps} "
          f"eval_every={args.eval_every} repeats={args.repeats}")
    print(f"iterative NAG, one run per β: median {med['iterative']:.2f}s  {['%.2f' % t for t in times['iterative']]}")
    print(f"iterative NAG, λ shared by all β: median {med['iterative_shared']:.2f}s "
          f"(ratio to spectral {med['iterative_shared'] / med['spectral']:.2f})")
    print(f"spectral path, whole grid:    median {med['spectral']:.2f}s  {['%.2f' % t for t in times['spectral']]}")
    print("same accuracies at every recorded step: yes")
    print(f"ratio: {med['iterative'] / med['spectral']:.2f}")


if __name__ == "__main__":
    main()
