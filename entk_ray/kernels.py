"""eNTK kernels from feature blocks.

The train kernel is K = Φ Φᵀ (n×n) and each evaluation set e has K_e = Φ_e Φᵀ (m_e×n). Both are
assembled from Gram blocks ``K_ij = Φ_i Φ_jᵀ`` of row shards, which is how the Ray layer
distributes them: a block is a pure function of two shards. Φ may be stored in float32 or
float16/bfloat16; blocks are upcast to ``compute_dtype`` (float64 by default, at least float32)
before the product, and the assembled kernels are float64 for solving.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def gram_block(phi_a: torch.Tensor, phi_b: torch.Tensor, compute_dtype: str = "float64",
               column_chunk: int = 65536) -> np.ndarray:
    """``Φ_a Φ_bᵀ`` accumulated in ``compute_dtype``, returned as a float64 numpy array.

    The feature dimension is processed ``column_chunk`` columns at a time, so the upcast copies
    stay small (p = 500,000 float64 rows would otherwise double the blocks' memory)."""
    if phi_a.shape[1] != phi_b.shape[1]:
        raise ValueError(f"feature blocks have different widths: {phi_a.shape[1]} vs {phi_b.shape[1]}")
    dtype = COMPUTE_DTYPES[compute_dtype]
    same = phi_a is phi_b
    out = torch.zeros((phi_a.shape[0], phi_b.shape[0]), dtype=dtype, device=phi_a.device)
    for start in range(0, phi_a.shape[1], column_chunk):
        a = phi_a[:, start:start + column_chunk].to(dtype)
        b = a if same else phi_b[:, start:start + column_chunk].to(dtype)
        out.addmm_(a, b.T)
    return out.to("cpu", torch.float64).numpy()


def shard_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of consecutive shards with the given sizes."""
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for size, stop in zip(sizes, stops)]


def split_rows(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n in shards of at most ``shard_size`` rows."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def train_block_pairs(num_shards: int) -> list[tuple[int, int]]:
    """Upper-triangular block indices (i ≤ j): the blocks that determine the symmetric K."""
    return [(i, j) for i in range(num_shards) for j in range(i, num_shards)]


def place_block(kernel: np.ndarray, block: np.ndarray, rows: tuple[int, int], cols: tuple[int, int],
                symmetric: bool = False) -> None:
    """Write a block into a preallocated kernel (and its mirror image when ``symmetric``).

    A diagonal block of a symmetric kernel keeps its upper triangle and mirrors it: a BLAS
    product Φ_i Φ_iᵀ need not be bitwise symmetric (the order of its sums depends on the CPU and
    the thread count), while K is symmetric by construction this way."""
    if symmetric and rows == cols:
        upper = np.triu(block)
        kernel[rows[0]:rows[1], cols[0]:cols[1]] = upper + np.triu(block, 1).T
        return
    kernel[rows[0]:rows[1], cols[0]:cols[1]] = block
    if symmetric:
        kernel[cols[0]:cols[1], rows[0]:rows[1]] = block.T


def train_kernel(shards: Sequence[torch.Tensor], compute_dtype: str = "float64") -> np.ndarray:
    """K = Φ Φᵀ from row shards of Φ, computing only the blocks i ≤ j."""
    bounds = shard_bounds([s.shape[0] for s in shards])
    n = bounds[-1][1] if bounds else 0
    kernel = np.empty((n, n), dtype=np.float64)
    for i, j in train_block_pairs(len(shards)):
        place_block(kernel, gram_block(shards[i], shards[j], compute_dtype), bounds[i], bounds[j], symmetric=True)
    return kernel


def cross_kernel(eval_shards: Sequence[torch.Tensor], train_shards: Sequence[torch.Tensor],
                 compute_dtype: str = "float64") -> np.ndarray:
    """K_e = Φ_e Φᵀ from row shards of the evaluation and train features."""
    rows = shard_bounds([s.shape[0] for s in eval_shards])
    cols = shard_bounds([s.shape[0] for s in train_shards])
    kernel = np.empty((rows[-1][1] if rows else 0, cols[-1][1] if cols else 0), dtype=np.float64)
    for a, phi_a in enumerate(eval_shards):
        for b, phi_b in enumerate(train_shards):
            place_block(kernel, gram_block(phi_a, phi_b, compute_dtype), rows[a], cols[b])
    return kernel
