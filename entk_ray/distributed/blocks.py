"""Kernel blocks as Ray tasks over tiles, gathered by the driver into the preallocated K and K_e.

Every Φ shard is one object in the object store (an actor result, see
:mod:`entk_ray.distributed.actors`). A *tile* is a run of consecutive shards of one split
(``tile_rows`` rows at most, from the plan; one shard by default), and a block task
``K_AB = Φ_A Φ_Bᵀ`` takes the shard references of its two tiles, so each shard is shared by every
block that needs it (Ray moves it to a node at most once). The train kernel needs the tile blocks
A ≤ B (the driver mirrors them); each evaluation set needs every (eval tile, train tile) block. A
block task calls :func:`entk_ray.kernels.gram_tile` — on a GPU it stages both tiles through pinned
memory — the same function the single-process path uses, so the distributed K equals the
single-process K (bitwise when the tile boundaries and the BLAS coincide).

Every block task has the same name, ``kernel_tile`` (:data:`TASK_NAME`), so ``ray summary tasks``
and the dashboard group them; the row ranges go into the log, and the ``blocks`` metric's only tag
is the kind of block (train / eval / cached).

:class:`KernelAssembler` owns the preallocated kernels and the bookkeeping: which blocks are
still missing, which can start (both shards ready), which are running (at most
``max_in_flight``), and places each finished block with :func:`entk_ray.kernels.place_block`, so
driver memory stays at K, K_e plus a few blocks. Blocks that are already in the artifact store
are loaded instead of computed; computed blocks are written to the store by the task itself.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import ray

from entk_ray import kernels as kern
from entk_ray.distributed import metrics
from entk_ray.distributed.actors import RowRange, Shard, phi_from_wire
from entk_ray.errors import find_user_error

log = logging.getLogger(__name__)

TRAIN = "train"
#: The name of every kernel block task (stable, so Ray's task summaries group them).
TASK_NAME = "kernel_tile"


@dataclass(frozen=True)
class Tile(RowRange):
    """Consecutive shards ``shards`` of one split: rows [start, stop)."""

    split: str
    index: int
    shards: tuple[Shard, ...]

    @property
    def start(self) -> int:
        return self.shards[0].start

    @property
    def stop(self) -> int:
        return self.shards[-1].stop



def make_tiles(shards: list[Shard], tile_rows: int | None = None) -> list[Tile]:
    """Shards of one split grouped into tiles of at most ``tile_rows`` rows (None: one shard each)."""
    groups = kern.group_tiles([s.size for s in shards], tile_rows)
    return [Tile(shards[g[0]].split if shards else TRAIN, i, tuple(shards[k] for k in g)) for i, g in enumerate(groups)]


@dataclass(frozen=True)
class Block:
    """Block of kernel ``kernel`` (``"train"`` or an evaluation split) from tiles ``a`` (rows) and
    ``b`` (train columns)."""

    kernel: str
    a: Tile
    b: Tile

    @property
    def symmetric(self) -> bool:
        return self.kernel == TRAIN

    @property
    def diagonal(self) -> bool:
        """A diagonal block of K: one tile, Φ_A Φ_Aᵀ."""
        return self.symmetric and self.a == self.b

    @property
    def shards(self) -> tuple[Shard, ...]:
        """The shards the block reads (each once)."""
        return tuple(dict.fromkeys(self.a.shards + self.b.shards))

    @property
    def key(self) -> str:
        """Artifact-store key: the rows and columns it covers (so other tilings never match)."""
        return f"blocks/{self.kernel}/{self.a.tag}_c{self.b.start}-{self.b.stop}"

    def __str__(self) -> str:
        return f"{self.kernel}[{self.a.start}:{self.a.stop}, {self.b.start}:{self.b.stop}]"


@dataclass(frozen=True)
class TileTask:
    """What a ``kernel_tile`` task needs besides its shards: the first ``parts_a`` shard arguments
    are tile A, the rest tile B (none: the diagonal block)."""

    label: str
    parts_a: int
    storage_dtype: str
    compute_dtype: str = "float64"
    on_gpu: bool = False
    namespace: object | None = None
    key: str | None = None


def kernel_tile_task(spec: TileTask, *phis: np.ndarray) -> np.ndarray:
    """Body of the ``kernel_tile`` task: :func:`entk_ray.kernels.gram_tile` on the shards of two
    tiles (on the GPU if Ray assigned one), optionally saved to the artifact store before it is
    returned."""
    import torch

    shards = [phi_from_wire(phi, spec.storage_dtype) for phi in phis]
    tile_a, tile_b = shards[:spec.parts_a], shards[spec.parts_a:] or None
    device = "cuda" if spec.on_gpu and ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    block = kern.gram_tile(tile_a, tile_b, spec.compute_dtype, device=device)
    log.info("%s %s: %s in %s on %s in %.2f s", TASK_NAME, spec.label, "×".join(map(str, block.shape)),
             spec.compute_dtype, device, time.perf_counter() - start)
    if spec.namespace is not None and spec.key is not None:
        spec.namespace.save_array(spec.key, block, meta={"compute_dtype": spec.compute_dtype,
                                                         "storage_dtype": spec.storage_dtype})
    return block


kernel_tile = ray.remote(max_retries=3)(kernel_tile_task)


def plan_blocks(shards: dict[str, list[Shard]], tile_rows: int | None = None) -> list[Block]:
    """Every block needed: train tiles A ≤ B, then each evaluation split's tiles × train tiles."""
    train = make_tiles(shards[TRAIN], tile_rows)
    blocks = [Block(TRAIN, train[i], train[j]) for i, j in kern.train_block_pairs(len(train))]
    for split, rows in shards.items():
        if split != TRAIN:
            blocks.extend(Block(split, a, b) for a in make_tiles(rows, tile_rows) for b in train)
    return blocks


class KernelAssembler:
    """Preallocated K / K_e, filled block by block as tasks finish (see the module docstring)."""

    def __init__(self, shards: dict[str, list[Shard]], *, storage_dtype: str, compute_dtype: str = "float64",
                 max_in_flight: int = 8, block_gpus: float = 0.0, namespace=None, tile_rows: int | None = None):
        self.shards = shards
        self.tile_rows = tile_rows
        self.storage_dtype = storage_dtype
        self.compute_dtype = compute_dtype
        self.max_in_flight = max(1, int(max_in_flight))
        self.block_gpus = float(block_gpus)
        self.namespace = namespace
        n = shards[TRAIN][-1].stop if shards[TRAIN] else 0
        self.kernels = {split: np.empty(((rows[-1].stop if rows else 0), n), dtype=np.float64)
                        for split, rows in shards.items()}
        self.missing: list[Block] = plan_blocks(shards, tile_rows)
        self.total = len(self.missing)
        self.placed = 0
        self.cached = 0
        self._phi: dict[Shard, ray.ObjectRef] = {}
        self._running: dict[ray.ObjectRef, Block] = {}
        self._attempts: dict[Block, int] = {}

    # -------------------------------------------------------------- inputs
    def load_cached(self, progress=None) -> int:
        """Place every block already in the artifact store; returns how many."""
        if self.namespace is None:
            return 0
        done = set(self.namespace.keys("blocks/"))
        still = []
        for block in self.missing:
            # Verified on load; a corrupt block is discarded (and logged), a vanished one is missing.
            value = self.namespace.get_array(block.key) if block.key in done else None
            if value is not None:
                self._place(block, value, kind="cached", progress=progress)
                self.cached += 1
            else:
                still.append(block)
        self.missing = still
        return self.cached

    def needed_shards(self) -> set[Shard]:
        """Shards that some missing block reads."""
        return {s for block in self.missing for s in block.shards}

    def add_shard(self, shard: Shard, phi: ray.ObjectRef) -> None:
        """A shard's Φ is in the object store: blocks reading it may start."""
        self._phi[shard] = phi

    def forget_shard(self, shard: Shard) -> None:
        self._phi.pop(shard, None)

    def waiting_for(self) -> set[Shard]:
        """Shards that missing blocks read but that are not (or no longer) in the object store."""
        return self.needed_shards() - set(self._phi)

    # -------------------------------------------------------------- scheduling
    @property
    def done(self) -> bool:
        return not self.missing and not self._running

    def pending(self) -> list[ray.ObjectRef]:
        return list(self._running)

    def owns(self, ref: ray.ObjectRef) -> bool:
        return ref in self._running

    def block_of(self, ref: ray.ObjectRef) -> Block | None:
        """The block a running task computes."""
        return self._running.get(ref)

    def launch(self) -> int:
        """Start missing blocks whose shards are ready, up to ``max_in_flight`` running."""
        started = 0
        i = 0
        while i < len(self.missing) and len(self._running) < self.max_in_flight:
            block = self.missing[i]
            if all(s in self._phi for s in block.shards):
                self.missing.pop(i)
                self._start(block)
                started += 1
            else:
                i += 1
        return started

    def _start(self, block: Block) -> None:
        resources = {"num_gpus": self.block_gpus, "num_cpus": 0 if self.block_gpus > 0 else 1}
        spec = TileTask(str(block), len(block.a.shards), self.storage_dtype, self.compute_dtype, self.block_gpus > 0,
                        self.namespace, block.key if self.namespace is not None else None)
        refs = [self._phi[s] for s in block.a.shards] + ([] if block.diagonal else [self._phi[s] for s in block.b.shards])
        ref = kernel_tile.options(name=TASK_NAME, **resources).remote(spec, *refs)
        log.debug("%s %s started (%d shards)", TASK_NAME, block, len(refs))
        self._running[ref] = block

    def collect(self, ref: ray.ObjectRef, progress=None) -> list[Shard]:
        """Place a finished block; returns the shards that must be recomputed (usually none).

        A block whose input shard was lost (its node died after the feature actors were
        released, so Ray cannot rebuild it from lineage) goes back to ``missing`` and its lost
        shards are returned: the caller recomputes them and :meth:`add_shard` s them again. Any
        other failure has already been retried by Ray (``max_retries``) and is raised.
        """
        block = self._running.pop(ref)
        try:
            value = ray.get(ref)
        except Exception as exc:
            if not _is_lost_object(exc):
                expected = find_user_error(exc)
                if expected is not None:  # the input's or the store's fault (a silent S3): its own message
                    raise expected from exc
                raise RuntimeError(f"kernel block {block} failed: {exc}") from exc
            self._attempts[block] = self._attempts.get(block, 0) + 1
            if self._attempts[block] > 3:
                raise RuntimeError(f"kernel block {block} lost its inputs {self._attempts[block]} times") from exc
            lost = self._lost_inputs(block)
            log.warning("block %s lost input shard(s) %s (%s); recomputing them", block,
                        ", ".join(map(str, lost)), type(exc).__name__)
            for shard in lost:
                self.forget_shard(shard)
            self.missing.insert(0, block)
            return lost
        self._place(block, value, kind="train" if block.symmetric else "eval", progress=progress)
        del value
        return []

    def _lost_inputs(self, block: Block) -> list[Shard]:
        """Which of the block's shards are gone from every node (and not spilled to disk)."""
        from ray.experimental import get_object_locations

        inputs = list(block.shards)
        lost = [s for s in inputs if s not in self._phi]  # already known lost, being recomputed
        present = [s for s in inputs if s in self._phi]
        try:
            where = get_object_locations([self._phi[s] for s in present])
            lost += [s for s in present if _gone(where[self._phi[s]])]
        except Exception:  # noqa: BLE001 - cannot tell: recompute both
            return inputs
        return lost or inputs

    def _place(self, block: Block, value: np.ndarray, kind: str, progress=None) -> None:
        kern.place_block(self.kernels[block.kernel], value, block.a.rows, block.b.rows, symmetric=block.symmetric)
        self.placed += 1
        metrics.record("blocks", 1, kind=kind)
        if progress is not None:
            progress.update(1)


#: Objects up to this size are inlined in their owner's (the driver's) memory, not in any
#: node's object store (Ray's ``max_direct_call_object_size``): a node failure cannot lose them.
INLINE_LIMIT = 100 * 1024


def _gone(location: dict) -> bool:
    """True when an object-store object is on no node and not spilled (see INLINE_LIMIT)."""
    return not location["node_ids"] and not location["did_spill"] and location["object_size"] >= INLINE_LIMIT


def _is_lost_object(exc: BaseException) -> bool:
    lost = ray.exceptions.ObjectLostError  # includes reconstruction failures and a dead owner
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, lost):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False
