"""Kernels assembled from blocks and tiles equal the direct products; each compute and storage
dtype's error against float64 is within its stated bound."""
import numpy as np
import pytest
import torch

from entk_ray import kernels as kern
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


# --------------------------------------------------------------------------------------------
# Tiles and compute dtypes
# --------------------------------------------------------------------------------------------
def test_group_tiles():
    assert kern.group_tiles([4, 4, 4, 3], None) == [[0], [1], [2], [3]]
    assert kern.group_tiles([4, 4, 4, 3], 8) == [[0, 1], [2, 3]]
    assert kern.group_tiles([4, 4, 4, 3], 3) == [[0], [1], [2], [3]]  # a shard larger than a tile stays whole
    # Equal shards and a multiple of their size: the tiles are split_rows(n, tile_rows), as the plan counts.
    sizes = [b - a for a, b in split_rows(100, 16)]
    bounds = kern.shard_bounds(sizes)
    assert [(bounds[g[0]][0], bounds[g[-1]][1]) for g in kern.group_tiles(sizes, 48)] == split_rows(100, 48)
    with pytest.raises(ValueError, match="tile_rows must be positive"):
        kern.group_tiles([4], 0)


@pytest.mark.parametrize("tile_rows", [8, 20, 64, 1000])
def test_tiled_kernels_equal_untiled(tile_rows):
    """Tiles of several shards give the same K and K_e as one block per shard pair: equal to float64
    round-off (rtol 1e-12; the sums of a larger product may run in another order), K exactly
    symmetric."""
    gen = torch.Generator().manual_seed(2)
    phi = torch.randn(45, 300, generator=gen)
    phi_e = torch.randn(13, 300, generator=gen)
    shards, eval_shards = shards_of(phi, 4), shards_of(phi_e, 4)
    untiled = train_kernel(shards)
    tiled = train_kernel(shards, tile_rows=tile_rows)
    np.testing.assert_allclose(tiled, untiled, rtol=1e-12, atol=1e-12 * np.abs(untiled).max())
    assert np.array_equal(tiled, tiled.T)
    np.testing.assert_allclose(cross_kernel(eval_shards, shards, tile_rows=tile_rows), cross_kernel(eval_shards, shards),
                               rtol=1e-12, atol=1e-12 * np.abs(untiled).max())


@pytest.mark.parametrize("compute", list(kern.COMPUTE_DTYPES))
def test_gram_tile_equals_gram_block_of_the_concatenation(compute):
    gen = torch.Generator().manual_seed(3)
    parts_a = [torch.randn(5, 700, generator=gen), torch.randn(7, 700, generator=gen)]
    parts_b = [torch.randn(3, 700, generator=gen)]
    a = torch.cat(parts_a)
    # Same operands, same accumulation dtype; column chunks of 256 exercise the chunk loop.
    tol = 1e-12 if compute == "float64" else 1e-5
    got = kern.gram_tile(parts_a, parts_b, compute, column_chunk=256)
    np.testing.assert_allclose(got, kern.gram_block(a, parts_b[0], compute, column_chunk=256), rtol=tol, atol=tol * 700)
    diagonal = kern.gram_tile(parts_a, None, compute, column_chunk=256)
    np.testing.assert_allclose(diagonal, kern.gram_block(a, a, compute, column_chunk=256), rtol=tol, atol=tol * 700)
    with pytest.raises(ValueError, match="different widths"):
        kern.gram_tile(parts_a, [torch.zeros(2, 5)], compute)


def test_round_to_tf32_is_round_to_nearest_even_on_10_mantissa_bits():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(4)) * 1e3
    r = kern.round_to_tf32(x)
    assert (r.view(torch.int32) & 0x1FFF == 0).all()
    mantissa, exponent = torch.frexp(x.double())  # mantissa in [0.5, 1): 11 significant bits kept
    reference = torch.ldexp(torch.round(mantissa * 2**11) / 2**11, exponent)  # torch.round: half to even
    assert torch.equal(r, reference.float())
    assert (r - x).abs().max() <= 2**-11 * x.abs().max()


def features_like_entk(rows: int = 64, p: int = 20_000, seed: int = 5) -> torch.Tensor:
    """Rows with a shared component (eNTK features of one network are strongly correlated)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, p, generator=gen) + 0.5 * torch.randn(1, p, generator=gen)


def test_compute_dtype_errors_against_float64_within_their_bounds():
    """Rounding both operands of each product to a t-bit significand (u = 2^-t) changes each term
    by at most 2u relatively, so a block's relative error is at most 2u plus float32 accumulation
    (≤ 1e-5 for p = 20,000 with blocked sums). Rounding is unbiased, so the measured errors sit far
    below the bound, but above a floor that shows the operands really were rounded."""
    phi = features_like_entk()
    errors = kern.compute_dtype_errors(phi)
    assert errors["float64"] < 1e-13
    assert errors["float32"] < 1e-5
    for dtype in ("tf32", "bf16"):
        assert errors[dtype] < 2 * kern.UNIT_ROUNDOFF[dtype] + 1e-5, (dtype, errors)
    assert errors["tf32"] > 1e-6 and errors["bf16"] > 1e-5, errors
    assert errors["float64"] < errors["float32"] < errors["tf32"] < errors["bf16"]
    # Off-diagonal blocks too.
    cross = kern.compute_dtype_errors(phi[:32], phi[32:])
    assert cross["bf16"] < 2 * kern.UNIT_ROUNDOFF["bf16"] + 1e-5 and cross["float32"] < 1e-5


def test_storage_dtype_error_is_measured_by_the_same_function():
    phi = features_like_entk()
    for storage, u in (("bfloat16", 2.0**-8), ("float16", 2.0**-11)):
        err = kern.kernel_error(phi, storage_dtype=storage)
        assert 1e-3 * u < err < 2 * u + 1e-12, (storage, err)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        kern.kernel_error(phi, compute_dtype="int8")


# --------------------------------------------------------------------------------------------
# Tiles through Ray: KernelAssembler with several shards per task
# --------------------------------------------------------------------------------------------
def test_kernel_assembler_tiles_equal_untiled_k_with_one_task_name(ray_local, monkeypatch):
    import ray

    from entk_ray.distributed import blocks
    from entk_ray.distributed.actors import Shard, phi_to_wire

    gen = torch.Generator().manual_seed(6)
    phi = {"train": torch.randn(70, 3000, generator=gen), "id_val": torch.randn(40, 3000, generator=gen)}
    shards = {name: [Shard(name, i, a, b) for i, (a, b) in enumerate(split_rows(t.shape[0], 16))]
              for name, t in phi.items()}
    names, real = [], blocks.kernel_tile

    class Recording:  # records the task options the assembler uses, then runs the real task
        def options(self, **kwargs):
            names.append(kwargs["name"])
            return real.options(**kwargs)

    monkeypatch.setattr(blocks, "kernel_tile", Recording())
    assembler = blocks.KernelAssembler(shards, storage_dtype="float32", max_in_flight=3, block_gpus=0.5, tile_rows=32)
    for name, rows in shards.items():
        for shard in rows:
            assembler.add_shard(shard, ray.put(phi_to_wire(phi[name][shard.start:shard.stop])))
    while not assembler.done:
        assembler.launch()
        ready, _ = ray.wait(assembler.pending(), num_returns=1)
        assert assembler.collect(ready[0]) == []
    # 70 train rows in tiles of 32 (2 shards each): 3 tiles, 6 blocks; 40 eval rows: 2 tiles × 3.
    assert assembler.total == len(names) == 6 + 6 and set(names) == {"kernel_tile"}
    expected_train = train_kernel(shards_of(phi["train"], 16))
    tol = 1e-12 * np.abs(expected_train).max()
    np.testing.assert_allclose(assembler.kernels["train"], expected_train, rtol=1e-12, atol=tol)
    assert np.array_equal(assembler.kernels["train"], assembler.kernels["train"].T)
    np.testing.assert_allclose(assembler.kernels["id_val"],
                               cross_kernel(shards_of(phi["id_val"], 16), shards_of(phi["train"], 16)),
                               rtol=1e-12, atol=tol)
