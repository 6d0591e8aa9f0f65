"""eNTK kernels from feature blocks.

The train kernel is K = Φ Φᵀ (n×n) and each evaluation set e has K_e = Φ_e Φᵀ (m_e×n). Both are
assembled from Gram blocks ``K_AB = Φ_A Φ_Bᵀ`` of row *tiles*, which is how the Ray layer
distributes them: a block is a pure function of two tiles, and a tile is a run of consecutive row
shards (one shard per tile by default; several on a GPU, see :func:`group_tiles`). Φ may be stored
in float32 or float16/bfloat16; each product is computed in a *compute dtype*:

* ``float64``: operands upcast to float64, float64 accumulation (the reference);
* ``float32``: float32 operands and accumulation, TF32 explicitly off;
* ``tf32``: operands rounded to TF32 (10 explicit mantissa bits), float32 accumulation — the
  GPU's TF32 tensor cores; on the CPU emulated by rounding to TF32 and multiplying in float32;
* ``bf16``: operands rounded to bfloat16 (7 explicit mantissa bits), float32 accumulation — on the
  GPU ``torch.mm(..., out_dtype=float32)``; on the CPU emulated by rounding to bfloat16 and
  multiplying in float32.

The emulations are exact models of "round the inputs, multiply, accumulate in float32": a product
of two TF32 (11-bit) or two bfloat16 (8-bit) significands fits float32's 24 bits, so only the
accumulation rounds. The assembled kernels are float64 for solving. :func:`kernel_error` measures a
compute dtype's (and a storage dtype's) relative error against float64 on a sample block, for the
results.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

#: Compute dtype → accumulation dtype of the product (and of the block before it is returned).
COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32, "bf16": torch.float32}
#: Unit roundoff of each compute dtype's *operands* (the accumulation is float32 or float64).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8}
#: Feature columns per product on the CPU: bounds the upcast copies (p = 500,000 float64 rows
#: would otherwise double a block's memory).
DEFAULT_COLUMN_CHUNK = 65536
#: Feature columns per product on a GPU: a tile of 8,192 rows upcast to float64 is then 1.1 GB per
#: operand, and each product (8,192² × 16,384 multiply-adds) is still large enough to run at the
#: GPU's GEMM rate. :mod:`entk_ray.plan` counts this workspace.
GPU_COLUMN_CHUNK = 16384


def _check_compute_dtype(compute_dtype: str) -> torch.dtype:
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {compute_dtype!r}")
    return COMPUTE_DTYPES[compute_dtype]


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest TF32 value (ties to even): the 13 low mantissa bits
    cleared, as TF32 tensor cores read float32 operands. Returns a new tensor."""
    if x.dtype != torch.float32:
        raise ValueError(f"round_to_tf32 expects float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    # Add half an ulp of TF32 (plus one when the kept part is odd, for ties to even) to the bit
    # pattern, then clear the dropped bits; a carry into the exponent rounds up correctly.
    rounded = (bits + (0x0FFF + ((bits >> 13) & 1))) & ~0x1FFF
    return rounded.view(torch.float32).view(x.shape)


def _operand(chunk: torch.Tensor, compute_dtype: str) -> torch.Tensor:
    """A column chunk of Φ as the product's operand in ``compute_dtype``."""
    if compute_dtype == "float64":
        return chunk.to(torch.float64)
    if compute_dtype == "float32":
        return chunk.to(torch.float32)
    if compute_dtype == "tf32":
        x = chunk.to(torch.float32)
        return x if x.is_cuda else round_to_tf32(x)  # the tensor cores round on the GPU
    x = chunk.to(torch.bfloat16)  # bf16: round to nearest even
    return x if x.is_cuda else x.to(torch.float32)


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, compute_dtype: str) -> None:
    """``out += a bᵀ``, accumulating in ``out.dtype``."""
    if compute_dtype == "bf16" and a.is_cuda:
        try:  # bfloat16 tensor cores, float32 accumulation and output
            out.add_(torch.mm(a, b.T, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError):  # no out_dtype: the exact emulation
            a, b = a.to(torch.float32), b.to(torch.float32)
    out.addmm_(a, b.T)


@contextlib.contextmanager
def _matmul_precision(compute_dtype: str) -> Iterator[None]:
    """TF32 on for ``tf32`` and off otherwise (a process may have switched it on globally)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = compute_dtype == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def _columns(parts: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Columns [start, stop) of the row-concatenation of ``parts`` (a view for a single part)."""
    if len(parts) == 1:
        return parts[0][:, start:stop]
    return torch.cat([part[:, start:stop] for part in parts])


def _gram(a_parts: Sequence[torch.Tensor], b_parts: Sequence[torch.Tensor] | None, compute_dtype: str,
          column_chunk: int) -> np.ndarray:
    """``Φ_A Φ_Bᵀ`` for tiles given as row parts (``b_parts`` None: ``Φ_A Φ_Aᵀ``), as float64 numpy."""
    accumulate = _check_compute_dtype(compute_dtype)
    widths = {int(part.shape[1]) for part in [*a_parts, *(b_parts or [])]}
    if len(widths) != 1:
        raise ValueError(f"feature blocks have different widths: {' vs '.join(map(str, sorted(widths)))}")
    width = widths.pop()
    rows_a = sum(int(part.shape[0]) for part in a_parts)
    rows_b = rows_a if b_parts is None else sum(int(part.shape[0]) for part in b_parts)
    out = torch.zeros((rows_a, rows_b), dtype=accumulate, device=a_parts[0].device)
    with _matmul_precision(compute_dtype):
        for start in range(0, width, column_chunk):
            stop = min(start + column_chunk, width)
            a = _operand(_columns(a_parts, start, stop), compute_dtype)
            b = a if b_parts is None else _operand(_columns(b_parts, start, stop), compute_dtype)
            _accumulate(out, a, b, compute_dtype)
    return out.to("cpu", torch.float64).numpy()


def gram_block(phi_a: torch.Tensor, phi_b: torch.Tensor, compute_dtype: str = "float64",
               column_chunk: int = DEFAULT_COLUMN_CHUNK) -> np.ndarray:
    """``Φ_a Φ_bᵀ`` in ``compute_dtype`` (see the module docstring), as a float64 numpy array.

    The feature dimension is processed ``column_chunk`` columns at a time, so the upcast copies
    stay small. ``phi_a is phi_b`` computes the diagonal block from one operand."""
    return _gram([phi_a], None if phi_a is phi_b else [phi_b], compute_dtype, column_chunk)


def stage_tile(shards: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """The row-concatenation of ``shards`` on ``device``, copied through pinned host memory.

    On a GPU each shard is copied into one of two pinned buffers and sent with a non-blocking
    copy, so the host copy of shard i+1 overlaps the transfer of shard i (pageable memory would be
    staged by the driver at a fraction of the bus rate). On the CPU this is ``torch.cat``."""
    device = torch.device(device)
    if device.type != "cuda":
        return shards[0] if len(shards) == 1 else torch.cat(list(shards))
    if len(shards) == 1 and shards[0].device == device:
        return shards[0]
    rows = sum(int(s.shape[0]) for s in shards)
    width, dtype = int(shards[0].shape[1]), shards[0].dtype
    tile = torch.empty((rows, width), dtype=dtype, device=device)
    largest = max(int(s.shape[0]) for s in shards)
    buffers = [torch.empty((largest, width), dtype=dtype, pin_memory=True) for _ in range(min(2, len(shards)))]
    sent: list[torch.cuda.Event | None] = [None] * len(buffers)
    start = 0
    for i, shard in enumerate(shards):
        slot = i % len(buffers)
        if sent[slot] is not None:
            sent[slot].synchronize()  # the buffer's previous transfer has left it
        size = int(shard.shape[0])
        staged = buffers[slot][:size]
        staged.copy_(shard)
        tile[start:start + size].copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        sent[slot] = event
        start += size
    return tile


def gram_tile(tile_a: Sequence[torch.Tensor], tile_b: Sequence[torch.Tensor] | None = None,
              compute_dtype: str = "float64", device: torch.device | str | None = None,
              column_chunk: int | None = None) -> np.ndarray:
    """``Φ_A Φ_Bᵀ`` for tiles given as consecutive row shards (``tile_b`` None: the diagonal
    tile ``Φ_A Φ_Aᵀ``), as a float64 numpy array.

    On a GPU (``device`` cuda) both tiles are staged whole through pinned memory
    (:func:`stage_tile`) and multiplied ``GPU_COLUMN_CHUNK`` columns at a time; on the CPU the
    shards are read in place, column chunk by column chunk. Either way it equals
    ``gram_block(cat(tile_a), cat(tile_b))`` up to the order of the sums."""
    if not tile_a or (tile_b is not None and not tile_b):
        raise ValueError("a tile needs at least one shard")
    device = torch.device(device) if device is not None else tile_a[0].device
    if device.type == "cuda":
        a_parts = [stage_tile(tile_a, device)]
        b_parts = None if tile_b is None else [stage_tile(tile_b, device)]
        chunk = column_chunk or GPU_COLUMN_CHUNK
    else:
        a_parts = [s.to(device) for s in tile_a]
        b_parts = None if tile_b is None else [s.to(device) for s in tile_b]
        chunk = column_chunk or DEFAULT_COLUMN_CHUNK
    return _gram(a_parts, b_parts, compute_dtype, chunk)


def kernel_error(phi_a: torch.Tensor, phi_b: torch.Tensor | None = None, compute_dtype: str = "float64",
                 storage_dtype: str | torch.dtype | None = None, device: torch.device | str | None = None) -> float:
    """Relative error ``‖K̃ − K‖_F / ‖K‖_F`` of one block (``phi_b`` None: the diagonal block).

    K = Φ_a Φ_bᵀ in float64 from Φ as given; K̃ the same block with Φ first rounded to
    ``storage_dtype`` (None: as given) and the product in ``compute_dtype``. So the storage
    error (bfloat16 Φ against float32 Φ) and the compute error (tf32/bf16 products against float64)
    are measured by the same function, on a sample block of the run's own features."""
    reference = _gram([phi_a], None if phi_b is None else [phi_b], "float64", DEFAULT_COLUMN_CHUNK)
    if storage_dtype is not None:
        dtype = storage_dtype if isinstance(storage_dtype, torch.dtype) else getattr(torch, storage_dtype)
        phi_a = phi_a.to(dtype)
        phi_b = None if phi_b is None else phi_b.to(dtype)
    block = gram_tile([phi_a], None if phi_b is None else [phi_b], compute_dtype, device=device)
    scale = float(np.linalg.norm(reference))
    return float(np.linalg.norm(block - reference) / scale) if scale > 0 else float(np.linalg.norm(block))


def compute_dtype_errors(phi_a: torch.Tensor, phi_b: torch.Tensor | None = None,
                         dtypes: Sequence[str] = tuple(COMPUTE_DTYPES),
                         device: torch.device | str | None = None) -> dict[str, float]:
    """:func:`kernel_error` of each compute dtype on one sample block, for the results file."""
    return {dtype: kernel_error(phi_a, phi_b, dtype, device=device) for dtype in dtypes}


def shard_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of consecutive shards with the given sizes."""
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for size, stop in zip(sizes, stops)]


def split_rows(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n in shards of at most ``shard_size`` rows."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def group_tiles(sizes: Sequence[int], tile_rows: int | None = None) -> list[list[int]]:
    """Indices of consecutive shards grouped into tiles of at most ``tile_rows`` rows (a shard
    larger than ``tile_rows`` is a tile of its own); ``None``: one shard per tile.

    With equal shards of s rows and ``tile_rows`` a multiple of s, the tiles are
    ``split_rows(n, tile_rows)``: the row ranges the plan counts."""
    if tile_rows is None:
        return [[i] for i in range(len(sizes))]
    if tile_rows <= 0:
        raise ValueError(f"tile_rows must be positive, got {tile_rows}")
    tiles: list[list[int]] = []
    rows = 0
    for i, size in enumerate(sizes):
        if tiles and rows + size <= tile_rows:
            tiles[-1].append(i)
            rows += size
        else:
            tiles.append([i])
            rows = size
    return tiles


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


def _tiles(shards: Sequence[torch.Tensor], tile_rows: int | None) -> list[tuple[list[torch.Tensor], tuple[int, int]]]:
    """Shards grouped into tiles, each with its row range."""
    bounds = shard_bounds([s.shape[0] for s in shards])
    return [([shards[i] for i in group], (bounds[group[0]][0], bounds[group[-1]][1]))
            for group in group_tiles([s.shape[0] for s in shards], tile_rows)]


def train_kernel(shards: Sequence[torch.Tensor], compute_dtype: str = "float64", tile_rows: int | None = None,
                 device: torch.device | str | None = None) -> np.ndarray:
    """K = Φ Φᵀ from row shards of Φ, computing only the tile blocks A ≤ B (tiles of
    ``tile_rows``, see :func:`group_tiles`; default one shard per tile)."""
    tiles = _tiles(shards, tile_rows)
    n = tiles[-1][1][1] if tiles else 0
    kernel = np.empty((n, n), dtype=np.float64)
    for i, j in train_block_pairs(len(tiles)):
        (tile_a, rows), (tile_b, cols) = tiles[i], tiles[j]
        block = gram_tile(tile_a, None if i == j else tile_b, compute_dtype, device=device)
        place_block(kernel, block, rows, cols, symmetric=True)
    return kernel


def cross_kernel(eval_shards: Sequence[torch.Tensor], train_shards: Sequence[torch.Tensor],
                 compute_dtype: str = "float64", tile_rows: int | None = None,
                 device: torch.device | str | None = None) -> np.ndarray:
    """K_e = Φ_e Φᵀ from row shards of the evaluation and train features (tiled as
    :func:`train_kernel`)."""
    row_tiles, col_tiles = _tiles(eval_shards, tile_rows), _tiles(train_shards, tile_rows)
    kernel = np.empty((row_tiles[-1][1][1] if row_tiles else 0, col_tiles[-1][1][1] if col_tiles else 0),
                      dtype=np.float64)
    for tile_a, rows in row_tiles:
        for tile_b, cols in col_tiles:
            place_block(kernel, gram_tile(tile_a, tile_b, compute_dtype, device=device), rows, cols)
    return kernel


def row_sq_norms(phi: torch.Tensor | np.ndarray) -> np.ndarray:
    """k(x, x) = ‖φ(x)‖² per row, summed in float64 (the diagonal of an evaluation set's own kernel)."""
    t = torch.as_tensor(phi)
    out = np.empty(t.shape[0], dtype=np.float64)
    for start in range(0, t.shape[0], 256):  # bounded float64 copies
        out[start:start + 256] = t[start:start + 256].double().pow(2).sum(1).numpy()
    return out
