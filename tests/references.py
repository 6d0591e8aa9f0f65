"""Reference implementations and small problems shared by several test files."""
import numpy as np
import torch

from entk_ray.solvers import make_problem


def autograd_loop(model, subset, x):
    """Reference features: one autograd.grad per example, then S's coordinates (zeros for a
    parameter the output does not depend on)."""
    params = dict(model.named_parameters())
    local = subset.per_parameter()
    names = [n for n in subset.names if n in local]
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[i:i + 1]).sum(), [params[n] for n in names], allow_unused=True)
        grads = [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)]
        rows.append(torch.cat([g.reshape(-1)[local[n]] for n, g in zip(names, grads)]))
    return torch.stack(rows)


def random_problem(n=60, m=30, classes=3, seed=0):
    """K = XXᵀ of three noisy classes, an ID and a noisier OOD evaluation set (seeded)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12))
    y = rng.integers(0, classes, n)
    x[np.arange(n), y] += 2.0
    xe = rng.normal(size=(m, 12))
    ye = rng.integers(0, classes, m)
    xe[np.arange(m), ye] += 2.0
    xo = rng.normal(size=(m, 12)) * 1.5
    yo = rng.integers(0, classes, m)
    xo[np.arange(m), yo] += 1.0
    return make_problem(x @ x.T, y, {"id_val": xe @ x.T, "ood:o": xo @ x.T}, {"id_val": ye, "ood:o": yo}, classes)


def assert_accuracies_close(got: np.ndarray, want: np.ndarray, examples: int, what: str = "") -> None:
    """Accuracy curves computed by two code paths (another BLAS, thread count, process or solver)
    agree up to one example: an accuracy counts argmaxes of scores that agree to round-off, and
    one example may sit on a tie that round-off breaks either way."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1.0 / examples + 1e-12, err_msg=what)


def span_fractions_direct(kernel: np.ndarray, cross: np.ndarray, self_kernel: np.ndarray, epsilon: float) -> np.ndarray:
    """entk_ray.span.span_fractions from a linear solve (O(n³)): 1 − k_eᵀ(K + εI)⁻¹k_e / k(x, x)."""
    n = kernel.shape[0]
    solved = np.linalg.solve(kernel + epsilon * np.eye(n), cross.T)  # (n, m)
    return 1.0 - np.einsum("mn,nm->m", cross, solved) / self_kernel
