"""Feature actors: one per GPU (or CPU slot), each building the model and S once.

A :class:`FeatureWorker` actor holds a featurizer (model + parameter subset S + feature computer,
built once in ``__init__``) and the datasets: the driver puts each split in the object store once
(``ray.put``) and every shard call carries that reference (wrapped, so Ray does not resolve it);
the actor fetches a split on its first shard of it and keeps it. Constructor arguments stay
small, so a restarted actor never depends on objects in the store. It maps a :class:`Shard` — a row range of one split, from
:func:`entk_ray.kernels.split_rows` — to

* Φ for those rows, returned as an actor-method result, so the driver owns it and every kernel
  block task can read it from the object store (never ``ray.put`` inside the actor), and
* a small info dict (penultimate embeddings of the rows, pid, node, device, seconds).

With an artifact store, the actor also stores both (``shards/<split>/r<a>-<b>/embeddings`` and
``…/phi``, Φ in its storage dtype, bfloat16 as its int16 bits: :func:`phi_to_wire`) before it
returns, so a shard whose result reached the driver is on disk: a rerun after a crash loads it
(:func:`load_stored_shard`, a task whose result takes the place of the actor's) instead of
recomputing it.

:class:`FeaturePool` schedules shards over the actors with ``ray.wait`` — not ``ActorPool``, which
drops items whose task failed. A failed shard goes back to the queue and is retried (on any
actor), an actor that keeps failing is retired, and the pool only gives up when a shard has failed
``max_attempts`` times or no actor is left. On top of that each actor has ``max_restarts`` and
``max_task_retries``, so a crashed actor process is restarted by Ray and its in-flight calls are
re-run there transparently. A failure that is the input's fault (an
:class:`~entk_ray.errors.UserInputError`: an image that does not decode, a storage endpoint that
does not answer) is not retried: it is raised at once.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from entk_ray.errors import find_user_error
from entk_ray.store import safe_name

log = logging.getLogger(__name__)


class RowRange:
    """Rows ``[start, stop)`` of a split: what a shard and a kernel tile share (they give
    ``split``, ``start`` and ``stop``)."""

    split: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> tuple[int, int]:
        return (self.start, self.stop)

    @property
    def tag(self) -> str:
        return f"r{self.start}-{self.stop}"

    def __str__(self) -> str:
        return f"{self.split}[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class Shard(RowRange):
    """Rows ``[start, stop)`` of split ``split``; ``index`` is its position within the split."""

    split: str
    index: int
    start: int
    stop: int

    def key(self, what: str) -> str:
        """Artifact-store key of this shard's ``what`` (``"phi"`` or ``"embeddings"``)."""
        return shard_key(self.split, self.start, self.stop, what)


def shard_key(split: str, start: int, stop: int, what: str) -> str:
    """``shards/<split>/r<start>-<stop>/<what>``: the rows it covers, so other shard sizes never match."""
    return f"shards/{safe_name(split)}/r{start}-{stop}/{what}"


def pick_device(requested: str) -> torch.device:
    """The device this Ray worker should use: CUDA only when Ray assigned it a GPU (Ray sets
    ``CUDA_VISIBLE_DEVICES``, so the assigned GPU is ``cuda:0``), else CPU."""
    if requested.startswith("cpu"):
        return torch.device("cpu")
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    if requested.startswith("cuda"):
        raise RuntimeError(f"features.device={requested!r} but this Ray worker has no GPU "
                           f"(ray.get_gpu_ids()={ray.get_gpu_ids()}, cuda={torch.cuda.is_available()})")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Wire format of Φ shards
# --------------------------------------------------------------------------------------------
def phi_to_wire(phi: torch.Tensor) -> np.ndarray:
    """Φ as a numpy array (zero-copy in the object store); bfloat16 travels as its int16 bits."""
    phi = phi.detach().to("cpu").contiguous()
    if phi.dtype == torch.bfloat16:
        return phi.view(torch.int16).numpy()
    return phi.numpy()


def phi_from_wire(array: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Inverse of :func:`phi_to_wire` (a read-only view; nothing is copied)."""
    import warnings

    with warnings.catch_warnings():  # object-store arrays are read-only; we never write to them
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if storage_dtype == "bfloat16" else tensor


def load_stored_shard_task(namespace, key: str) -> tuple[np.ndarray | None, bool]:
    """Body of the ``load_stored_shard`` task: ``(Φ in its wire format, True)`` from the store,
    verified, or ``(None, False)`` when it is missing or corrupt (then it is recomputed). Its Φ
    result is owned by the driver like an actor's, so block tasks read it from the object store."""
    phi = namespace.get_array(key)
    return phi, phi is not None


#: Loading is I/O: no CPU reserved, so loads never wait for feature actors or block tasks.
load_stored_shard = ray.remote(num_returns=2, num_cpus=0, max_retries=3)(load_stored_shard_task)


# --------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------
class FeatureWorker:
    """Body of the feature actor (wrapped by :data:`FeatureActor`)."""

    def __init__(self, factory: Callable, device: str = "auto", num_threads: int = 1, worker_name: str = "features",
                 namespace=None):
        torch.set_num_threads(max(1, int(num_threads)))
        self.worker_name = worker_name
        self.namespace = namespace  # artifact store namespace: Φ and embeddings are saved there
        self.device = pick_device(device)
        self.featurizer = factory(self.device)
        self._subset_fp = self.featurizer.subset.fingerprint()
        self._datasets: dict[str, Any] = {}  # split -> dataset, fetched once

    def _dataset(self, split: str, wrapped: list):
        if split not in self._datasets:
            ref = wrapped[0]
            self._datasets[split] = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        return self._datasets[split]

    def describe(self) -> dict:
        """Who and where this actor is, and which S it uses (must equal the driver's)."""
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "device": str(self.device), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "subset": self._subset_fp, "worker": self.worker_name}

    @ray.method(num_returns=2)
    def shard(self, split: str, start: int, stop: int, dataset: list):
        """(Φ rows [start, stop) of ``split`` as a numpy array, info with the embeddings).
        ``dataset`` is ``[ObjectRef of the split]`` (a list, so Ray passes the reference)."""
        dataset = self._dataset(split, dataset)
        indices = range(start, stop)
        t0 = time.perf_counter()
        phi = self.featurizer.features(dataset, indices)
        emb = self.featurizer.embeddings(dataset, indices)
        seconds = time.perf_counter() - t0
        emb = emb.numpy().astype(np.float32, copy=False)
        wire = phi_to_wire(phi)
        if self.namespace is not None:  # before returning: a shard the driver has seen is stored
            dtype = str(phi.dtype).removeprefix("torch.")
            self.namespace.save_array(shard_key(split, start, stop, "embeddings"), emb)
            self.namespace.save_array(shard_key(split, start, stop, "phi"), wire, meta={"storage_dtype": dtype})
        info = {"embeddings": emb, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                "seconds": seconds, "worker": self.worker_name,
                "subset": self._subset_fp, "p": self.featurizer.subset.p}
        return wire, info


FeatureActor = ray.remote(FeatureWorker)


# --------------------------------------------------------------------------------------------
# Scheduling shards over the actors
# --------------------------------------------------------------------------------------------
@dataclass
class ShardResult:
    shard: Shard
    phi: ray.ObjectRef  # driver-owned Φ rows in the object store
    info: dict


class FeaturePool:
    """Runs shards on a set of feature actors with ``ray.wait``; failed shards are retried.

    Usage: :meth:`submit` shards, then repeatedly ``ray.wait`` on :meth:`pending` (together with
    any other references) and pass each ready reference to :meth:`collect`, which returns a
    :class:`ShardResult` (or None when the shard failed and was requeued). ``depth`` calls are
    kept in flight per actor so an actor never idles between shards.
    """

    def __init__(self, factory: Callable, datasets: dict[str, Any], num_workers: int, *,
                 num_cpus: float = 1.0, num_gpus: float = 0.0, device: str = "auto", depth: int = 2,
                 max_restarts: int = 3, max_task_retries: int = 2, max_attempts: int = 4,
                 release_idle: bool = True, run_id: str = "run", namespace=None):
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.depth = max(1, int(depth))
        self.max_attempts = int(max_attempts)
        self.release_idle = release_idle
        self._queue: deque[Shard] = deque()
        self._inflight: dict[ray.ObjectRef, tuple[int, Shard, ray.ObjectRef]] = {}  # info ref -> (actor, shard, phi)
        self._attempts: dict[Shard, int] = {}
        self._unavailable: dict[Shard, int] = {}
        self.failures: list[tuple[Shard, str]] = []  # every failed attempt, for reports and tests
        self.actors: dict[int, Any] = {}
        self._options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": max_restarts,
                         "max_task_retries": max_task_retries, "max_concurrency": 1}
        self._datasets = datasets  # split -> ObjectRef, passed along with every shard call
        self._args = (factory, device, max(1, round(num_cpus)), namespace)  # threads: torch threads per actor
        self._run_id = run_id
        self._created = 0
        self.num_workers = num_workers
        self._max_actors = 2 * num_workers  # the original ones plus as many replacements
        for _ in range(num_workers):
            self._spawn()

    def _spawn(self) -> int:
        """Start one more actor (initially, or to replace actors that are gone for good)."""
        actor_id = self._created
        name = f"entk-features-{self._run_id}-{actor_id}"
        factory, device, threads, namespace = self._args
        self.actors[actor_id] = FeatureActor.options(name=name, **self._options).remote(
            factory, device, threads, name, namespace)
        self._created += 1
        return actor_id

    # -------------------------------------------------------------- public
    def describe(self) -> list[dict]:
        """``FeatureWorker.describe`` of every live actor (waits for them to start)."""
        return ray.get([a.describe.remote() for a in self.actors.values()])

    def submit(self, shards) -> None:
        for shard in shards:
            self._queue.append(shard)
        self._dispatch()

    def pending(self) -> list[ray.ObjectRef]:
        return list(self._inflight)

    @property
    def done(self) -> bool:
        return not self._queue and not self._inflight

    def owns(self, ref: ray.ObjectRef) -> bool:
        return ref in self._inflight

    def collect(self, ref: ray.ObjectRef) -> ShardResult | None:
        """Handle one ready reference from :meth:`pending`."""
        actor_id, shard, phi_ref = self._inflight.pop(ref)
        try:
            info = ray.get(ref)  # small; raises if the call (or its actor) failed
        except Exception as exc:  # noqa: BLE001 - every failure is retried or reported
            self._failed(actor_id, shard, exc)
            self._dispatch()
            return None
        self._dispatch()
        if self.release_idle and not self._queue:
            self._release_idle()
        return ShardResult(shard, phi_ref, info)

    def release(self) -> None:
        """Kill the actors (their results stay in the object store, owned by the driver) so
        their CPUs/GPUs go to kernel-block tasks and sweep trials."""
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # noqa: BLE001 - already dead or unreachable: nothing to free
                log.debug("could not kill feature actor: %s", exc)
        self.actors.clear()

    # -------------------------------------------------------------- internals
    def _release_idle(self) -> None:
        """Once the queue is empty, an actor with nothing in flight is done: free its resources
        for block tasks now rather than when the slowest actor finishes (at least one actor stays
        while shards are in flight, to take a shard back should it fail)."""
        load = self._load()
        busy = [i for i, n in load.items() if n > 0]
        for actor_id, n in load.items():
            if n == 0 and (busy or len(self.actors) > 1):
                ray.kill(self.actors.pop(actor_id), no_restart=True)

    def _failed(self, actor_id: int, shard: Shard, exc: Exception) -> None:
        self.failures.append((shard, f"{type(exc).__name__}: {exc}"[:500]))
        expected = find_user_error(exc)
        if expected is not None:  # the input's fault (a corrupt image, a silent store): a retry cannot help
            log.warning("shard %s failed on actor %d: %s (not retried)", shard, actor_id, type(expected).__name__)
            raise expected from exc
        # An actor Ray is restarting answers ActorUnavailableError (after a short wait): transient,
        # so it has its own, larger budget; task errors and dead actors use max_attempts.
        transient = isinstance(exc, ray.exceptions.ActorUnavailableError)
        budget = self.max_attempts * (5 if transient else 1)
        counter = self._unavailable if transient else self._attempts
        attempts = counter.get(shard, 0) + 1
        counter[shard] = attempts
        log.warning("shard %s failed on actor %d (%sattempt %d/%d): %s", shard, actor_id,
                    "transient, " if transient else "", attempts, budget, type(exc).__name__)
        if attempts >= budget:
            raise RuntimeError(f"feature shard {shard} failed {attempts} times; last error: {exc}") from exc
        if isinstance(exc, ray.exceptions.ActorDiedError) and actor_id in self.actors:
            # DEAD, not restarting (ActorUnavailableError means Ray is restarting it): retire it.
            log.warning("feature actor %d is dead; retiring it", actor_id)
            self.actors.pop(actor_id)
        if not self.actors and self._created >= self._max_actors:
            raise RuntimeError(f"every feature actor failed; last error on shard {shard}: {exc}") from exc
        if len(self.actors) < self.num_workers and self._created < self._max_actors:
            # Idle actors were released (or died): bring the pool back to strength for the retry
            # rather than waiting for the failed actor's restart.
            log.warning("starting a replacement feature actor")
            self._spawn()
        self._queue.appendleft(shard)

    def _load(self) -> dict[int, int]:
        load = {i: 0 for i in self.actors}
        for actor_id, _, _ in self._inflight.values():
            if actor_id in load:
                load[actor_id] += 1
        return load

    def _dispatch(self) -> None:
        load = self._load()
        while self._queue and load:
            actor_id = min(load, key=lambda i: (load[i], i))
            if load[actor_id] >= self.depth:
                return
            shard = self._queue.popleft()
            phi_ref, info_ref = self.actors[actor_id].shard.options(name=f"features {shard}").remote(
                shard.split, shard.start, shard.stop, [self._datasets[shard.split]])
            self._inflight[info_ref] = (actor_id, shard, phi_ref)
            load[actor_id] += 1
