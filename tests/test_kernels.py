"""Kernels assembled from blocks equal the direct products; reduced precision is bounded."""
import numpy as np
import pytest
import torch

from entk_ray.kernels import cross_kernel, gram_block, split_rows, train_block_pairs, train_kernel


def shards_of(phi, size):
    return [phi[a:b] for a, b in split_rows(phi.shape[0], size)]


@pytest.mark.parametrize("shard_size", [1, 4, 7, 50])
def test_blockwise_equals_direct(shard_size):
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(23, 40, generator=gen)
    phi_e = torch.randn(9, 40, generator=gen)
    direct = (phi.double() @ phi.double().T).numpy()
    k = train_kernel(shards_of(phi, shard_size))
    assert k.dtype == np.float64
    np.testing.assert_allclose(k, direct, rtol=1e-12, atol=1e-12)
    assert np.array_equal(k, k.T)
    ke = cross_kernel(shards_of(phi_e, 4), shards_of(phi, shard_size))
    np.testing.assert_allclose(ke, (phi_e.double() @ phi.double().T).numpy(), rtol=1e-12, atol=1e-12)


def test_only_upper_blocks_are_computed():
    assert train_block_pairs(3) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    assert split_rows(10, 4) == [(0, 4), (4, 8), (8, 10)]


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_reduced_precision_relative_error_against_float64(dtype, bound):
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(64, 5000, generator=gen, dtype=torch.float64)
    reference = (phi @ phi.T).numpy()
    stored = phi.to(dtype)
    for compute in ("float64", "float32"):
        k = gram_block(stored, stored, compute)
        rel = np.linalg.norm(k - reference) / np.linalg.norm(reference)
        assert rel < bound, (dtype, compute, rel)
    if dtype != torch.float32:  # storage precision, not accumulation, dominates the error
        assert np.linalg.norm(gram_block(stored, stored) - reference) / np.linalg.norm(reference) > 1e-7


def test_mismatched_widths_are_rejected():
    with pytest.raises(ValueError, match="different widths"):
        gram_block(torch.zeros(2, 3), torch.zeros(2, 4))
