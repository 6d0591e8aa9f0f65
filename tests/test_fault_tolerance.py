"""Failures during the feature stage: the run completes and K equals the no-failure K.

* a feature actor's process dies mid-shard (``os._exit``): Ray restarts it and the shard is
  recomputed — by Ray's ``max_task_retries``, or, with retries off, by the driver's ``ray.wait``
  scheduler putting the shard back in the queue;
* a shard raises an ordinary exception once: the driver retries it;
* ``ray.kill(actor, no_restart=False)`` from the driver mid-run;
* a worker node of a multi-node cluster disappears mid-run.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import ray

from entk_ray import kernels as kern
from entk_ray.config import Config
from entk_ray.distributed import RayBackend
from entk_ray.distributed.blocks import TRAIN
from entk_ray.distributed.testing import (
    CrashOnceFactory,
    SlowFactory,
    TinyFeaturizerFactory,
    tiny_benchmark,
)

N_TRAIN, N_VAL, N_OOD, SHARD = 96, 32, 32, 32


def setup(tmp_path, p: int = 200, width: int = 4, **ray_options):
    cfg = Config()
    cfg.features.p = p
    cfg.features.batch_size = 16
    cfg.ray.shard_size = SHARD
    for key, value in ray_options.items():
        setattr(cfg.ray, key, value)
    cfg.store.out_dir = str(tmp_path / "out")
    benchmark = tiny_benchmark(n_train=N_TRAIN, n_id_val=N_VAL, n_ood=N_OOD, seed=7)
    return cfg, benchmark, TinyFeaturizerFactory(cfg.features, seed=4, width=width)


def expected_kernels(factory, benchmark):
    """K and K_e as one process assembles them from shards with the same boundaries."""
    featurizer = factory("cpu")
    phi = {name: featurizer.features(ds) for name, ds in {TRAIN: benchmark.train, **benchmark.eval_sets()}.items()}

    def shards(t):
        return [t[a:b] for a, b in kern.split_rows(t.shape[0], SHARD)]

    return {TRAIN: kern.train_kernel(shards(phi[TRAIN])),
            **{n: kern.cross_kernel(shards(phi[n]), shards(phi[TRAIN])) for n in benchmark.eval_sets()}}


def assert_close(got, want):
    """Equal up to float32 round-off: Φ comes from other processes (other thread counts sum in
    other orders), so bits may differ; every entry stays within 1e-5 of the kernel's scale."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def assert_same_kernels(ks, expected):
    assert_close(ks.train, expected[TRAIN])
    for name, kernel in ks.evals.items():
        assert_close(kernel, expected[name])


@pytest.mark.parametrize("max_task_retries", [2, 0])
def test_actor_process_dies_mid_shard(ray_local, tmp_path, max_task_retries):
    cfg, benchmark, factory = setup(tmp_path)
    marker = tmp_path / "crashed.pid"
    crashing = CrashOnceFactory(factory, marker, dataset_len=N_TRAIN, start=SHARD)  # train rows 32..64
    backend = RayBackend(cfg, featurizer_factory=crashing, store=None, max_task_retries=max_task_retries)
    ks = backend.kernels(cfg, benchmark, progress=False)
    assert marker.exists(), "the fault was not injected"
    crashed_pid = int(marker.read_text())
    assert crashed_pid not in backend.stats["pids"]  # the shard was recomputed by another process
    assert backend.stats["shards_computed"] == 3 + 1 + 1
    # Ray re-ran the call on the restarted actor; without task retries the driver re-queued it
    # (calls that reach the actor while it restarts fail again and are re-queued again).
    if max_task_retries:
        assert backend.stats["shard_failures"] == 0
    else:
        assert backend.stats["shard_failures"] >= 1
    assert_same_kernels(ks, expected_kernels(factory, benchmark))


def test_shard_exception_is_retried_not_dropped(ray_local, tmp_path):
    cfg, benchmark, factory = setup(tmp_path, num_workers=1)
    marker = tmp_path / "raised"
    raising = CrashOnceFactory(factory, marker, dataset_len=N_VAL, start=0, mode="raise")  # the id_val shard
    backend = RayBackend(cfg, featurizer_factory=raising, store=None)
    ks = backend.kernels(cfg, benchmark, progress=False)
    assert marker.exists()
    assert backend.stats["shard_failures"] == 1 and backend.stats["shards_computed"] == 5
    assert_same_kernels(ks, expected_kernels(factory, benchmark))


def test_ray_kill_feature_actor_mid_run(ray_local, tmp_path):
    cfg, benchmark, factory = setup(tmp_path)
    killed, pids_before = [], set()

    def kill_one(event, backend=None, pool=None, **payload):
        if event == "actors":  # the pool is up, nothing submitted yet
            pids_before.update(info["pid"] for info in pool.describe())
        if event == "shard" and not killed and pool is not None and pool.pending():
            actor_id = next(iter(pool._inflight.values()))[0]  # an actor with a shard in flight
            ray.kill(pool.actors[actor_id], no_restart=False)
            killed.append(actor_id)

    # 0.5 s per shard: the kill lands while the other actor's shard is still being computed (with
    # millisecond shards its call could already be done, leaving the restarted actor nothing to do)
    backend = RayBackend(cfg, featurizer_factory=SlowFactory(factory, 0.5), store=None, on_event=kill_one)
    ks = backend.kernels(cfg, benchmark, progress=False)
    assert killed, "no actor was killed"
    assert len(pids_before) == 2
    assert backend.stats["pids"] - pids_before, "the restarted actor computed no shard"
    assert_same_kernels(ks, expected_kernels(factory, benchmark))


def test_lost_shard_object_is_recomputed(ray_local, tmp_path):
    """A Φ shard vanishes from the object store after the actors may be gone (as when its node
    dies): the blocks that read it fail, the driver recomputes the shard and the blocks."""
    from ray._private import internal_api

    # Shards of 32 × 1000 float32 (128 KB) live in the object store (smaller ones are inlined in the driver).
    cfg, benchmark, factory = setup(tmp_path, p=1000, width=8)
    freed = []

    def free_last_train_shard(event, result=None, **payload):
        if event == "shard" and result.shard.split == TRAIN and result.shard.stop == N_TRAIN and not freed:
            with warnings.catch_warnings():  # `free` is deprecated, but the way to drop an object
                warnings.simplefilter("ignore", DeprecationWarning)
                internal_api.free([result.phi])
            freed.append(result.shard)

    backend = RayBackend(cfg, featurizer_factory=factory, store=None, on_event=free_last_train_shard)
    ks = backend.kernels(cfg, benchmark, progress=False)
    assert freed
    assert backend.stats["shards_computed"] == 5 + 1  # the freed shard once more, nothing else
    # Equal to a run without the failure (the shard is recomputed by the same code).
    reference = RayBackend(cfg, featurizer_factory=factory, store=None).kernels(cfg, benchmark, progress=False)
    assert_close(ks.train, reference.train)
    for name, kernel in ks.evals.items():
        assert_close(kernel, reference.evals[name])


def test_worker_node_removed_mid_run(ray_cluster, tmp_path):
    """A GPU worker node vanishes after its first shard: its actor restarts (or is replaced) on a
    surviving GPU node, lost shards are recomputed, K is unchanged."""
    ray_cluster.add_node(num_cpus=1, num_gpus=1)  # a spare GPU node to move to
    ray_cluster.wait_for_nodes()
    cfg, benchmark, factory = setup(tmp_path, num_workers=2)
    removed, after = [], []

    def remove_node(event, result=None, **payload):
        if event == "shard" and removed:
            after.append(result.info["node_id"])
        if event == "shard" and not removed:
            node = next(n for n in ray_cluster.worker_nodes if n.node_id == result.info["node_id"])
            ray_cluster.remove_node(node, allow_graceful=False)
            removed.append(node.node_id)

    backend = RayBackend(cfg, featurizer_factory=factory, store=None, on_event=remove_node)
    ks = backend.kernels(cfg, benchmark, progress=False)
    assert removed and after, "the node was not removed mid-run"
    assert removed[0] not in {n.node_id for n in ray_cluster.worker_nodes}
    assert len(ray_cluster.worker_nodes) == 2  # the cluster fixture is back to its usual shape
    assert_same_kernels(ks, expected_kernels(factory, benchmark))
