"""Kernel blocks as Ray tasks, gathered by the driver into the preallocated K and K_e.

Every Φ shard is one object in the object store (an actor result, see
:mod:`entk_ray.distributed.actors`); a block task ``K_ij = Φ_i Φ_jᵀ`` takes two shard references,
so each shard is shared by every block that needs it (Ray moves it to a node at most once). The
train kernel needs the blocks i ≤ j (the driver mirrors them); each evaluation set e needs every
(e_a, train_b) block. A block task calls :func:`entk_ray.kernels.gram_block`, the same function
the single-process path uses, so the distributed K equals the single-process K (bitwise when the
shard boundaries coincide).

:class:`KernelAssembler` owns the preallocated kernels and the bookkeeping: which blocks are
still missing, which can start (both shards ready), which are running (at most
``max_in_flight``), and places each finished block with :func:`entk_ray.kernels.place_block`, so
driver memory stays at K, K_e plus a few blocks. Blocks that are already in the artifact store
are loaded instead of computed; computed blocks are written to the store by the task itself.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import ray

from entk_ray import kernels as kern
from entk_ray.distributed import metrics
from entk_ray.distributed.actors import Shard, phi_from_wire

log = logging.getLogger(__name__)

TRAIN = "train"


@dataclass(frozen=True)
class Block:
    """Block of kernel ``kernel`` (``"train"`` or an evaluation split) from shards ``a`` (rows)
    and ``b`` (train columns)."""

    kernel: str
    a: Shard
    b: Shard

    @property
    def symmetric(self) -> bool:
        return self.kernel == TRAIN

    @property
    def key(self) -> str:
        """Artifact-store key: the rows and columns it covers (so other shard sizes never match)."""
        return f"blocks/{self.kernel}/{self.a.tag}_c{self.b.start}-{self.b.stop}"

    def __str__(self) -> str:
        return f"{self.kernel}[{self.a.start}:{self.a.stop}, {self.b.start}:{self.b.stop}]"


def gram_block_task(phi_a: np.ndarray, phi_b: np.ndarray, storage_dtype: str, compute_dtype: str = "float64",
                    store_namespace=None, key: str | None = None, on_gpu: bool = False) -> np.ndarray:
    """Body of the block task: ``kernels.gram_block`` on two shards (on the GPU if Ray assigned
    one), optionally saved to the artifact store before it is returned."""
    import torch

    a = phi_from_wire(phi_a, storage_dtype)
    b = phi_from_wire(phi_b, storage_dtype)
    if on_gpu and ray.get_gpu_ids() and torch.cuda.is_available():
        a, b = a.to("cuda"), b.to("cuda")
    block = kern.gram_block(a, b, compute_dtype)
    if store_namespace is not None and key is not None:
        store_namespace.save_array(key, block, meta={"compute_dtype": compute_dtype, "storage_dtype": storage_dtype})
    return block


kernel_block = ray.remote(max_retries=3)(gram_block_task)


def plan_blocks(shards: dict[str, list[Shard]]) -> list[Block]:
    """Every block needed: train i ≤ j, then each evaluation split × train."""
    train = shards[TRAIN]
    blocks = [Block(TRAIN, train[i], train[j]) for i, j in kern.train_block_pairs(len(train))]
    for split, rows in shards.items():
        if split != TRAIN:
            blocks.extend(Block(split, a, b) for a in rows for b in train)
    return blocks


class KernelAssembler:
    """Preallocated K / K_e, filled block by block as tasks finish (see the module docstring)."""

    def __init__(self, shards: dict[str, list[Shard]], *, storage_dtype: str, compute_dtype: str = "float64",
                 max_in_flight: int = 8, block_gpus: float = 0.0, namespace=None):
        self.shards = shards
        self.storage_dtype = storage_dtype
        self.compute_dtype = compute_dtype
        self.max_in_flight = max(1, int(max_in_flight))
        self.block_gpus = float(block_gpus)
        self.namespace = namespace
        n = shards[TRAIN][-1].stop if shards[TRAIN] else 0
        self.kernels = {split: np.empty(((rows[-1].stop if rows else 0), n), dtype=np.float64)
                        for split, rows in shards.items()}
        self.missing: list[Block] = plan_blocks(shards)
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
        return {s for block in self.missing for s in (block.a, block.b)}

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
            if block.a in self._phi and block.b in self._phi:
                self.missing.pop(i)
                self._start(block)
                started += 1
            else:
                i += 1
        return started

    def _start(self, block: Block) -> None:
        resources = {"num_gpus": self.block_gpus, "num_cpus": 0 if self.block_gpus > 0 else 1}
        ref = kernel_block.options(name=f"kernel block {block}", **resources).remote(
            self._phi[block.a], self._phi[block.b], self.storage_dtype, self.compute_dtype,
            self.namespace, block.key if self.namespace is not None else None, self.block_gpus > 0)
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

        inputs = list(dict.fromkeys((block.a, block.b)))
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
