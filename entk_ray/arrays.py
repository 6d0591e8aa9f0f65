"""Array namespaces: the solvers' math written once, run on numpy (CPU) or torch (CPU or CUDA).

The solvers (:mod:`entk_ray.solvers`) use only Python operators (``+ - * / @ **``, slicing,
``reshape``, ``.T``), which numpy arrays and torch tensors share, plus the few calls below, which
differ between the two libraries. An :class:`ArrayNamespace` is that small explicit backend: a
library, a device and the working float dtype. The array API standard (``array_api_compat``)
covers the same ground; it is not a dependency of this project, and the solvers need a dozen calls,
so they are spelled out here.

Two rules keep results reproducible:

* every reduction that decides something (a norm compared with a tolerance, an accuracy) is
  computed the way the numpy code always computed it — ``np.linalg.norm`` of each slice,
  ``np.dot`` of each row, ``np.mean`` of booleans — so a one-β run on :data:`NUMPY` is bitwise the
  run the solvers gave before they ran on a namespace;
* host ↔ device transfers of large matrices go row chunk by row chunk, so a float64 K can be
  sent to the GPU as float32 without a second full-size float64 copy there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Rows per host → device transfer: 256 MB of float64 rows at n = 131,072 columns.
TRANSFER_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ArrayNamespace:
    """``library`` (``numpy`` or ``torch``) on ``device`` (``cpu``, ``cuda``, ``cuda:1``)."""

    library: str = "numpy"
    device: str = "cpu"

    def __post_init__(self):
        if self.library not in ("numpy", "torch"):
            raise ValueError(f"array library must be 'numpy' or 'torch', got {self.library!r}")
        if self.library == "numpy" and self.device != "cpu":
            raise ValueError(f"numpy arrays live on the CPU, not on {self.device!r}")

    # ---------------------------------------------------------------- identity
    @property
    def is_numpy(self) -> bool:
        return self.library == "numpy"

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def __str__(self) -> str:
        return "numpy" if self.is_numpy else f"torch ({self.device})"

    def _torch_dtype(self, dtype: str):
        import torch

        return {"float64": torch.float64, "float32": torch.float32, "int64": torch.int64}[dtype]

    # ---------------------------------------------------------------- creation and transfer
    def asarray(self, x: Any, dtype: str = "float64"):
        """``x`` (numpy or a Python sequence) as this namespace's array in ``dtype``; large 2-D
        arrays are sent to a GPU in row chunks and cast there."""
        if self.is_numpy:
            return np.asarray(x, dtype=dtype)
        import torch

        target = self._torch_dtype(dtype)
        if isinstance(x, torch.Tensor):
            return x.to(device=self.device, dtype=target)
        host = np.asarray(x)
        if not self.on_gpu or host.ndim != 2 or host.nbytes <= TRANSFER_BYTES:
            return torch.as_tensor(host, device=self.device).to(target)
        out = torch.empty(host.shape, dtype=target, device=self.device)
        rows = max(1, TRANSFER_BYTES // max(1, host.shape[1] * host.itemsize))
        for start in range(0, host.shape[0], rows):
            chunk = torch.from_numpy(np.ascontiguousarray(host[start:start + rows]))
            out[start:start + rows] = chunk.to(self.device, non_blocking=False).to(target)
        return out

    def zeros(self, shape: tuple[int, ...], dtype: str = "float64"):
        if self.is_numpy:
            return np.zeros(shape, dtype=dtype)
        import torch

        return torch.zeros(shape, dtype=self._torch_dtype(dtype), device=self.device)

    def to_numpy(self, x) -> np.ndarray:
        """A host numpy copy (numpy arrays are returned as they are)."""
        if isinstance(x, np.ndarray):
            return x
        return x.detach().to("cpu").numpy()

    def stack(self, arrays: list):
        if self.is_numpy:
            return np.asarray(arrays)
        import torch

        return torch.stack(arrays)

    def take_rows(self, x, rows: list[int], axis: int = 0):
        """``x`` restricted to the given indices along ``axis`` (a copy)."""
        if self.is_numpy:
            return np.take(x, rows, axis=axis)
        import torch

        return torch.index_select(x, axis, torch.as_tensor(rows, device=x.device))

    # ---------------------------------------------------------------- reductions
    def argmax(self, x, axis: int):
        if self.is_numpy:
            return np.argmax(x, axis=axis)
        return x.argmax(dim=axis)

    def mean_equal(self, predicted, labels, axis: int = 0) -> np.ndarray:
        """Fraction of equal entries along ``axis`` (float64 on the host): an accuracy."""
        if self.is_numpy:
            return np.mean(predicted == labels, axis=axis)
        counts = self.to_numpy((predicted == labels).sum(dim=axis))
        return counts / predicted.shape[axis]

    def slice_norms(self, x, axis: int) -> np.ndarray:
        """The Frobenius norm of each slice ``x[..., i, ...]`` along ``axis`` (float64 on the host)."""
        if self.is_numpy:
            moved = np.moveaxis(x, axis, 0)
            return np.asarray([np.linalg.norm(moved[i]) for i in range(moved.shape[0])])
        import torch

        dims = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
        return self.to_numpy(torch.linalg.vector_norm(x, dim=dims)).astype(np.float64)

    def mean_square_rows(self, diff) -> np.ndarray:
        """mean_i ‖diff[i, j, :]‖² for each j of an (m, B, C) array (float64 on the host): a
        squared loss per β or per step, as :func:`entk_ray.solvers.squared_loss` computes it."""
        if self.is_numpy:
            return np.mean(np.sum(diff**2, axis=-1), axis=0)
        return self.to_numpy((diff**2).sum(-1).mean(0)).astype(np.float64)

    def row_dots(self, x, w) -> np.ndarray:
        """``x[i] · w`` for each row i of a 2-D ``x`` (float64 on the host)."""
        if self.is_numpy:
            return np.asarray([float(np.dot(row, w)) for row in x])
        return self.to_numpy(x @ w).astype(np.float64)

    # ---------------------------------------------------------------- linear algebra
    def eigh(self, matrix, dtype: str = "float64"):
        """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, computed in ``dtype``,
        as this namespace's arrays. On numpy this is torch's LAPACK binding on the CPU (divide and
        conquer, ~2× faster than scipy's default here)."""
        import torch

        if self.is_numpy:
            k = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float64)).to(self._torch_dtype(dtype))
            lam, u = torch.linalg.eigh(k)
            return lam.numpy(), u.numpy()
        k = self.asarray(matrix, dtype)
        lam, u = torch.linalg.eigh(k)
        del k
        return lam, u

    def memory_bytes(self) -> float:
        """Total memory of this namespace's GPU (0 for the CPU)."""
        if not self.on_gpu:
            return 0.0
        import torch

        return float(torch.cuda.get_device_properties(torch.device(self.device)).total_memory)


#: numpy on the CPU: the reference namespace.
NUMPY = ArrayNamespace()


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def namespace_for(device: str) -> ArrayNamespace:
    """The namespace for a solver device setting: ``cpu`` → numpy; ``cuda`` → torch on the GPU
    (an error when this process has none); ``auto`` → torch on the GPU when this process sees one,
    else numpy. ``torch`` / ``torch-cpu`` → torch on the CPU (for tests and comparisons)."""
    if device == "cpu":
        return NUMPY
    if device in ("torch", "torch-cpu"):
        return ArrayNamespace("torch", "cpu")
    if device == "auto":
        return ArrayNamespace("torch", "cuda") if cuda_available() else NUMPY
    if device.startswith("cuda"):
        if not cuda_available():
            raise RuntimeError(f"solver.device={device!r} but this process sees no CUDA GPU "
                               "(use solver.device=auto or cpu, or run where a GPU is visible)")
        return ArrayNamespace("torch", device)
    raise ValueError(f"solver device must be cpu, cuda or auto, got {device!r}")
