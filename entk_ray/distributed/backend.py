"""``RayBackend``: the pipeline's heavy stages on Ray (features → kernel blocks → Tune sweep).

The driver (this process) owns the run: it joins or starts Ray, hashes the run's fingerprint,
loads whatever the artifact store already has for it, starts the feature actors for the rest,
launches kernel-block tasks as soon as their two shards exist, gathers blocks into the
preallocated K / K_e, releases the actors, and finally runs the telescopic β search as one Ray
Tune run. The math is the single-process code (``Featurizer``, ``kernels.gram_block``,
``SpectralSolver``/``nag_solve``, ``telescopic_search``), so :class:`RayBackend` reproduces
:class:`entk_ray.backends.LocalBackend`.

Options come from ``cfg.ray`` (address, num_workers, gpus/cpus per worker, shard_size, block_gpus,
max_blocks_in_flight, tune_max_concurrent), ``cfg.store`` (artifact_store) and ``cfg.storage_options``.

Resuming. Every finished piece is in the store under the run's fingerprint as soon as it is done:
each shard's Φ (in its storage dtype) and embeddings (written by the feature actor before it
returns), each kernel block (by its task), the kernel set, and each solved r of the β sweep. A driver
killed at any point and rerun with the same command therefore recomputes nothing finished:

* K, each K_e and the embeddings stored → loaded, no shard and no block is touched;
* else stored blocks are placed, and the shards that missing blocks read are loaded from the store
  into the object store (a ``load_stored_shard`` task each) or, if not stored, computed;
* the sweep's r values already solved are loaded and the search goes on from them on Tune.

Every load is verified (``entk_ray.store``): a corrupt artifact is logged, discarded and
recomputed. Once K, K_e and the embeddings are stored, the per-shard and per-block artifacts are
deleted (unless ``keep_partials``): nothing reads them again — the sweep needs K only, and a rerun
loads the kernel set — and Φ is by far the largest thing a run writes (n·p values).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Self

import numpy as np
import ray

from entk_ray import kernels as kern
from entk_ray.backends import Backend, KernelSet, run_fingerprint
from entk_ray.config import Config
from entk_ray.data.base import Benchmark
from entk_ray.distributed import metrics
from entk_ray.distributed.actors import FeaturePool, Shard, load_stored_shard, phi_from_wire
from entk_ray.distributed.blocks import TRAIN, KernelAssembler
from entk_ray.distributed.runtime import (
    cluster_cpus,
    cluster_gpus,
    init_ray,
    shutdown_ray,
)
from entk_ray.distributed.sweep import tune_sweep
from entk_ray.featurizer import ConfigFeaturizerFactory
from entk_ray.fingerprints import digest
from entk_ray.solvers import KernelProblem, SolverRun
from entk_ray.store import ArtifactStore, Namespace, load_kernels, save_kernels

log = logging.getLogger(__name__)

EventHook = Callable[..., None]


class RayBackend(Backend):
    """Features, kernels and the β sweep on Ray (see the module docstring).

    Args:
        cfg: the run's config; ``cfg.ray.address`` decides whether Ray is joined or started.
        featurizer_factory: picklable ``factory(device) -> featurizer`` with
            ``weights_fingerprint()``; default: the configured model
            (:class:`~entk_ray.featurizer.ConfigFeaturizerFactory`).
        store: an :class:`ArtifactStore`, ``True`` for the configured one
            (``cfg.store.artifact_store`` or ``<out_dir>/artifacts``), or ``None`` for none.
        on_event: optional ``hook(event, backend=..., **payload)`` called on the driver for
            ``"actors"`` (pool), ``"shard"`` (a computed shard: result, pool), ``"shard_loaded"``
            (shard: Φ loaded from the store), ``"block"`` (a computed block: block),
            ``"kernels"`` (the kernel set is stored), ``"sweep_trial"`` (a sweep trial ended, its
            runs stored: runs) and ``"round"`` (after the sweep, per round: index, runs); used by
            fault-injection tests.
        keep_partials: keep per-block / per-shard artifacts after the whole kernels are stored.
        max_restarts, max_task_retries: feature-actor fault tolerance.
        object_store_bytes: the plan's object-store size for a Ray this backend starts (None:
            Ray's default).
        init_kwargs: extra ``ray.init`` arguments when this backend starts Ray.

    ``stats`` counts what the last run did: ``shards_computed``, ``shards_loaded``,
    ``blocks_computed``, ``blocks_cached``, ``sweep_runs_computed``, ``sweep_runs_cached`` (r values),
    ``shard_failures``, ``reused`` (the whole kernel set came from the store), ...
    """

    name = "ray"

    def __init__(self, cfg: Config, *, featurizer_factory=None, store: ArtifactStore | bool | None = True,
                 on_event: EventHook | None = None, keep_partials: bool = False, max_restarts: int = 3,
                 max_task_retries: int = 2, object_store_bytes: float | None = None, **init_kwargs: Any):
        self.cfg = cfg
        self.featurizer_factory = featurizer_factory
        self.store = ArtifactStore.from_config(cfg) if store is True else (store or None)
        self.on_event = on_event
        self.keep_partials = keep_partials
        self.actor_options = {"max_restarts": max_restarts, "max_task_retries": max_task_retries}
        self.namespace: Namespace | None = None
        self.fingerprint: str | None = None
        self.stats: dict[str, Any] = {}
        if object_store_bytes:  # init_ray applies it only to a Ray it starts
            init_kwargs.setdefault("object_store_memory", int(object_store_bytes))
        start = time.perf_counter()
        self._started = init_ray(cfg.ray.address, **init_kwargs)
        self.init_s = time.perf_counter() - start

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Shut Ray down only if this backend started it (a stage releases its own actors)."""
        shutdown_ray(self._started)
        self._started = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, event: str, **payload) -> None:
        if self.on_event is not None:
            self.on_event(event, backend=self, **payload)

    # ------------------------------------------------------------------ features + kernels
    def kernels(self, cfg: Config, benchmark: Benchmark, progress: bool = True) -> KernelSet:
        """Φ of every split on feature actors, K and each K_e from block tasks, reusing the store."""
        factory = self.featurizer_factory or ConfigFeaturizerFactory(cfg.model, cfg.features, cfg.storage_options)
        stage = _KernelStage(cfg, benchmark, factory, store=self.store, emit=self._emit,
                             keep_partials=self.keep_partials, actor_options=self.actor_options,
                             progress=progress, init_s=self.init_s)
        self.stats = stage.stats  # live: event hooks may read it mid-run
        try:
            return stage.run()
        finally:
            self.fingerprint, self.namespace = stage.fingerprint, stage.ns

    # ------------------------------------------------------------------ sweep
    def sweep(self, cfg: Config, problem: KernelProblem) -> list[SolverRun]:
        """The telescopic search as one Ray Tune run; reused from the store when already done, and
        resumed when a previous run stopped part way (every solved r is stored as its trial ends)."""
        ns = self.namespace
        key = _sweep_key(cfg, problem) if ns is not None else None
        stats = self.stats
        stats.update(sweep_runs_computed=0, sweep_runs_cached=0)
        if key is not None:
            stored = ns.get_json(f"sweeps/{key}")
            if stored is not None:
                log.info("sweep results loaded from %s", ns.uri)
                return [SolverRun.from_dict(doc) for doc in stored]
        completed = {}
        if key is not None:
            for run_key in ns.keys(f"sweep-runs/{key}/"):
                doc = ns.get_json(run_key)  # verified; a damaged one is discarded and solved again
                if doc is not None:
                    run = SolverRun.from_dict(doc)
                    completed[run.r] = run
            if completed:
                log.info("sweep: %d r values loaded from %s, the rest run on Tune", len(completed), ns.uri)
        stats["sweep_runs_cached"] = len(completed)

        def trial_done(runs: list[SolverRun]) -> None:
            for run in runs:
                if key is not None:
                    ns.save_json(_run_key(key, run.r), run.to_dict())
            stats["sweep_runs_computed"] += len(runs)
            self._emit("sweep_trial", runs=runs)

        name = f"sweep-{(self.fingerprint or 'kernels')[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
        runs = tune_sweep(cfg, problem, name=name, completed=completed, on_result=trial_done,
                          on_round=lambda i, rs: self._emit("round", index=i, runs=rs))
        if key is not None:
            ns.save_json(f"sweeps/{key}", [run.to_dict() for run in runs], meta={"solver": vars(cfg.solver)})
            ns.delete(f"sweep-runs/{key}/")
        return runs


# --------------------------------------------------------------------------------------------
# The features + kernels stage of one run
# --------------------------------------------------------------------------------------------
class _KernelStage:
    """One ``RayBackend.kernels`` call: the driver's event loop over shard results, shard loads
    and block results (``ray.wait`` on all three), with the store consulted first and written as
    it goes.

    The stage owns what it starts: the feature actors (:class:`FeaturePool`, started when the
    first shard needs computing and released as soon as every shard is in) and the datasets it
    puts in the object store. Afterwards it holds the run's fingerprint, its store namespace and
    the counters in ``stats``."""

    def __init__(self, cfg: Config, benchmark: Benchmark, factory, *, store: ArtifactStore | None,
                 emit: EventHook, keep_partials: bool, actor_options: dict[str, int], progress: bool,
                 init_s: float = 0.0):
        self.cfg, self.benchmark, self.factory = cfg, benchmark, factory
        self.store, self.emit, self.keep_partials = store, emit, keep_partials
        self.actor_options = actor_options
        self.progress = progress
        self.splits = {TRAIN: benchmark.train, **benchmark.eval_sets()}
        self.eval_names = list(benchmark.eval_sets())
        self.t0 = time.perf_counter()
        self.timings = {"ray_init_s": init_s}
        self.fingerprint: str | None = None
        self.subset_fp: str | None = None
        self.subset_p: int | None = None
        self.ns: Namespace | None = None
        self.pool: FeaturePool | None = None
        self.inflight: set[Shard] = set()  # being computed or loaded
        self.to_load: deque[Shard] = deque()  # stored shards waiting for a load slot
        self.loading: dict[ray.ObjectRef, tuple[Shard, ray.ObjectRef]] = {}  # status ref -> (shard, Φ ref)
        self.dataset_refs: dict[str, ray.ObjectRef] = {}
        self.embeddings: dict[str, np.ndarray | None] = {name: None for name in self.splits}
        self.diagonal_refs: dict[Shard, ray.ObjectRef] = {}  # ‖φ(x)‖² of evaluation shards (span analysis)
        self.features_done = self.t0
        self.stats = {"fingerprint": None, "shards_computed": 0, "shards_loaded": 0, "blocks_computed": 0,
                      "blocks_cached": 0, "shard_failures": 0, "pids": set(), "nodes": set(), "reused": False}

    def run(self) -> KernelSet:
        from entk_ray.progress import progress_bar

        cached = self._open_store()
        if cached is not None:
            return cached
        shards = {name: [Shard(name, i, a, b) for i, (a, b) in enumerate(kern.split_rows(len(ds), self.cfg.ray.shard_size))]
                  for name, ds in self.splits.items()}
        self.assembler = KernelAssembler(shards, storage_dtype=self.cfg.features.storage_dtype,
                                         max_in_flight=self.cfg.ray.max_blocks_in_flight,
                                         block_gpus=self.cfg.ray.block_gpus, namespace=self.ns,
                                         tile_rows=self.cfg.plan.tile_rows,  # the plan's (None: a shard each)
                                         compute_dtype=self.cfg.plan.kernel_dtype.replace("auto", "float64"))
        self.block_bar = progress_bar(total=self.assembler.total, desc="kernel blocks", unit="block",
                                      enabled=self.progress)
        self.stats["blocks_cached"] = self.assembler.load_cached(self.block_bar)
        compute, load = self._plan_shards(shards)
        self.feature_bar = progress_bar(total=sum(s.size for s in compute), desc="features", unit="ex",
                                        enabled=self.progress)
        try:
            self._load(load)
            self._compute(compute)
            self._loop()
        finally:
            self.feature_bar.close()
            self.block_bar.close()
            self._release_pool()
        done = time.perf_counter()
        self.timings.update(features_s=self.features_done - self.t0, kernels_s=done - self.features_done,
                            examples_computed=float(sum(s.size for s in compute)))
        return self._finish()

    # -------------------------------------------------------------- store
    def _open_store(self) -> KernelSet | None:
        """Fingerprint the run and return the stored kernel set if it is complete."""
        if self.store is None:
            return None  # the actors report S; the driver need not build the model
        # The store is keyed by the run fingerprint, which needs S: build the model once here.
        self.subset_fp, self.subset_p, weights_fp = _driver_fingerprints(self.factory)
        self.fingerprint = self.stats["fingerprint"] = run_fingerprint(
            self.cfg, self.benchmark, self.subset_fp, weights_fp)
        self.ns = self.store.namespace(self.fingerprint, parts={
            "run_fingerprint": self.fingerprint, "weights": weights_fp, "subset": self.subset_fp,
            "manifest": self.benchmark.manifest, "model": self.cfg.model.name, "features": vars(self.cfg.features)})
        sizes = {name: len(ds) for name, ds in self.splits.items()}
        cached = load_kernels(self.ns, sizes, self.eval_names)
        if cached is None:
            return None
        self.stats["reused"] = True
        self.timings.update(features_s=0.0, kernels_s=0.0, store_load_s=time.perf_counter() - self.t0)
        log.info("kernels for fingerprint %s loaded from %s", self.fingerprint, self.ns.uri)
        return KernelSet(cached[0], cached[1], cached[2], self.subset_fp, self.timings, self.subset_p,
                         eval_diagonals=_load_diagonals(self.ns, self.eval_names))

    def _plan_shards(self, shards: dict[str, list[Shard]]) -> tuple[list[Shard], list[Shard]]:
        """(shards to compute, shards to load from the store). A shard with stored embeddings
        whose Φ no missing block reads needs neither; one that a missing block reads is loaded
        when its Φ is stored; anything else is computed."""
        needed = self.assembler.needed_shards()
        stored = set(self.ns.keys("shards/")) if self.ns is not None else set()  # one listing
        compute, load = [], []
        for rows in shards.values():
            for shard in rows:
                emb = self.ns.get_array(shard.key("embeddings")) if shard.key("embeddings") in stored else None
                if emb is not None:
                    self._put_embeddings(shard, emb)
                if emb is None:
                    compute.append(shard)
                elif shard in needed:
                    (load if shard.key("phi") in stored else compute).append(shard)
        if load:
            log.info("loading %d stored feature shards, computing %d", len(load), len(compute))
        return compute, load

    def _finish(self) -> KernelSet:
        if self.fingerprint is None:
            self.fingerprint = self.stats["fingerprint"] = run_fingerprint(
                self.cfg, self.benchmark, self.subset_fp, self.factory.weights_fingerprint())
        missing = [name for name, e in self.embeddings.items() if e is None]
        if missing:
            raise RuntimeError(f"no embeddings for splits {missing}")
        train = self.assembler.kernels[TRAIN]
        evals = {name: self.assembler.kernels[name] for name in self.eval_names}
        computed = self._diagonals()
        diagonals = computed or _load_diagonals(self.ns, self.eval_names)
        if self.ns is not None:
            start = time.perf_counter()
            for name, values in computed.items():  # loaded ones are stored already
                self.ns.save_array(_diagonal_key(name), values, meta={"split": name})
            save_kernels(self.ns, train, evals, self.embeddings)
            if not self.keep_partials:  # nothing reads them again: see the module docstring
                self.ns.delete("blocks/")
                self.ns.delete("shards/")
            self.timings["store_save_s"] = time.perf_counter() - start
            self.emit("kernels")
        return KernelSet(train, evals, self.embeddings, self.subset_fp, self.timings, self.subset_p,
                         eval_diagonals=diagonals)

    def _diagonals(self) -> dict[str, np.ndarray]:
        """‖φ(x)‖² of every evaluation set, from the row-norm tasks of its shards ({} if a shard's
        is missing, e.g. when its blocks were all reused from the store)."""
        out = {}
        for name in self.eval_names:
            shards = sorted((s for s in self.diagonal_refs if s.split == name), key=_shard_order)
            if sum(s.size for s in shards) != len(self.splits[name]):
                return {}
            out[name] = np.concatenate(ray.get([self.diagonal_refs[s] for s in shards]))
        return out

    # -------------------------------------------------------------- the event loop
    def _obtain(self, shards: list[Shard]) -> None:
        """Bring shards (whose Φ is needed again) into the object store: from the store when it
        has them, else from the feature actors."""
        stored = [s for s in shards if self.ns is not None and self.ns.has(s.key("phi"))]
        self._load(stored)
        self._compute([s for s in shards if s not in stored])

    def _load(self, shards: list[Shard]) -> None:
        self.inflight.update(shards)
        self.to_load.extend(shards)
        self._launch_loads()

    def _launch_loads(self) -> None:
        """At most ``max_blocks_in_flight`` loads at a time (each holds a shard in memory)."""
        while self.to_load and len(self.loading) < self.cfg.ray.max_blocks_in_flight:
            shard = self.to_load.popleft()
            phi_ref, ok_ref = load_stored_shard.options(name=f"load features {shard}").remote(
                self.ns, shard.key("phi"))
            self.loading[ok_ref] = (shard, phi_ref)

    def _compute(self, shards: list[Shard]) -> None:
        """Queue shards on the feature actors (starting them, and shipping datasets, if needed)."""
        if not shards:
            return
        if self.pool is None:
            for name in {s.split for s in shards} - set(self.dataset_refs):
                self.dataset_refs[name] = ray.put(self.splits[name])  # once per split, shared by all actors
            self.pool = self._start_pool(len(shards))
        self.inflight.update(shards)
        self.pool.submit(shards)

    def _start_pool(self, shards_needed: int) -> FeaturePool:
        """Feature actors: one per GPU (``gpus_per_worker`` each) when the cluster has GPUs, else
        one per ``cpus_per_worker`` CPUs; ``ray.num_workers`` overrides; never more than shards."""
        r = self.cfg.ray
        gpus = cluster_gpus()
        use_gpu = gpus > 0 and r.gpus_per_worker > 0
        if r.num_workers is not None:
            workers = r.num_workers
        elif use_gpu:
            workers = max(1, int(gpus // r.gpus_per_worker))
        else:
            workers = max(1, int(cluster_cpus() // max(r.cpus_per_worker, 1e-9)))
        workers = max(1, min(workers, shards_needed))
        pool = FeaturePool(self.factory, self.dataset_refs, workers, num_cpus=r.cpus_per_worker,
                           num_gpus=r.gpus_per_worker if use_gpu else 0.0, device=self.cfg.features.device,
                           run_id=f"{(self.fingerprint or 'run')[:8]}-{uuid.uuid4().hex[:4]}",
                           namespace=self.ns, **self.actor_options)
        self.emit("actors", pool=pool)
        log.info("started %d feature actors (%s)", workers, "GPU" if use_gpu else "CPU")
        return pool

    def _loop(self) -> None:
        assembler = self.assembler
        while True:
            self._launch_loads()
            assembler.launch()
            pool = self.pool
            refs = (pool.pending() if pool is not None else []) + list(self.loading) + assembler.pending()
            if not refs:
                if not assembler.missing:
                    return
                # Blocks wait for shards that were lost and are not being recomputed.
                lost = sorted(assembler.waiting_for() - self.inflight, key=_shard_order)
                if not lost:
                    raise RuntimeError(f"{len(assembler.missing)} kernel blocks cannot start")
                self._obtain(lost)
                continue
            ready, _ = ray.wait(refs, num_returns=1)
            for ref in ready:
                pool = self.pool
                if ref in self.loading:
                    self._on_loaded(ref)
                elif pool is not None and pool.owns(ref):
                    result = pool.collect(ref)
                    if result is not None:
                        self._on_shard(result)
                else:
                    block = assembler.block_of(ref)
                    lost = assembler.collect(ref, self.block_bar)
                    if lost:
                        self._obtain(sorted(set(lost) - self.inflight, key=_shard_order))
                    else:
                        self.stats["blocks_computed"] += 1
                        self.emit("block", block=block)

    def _on_loaded(self, ref: ray.ObjectRef) -> None:
        shard, phi_ref = self.loading.pop(ref)
        self.inflight.discard(shard)
        if ray.get(ref):
            self.assembler.add_shard(shard, phi_ref)
            if shard.split != TRAIN:
                self.diagonal_refs[shard] = _row_sq_norms_task.remote(phi_ref, self.cfg.features.storage_dtype)
            self.stats["shards_loaded"] += 1
            self.emit("shard_loaded", shard=shard)
        else:  # missing (deleted meanwhile) or corrupt (logged and discarded by the task)
            log.warning("stored features of shard %s are missing or corrupt: recomputing them", shard)
            self.feature_bar.total += shard.size
            self._compute([shard])
        self._release_pool_when_done()

    def _on_shard(self, result) -> None:
        shard, info = result.shard, result.info
        if self.subset_fp is None:
            self.subset_fp, self.subset_p = info["subset"], info["p"]
        if info["subset"] != self.subset_fp:  # S must be identical on every process and machine
            raise RuntimeError(f"shard {shard} was computed with parameter subset {info['subset']} instead of "
                               f"{self.subset_fp} (node {info['node_id']}): model or library versions differ")
        self.inflight.discard(shard)
        self.assembler.add_shard(shard, result.phi)
        if shard.split != TRAIN:
            self.diagonal_refs[shard] = _row_sq_norms_task.remote(result.phi, self.cfg.features.storage_dtype)
        self._put_embeddings(shard, info["embeddings"])  # the actor has stored both (with a store)
        self.stats["shards_computed"] += 1
        self.stats["pids"].add(info["pid"])
        self.stats["nodes"].add(info["node_id"])
        # Recorded by the driver: a released actor's last metric updates may never be exported.
        metrics.record("shards", 1, split=shard.split)
        metrics.record("examples", shard.size, split=shard.split, worker=info["worker"])
        metrics.record("examples_per_s", shard.size / max(info["seconds"], 1e-9), worker=info["worker"])
        self.feature_bar.update(shard.size)
        self.emit("shard", result=result, pool=self.pool)
        self._release_pool_when_done()

    def _release_pool_when_done(self) -> None:
        pool = self.pool
        if pool is not None and pool.done and not self.inflight:
            self.features_done = time.perf_counter()
            self._release_pool()  # their CPUs/GPUs go to block tasks and sweep trials

    def _release_pool(self) -> None:
        pool = self.pool
        if pool is not None:
            self.stats["shard_failures"] += len(pool.failures)
            pool.release()
            self.pool = None

    def _put_embeddings(self, shard: Shard, rows: np.ndarray) -> None:
        target = self.embeddings[shard.split]
        if target is None:
            target = self.embeddings[shard.split] = np.empty((len(self.splits[shard.split]), rows.shape[1]),
                                                             dtype=rows.dtype)
        target[shard.start:shard.stop] = rows


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _driver_fingerprints(factory) -> tuple[str, int, str]:
    """(S fingerprint, |S|, weights fingerprint), computed on the driver (CPU) so that a fully
    cached run needs no actor (and no GPU node)."""
    import torch

    featurizer = factory(torch.device("cpu"))
    subset, p = featurizer.subset.fingerprint(), featurizer.subset.p
    del featurizer
    return subset, p, factory.weights_fingerprint()


@ray.remote(num_cpus=0.25)
def _row_sq_norms_task(phi: np.ndarray, storage_dtype: str) -> np.ndarray:
    return kern.row_sq_norms(phi_from_wire(phi, storage_dtype))


def _diagonal_key(name: str) -> str:
    from entk_ray.store import safe_name

    return f"diagonals/{safe_name(name)}"


def _load_diagonals(ns, eval_names: list[str]) -> dict[str, np.ndarray]:
    """Stored ‖φ(x)‖² of every evaluation set, or {} (stores written before they were kept)."""
    if ns is None or not all(ns.has(_diagonal_key(n)) for n in eval_names):
        return {}
    return {n: ns.load_array(_diagonal_key(n)) for n in eval_names}


def _shard_order(shard: Shard) -> tuple:
    return (shard.split != TRAIN, shard.split, shard.index)


def _run_key(sweep_key: str, r: float) -> str:
    """One solved r of an unfinished sweep (``repr``: the float back exactly)."""
    return f"sweep-runs/{sweep_key}/r={float(r)!r}"


def _sweep_key(cfg: Config, problem: KernelProblem) -> str:
    """Hash of the solver settings and of the problem (targets, labels, K's trace and size)."""
    return digest({
        "solver": vars(cfg.solver), "n": problem.n, "select_on": problem.select_on, "trace": repr(problem.trace),
        "targets": digest(problem.targets.tolist()),
        "evals": {name: [list(problem.eval_kernels[name].shape), digest(problem.eval_labels[name].tolist())]
                  for name in problem.eval_kernels},
    })
