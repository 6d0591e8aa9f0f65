"""The Ray backend reproduces the single-process pipeline: Φ, K, K_e, embeddings and the β sweep.

Small on purpose (a seeded two-conv CNN with BatchNorm, ~100 examples; Lite0 at 32 px with small p
for the end-to-end run), on a shared session Ray with two fake GPUs (tests/conftest.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from references import assert_accuracies_close, random_problem

from entk_ray import kernels as kern
from entk_ray.config import Config
from entk_ray.distributed import RayBackend
from entk_ray.distributed.actors import Shard, phi_from_wire, phi_to_wire
from entk_ray.distributed.blocks import TRAIN, plan_blocks
from entk_ray.distributed.sweep import tune_sweep
from entk_ray.distributed.testing import TinyFeaturizerFactory, tiny_benchmark
from entk_ray.solvers import (
    SolverSettings,
    choose_converged,
    choose_early_stopping,
    solve_sweep,
)


def tiny_config(tmp_path, **ray_options) -> Config:
    cfg = Config()
    cfg.features.p = 300
    cfg.features.batch_size = 16
    cfg.ray.shard_size = 32  # a multiple of the batch size: shard and batch boundaries coincide
    for key, value in ray_options.items():
        setattr(cfg.ray, key, value)
    cfg.store.out_dir = str(tmp_path / "out")
    return cfg


def reference(factory, benchmark, shard_size: int | None = None):
    """Single-process Φ (whole splits, as LocalBackend computes them), embeddings, K and K_e;
    with ``shard_size``, also K assembled from shards with the Ray run's boundaries."""
    featurizer = factory("cpu")
    splits = {TRAIN: benchmark.train, **benchmark.eval_sets()}
    phi = {name: featurizer.features(ds) for name, ds in splits.items()}
    emb = {name: featurizer.embeddings(ds).numpy() for name, ds in splits.items()}
    train = kern.train_kernel([phi[TRAIN]])
    evals = {name: kern.cross_kernel([phi[name]], [phi[TRAIN]]) for name in benchmark.eval_sets()}
    sharded = None
    if shard_size is not None:
        def shards(t):
            return [t[a:b] for a, b in kern.split_rows(t.shape[0], shard_size)]
        sharded = {TRAIN: kern.train_kernel(shards(phi[TRAIN])),
                   **{n: kern.cross_kernel(shards(phi[n]), shards(phi[TRAIN])) for n in benchmark.eval_sets()}}
    return phi, emb, train, evals, sharded


def scrape_metrics(expected: dict[str, float], timeout: float = 20.0) -> dict[str, float]:
    """Sum of each metric's samples on this node's metrics endpoint, polled until every one
    reaches its expected minimum (exports are periodic) or ``timeout`` passes."""
    import time
    import urllib.request

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        totals: dict[str, float] = {}
        for line in text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in expected:
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if all(totals.get(k, 0.0) >= v for k, v in expected.items()) or time.monotonic() > deadline:
            return totals
        time.sleep(0.5)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_same_kernel(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float32 round-off: Φ is float32 from convolutions and matmuls, and another
    process (another thread count, another CPU) sums them in another order, so bits may differ
    while every entry stays within 1e-5 of the kernel's scale."""
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


# --------------------------------------------------------------------------------------------
# Pure helpers (no Ray needed)
# --------------------------------------------------------------------------------------------
def test_block_plan_covers_every_entry_once():
    shards = {TRAIN: [Shard(TRAIN, i, a, b) for i, (a, b) in enumerate(kern.split_rows(70, 32))],
              "id_val": [Shard("id_val", i, a, b) for i, (a, b) in enumerate(kern.split_rows(40, 32))]}
    blocks = plan_blocks(shards)
    cover = {TRAIN: np.zeros((70, 70), int), "id_val": np.zeros((40, 70), int)}
    for block in blocks:
        cover[block.kernel][block.a.start:block.a.stop, block.b.start:block.b.stop] += 1
        if block.symmetric and block.a != block.b:
            cover[block.kernel][block.b.start:block.b.stop, block.a.start:block.a.stop] += 1
    assert all((c == 1).all() for c in cover.values())
    assert len({b.key for b in blocks}) == len(blocks) == 3 * 4 // 2 + 2 * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_phi_wire_format_roundtrips_bitwise(dtype):
    phi = torch.randn(5, 7).to(dtype)
    back = phi_from_wire(phi_to_wire(phi), {torch.float32: "float32", torch.float16: "float16",
                                            torch.bfloat16: "bfloat16"}[dtype])
    assert back.dtype == dtype and torch.equal(back, phi)


# --------------------------------------------------------------------------------------------
# Kernels on local Ray (fake GPUs)
# --------------------------------------------------------------------------------------------
def test_ray_kernels_equal_single_process(ray_local, tmp_path):
    cfg = tiny_config(tmp_path, max_blocks_in_flight=3)
    benchmark = tiny_benchmark(n_train=96, n_id_val=40, n_ood=36)
    factory = TinyFeaturizerFactory(cfg.features)
    backend = RayBackend(cfg, featurizer_factory=factory)
    ks = backend.kernels(cfg, benchmark, progress=False)
    _, emb, train, evals, sharded = reference(factory, benchmark, cfg.ray.shard_size)

    assert ks.train.shape == (96, 96) and ks.train.dtype == np.float64
    assert rel_err(ks.train, train) <= 1e-6
    assert np.array_equal(ks.train, ks.train.T)  # symmetric by construction (mirrored), whatever the BLAS
    # Same shard boundaries as the single-process assembly: equal up to the round-off of BLAS
    # products computed in other processes (other thread counts sum in other orders).
    assert_same_kernel(ks.train, sharded[TRAIN])
    for name in benchmark.eval_sets():
        assert ks.evals[name].shape == evals[name].shape
        assert rel_err(ks.evals[name], evals[name]) <= 1e-6
        assert_same_kernel(ks.evals[name], sharded[name])
    for name, value in emb.items():
        np.testing.assert_allclose(ks.embeddings[name], value, rtol=1e-5, atol=1e-6)
    # Two feature actors on the two fake GPUs; each of the 3 + 2 + 2 shards computed once.
    assert backend.stats["shards_computed"] == 7 and len(backend.stats["pids"]) == 2
    assert backend.stats["blocks_computed"] == 6 + 3 * 2 * 2
    assert ks.subset_fingerprint == factory("cpu").subset.fingerprint() and ks.p == 300
    backend.close()
    assert ray.is_initialized(), "a backend must not shut down a Ray it did not start"
    # The custom metrics reach this node's Prometheus endpoint (as ray_<name>).
    expected = {"ray_entk_examples_total": 96 + 40 + 36, "ray_entk_blocks_done_total": 18,
                "ray_entk_shards_done_total": 7}
    exported = scrape_metrics(expected)
    assert all(exported.get(name, 0) >= value for name, value in expected.items()), exported


def test_ray_kernels_uneven_shards_and_bfloat16(ray_local, tmp_path):
    """Shards that cut through batches and a last short shard; Φ stored as bfloat16; block tasks
    scheduled on (fake) GPUs."""
    cfg = tiny_config(tmp_path, shard_size=20, num_workers=1, gpus_per_worker=0.5, block_gpus=0.5)
    cfg.features.storage_dtype = "bfloat16"
    benchmark = tiny_benchmark(n_train=50, n_id_val=30, n_ood=10, seed=3)
    factory = TinyFeaturizerFactory(cfg.features, seed=1)
    backend = RayBackend(cfg, featurizer_factory=factory, store=None)
    ks = backend.kernels(cfg, benchmark, progress=False)
    phi, _, train, evals, _ = reference(factory, benchmark)
    assert phi[TRAIN].dtype == torch.bfloat16
    assert rel_err(ks.train, train) <= 1e-6
    for name in benchmark.eval_sets():
        assert rel_err(ks.evals[name], evals[name]) <= 1e-6
        # ‖φ(x)‖² (span analysis) from the same bfloat16 Φ, decoded, not its int16 bits
        np.testing.assert_allclose(ks.eval_diagonals[name], (phi[name].double() ** 2).sum(1).numpy(), rtol=1e-6)
    assert len(backend.stats["pids"]) == 1 and backend.stats["shards_computed"] == 3 + 2 + 1


def test_store_reuse_partial_and_changed_fingerprint(ray_local, tmp_path):
    cfg = tiny_config(tmp_path)
    benchmark = tiny_benchmark(n_train=64, n_id_val=32, n_ood=32)
    factory = TinyFeaturizerFactory(cfg.features)
    backend = RayBackend(cfg, featurizer_factory=factory, keep_partials=True)
    first = backend.kernels(cfg, benchmark, progress=False)
    ns = backend.namespace
    assert ns.has("kernels/train") and ns.has("kernels/ood-shifted") and ns.has("embeddings/id_val")
    assert len(ns.keys("blocks/")) == 3 + 2 + 2  # train 2 shards (3 blocks); each eval set 1 × 2

    # Same fingerprint: everything reused, no actor started.
    again = backend.kernels(cfg, benchmark, progress=False)
    assert backend.stats["reused"] and backend.stats["shards_computed"] == 0
    assert np.array_equal(again.train, first.train) and np.array_equal(again.evals["id_val"], first.evals["id_val"])
    # ‖φ(x)‖² of the evaluation sets (span analysis): computed by row-norm tasks, stored, reloaded
    assert set(first.eval_diagonals) == set(benchmark.eval_sets())
    phi = reference(factory, benchmark)[0]
    for name in benchmark.eval_sets():
        np.testing.assert_allclose(first.eval_diagonals[name], (phi[name].double() ** 2).sum(1).numpy(),
                                   rtol=1e-6)  # the same Φ in another process: round-off at most
        assert np.array_equal(again.eval_diagonals[name], first.eval_diagonals[name])

    # A crash after some blocks: only the missing blocks, and only their shards, are computed.
    for key in ("kernels/train", "blocks/train/r32-64_c32-64", "shards/train/r32-64/embeddings"):
        ns.delete(key)
    resumed = backend.kernels(cfg, benchmark, progress=False)
    assert not backend.stats["reused"]
    assert backend.stats["blocks_cached"] == 6 and backend.stats["blocks_computed"] == 1
    assert backend.stats["shards_computed"] == 1
    assert_same_kernel(resumed.train, first.train)  # one block recomputed in another process
    assert set(resumed.eval_diagonals) == set(benchmark.eval_sets())  # eval shards not recomputed: from the store
    np.testing.assert_allclose(resumed.embeddings[TRAIN], first.embeddings[TRAIN], rtol=1e-5, atol=1e-6)

    # Another parameter subset S: another fingerprint, nothing reused, another K.
    cfg.features.param_seed = 1
    changed_factory = TinyFeaturizerFactory(cfg.features)
    with RayBackend(cfg, featurizer_factory=changed_factory) as other:
        changed = other.kernels(cfg, benchmark, progress=False)
    assert changed.subset_fingerprint != first.subset_fingerprint
    assert not np.allclose(changed.train, first.train)
    assert len(backend.store.fingerprints()) == 2


# --------------------------------------------------------------------------------------------
# The Tune sweep
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["spectral", "nag"])
def test_tune_sweep_equals_direct_solver(ray_local, tmp_path, method):
    cfg = tiny_config(tmp_path)
    s = cfg.solver
    s.method = method
    s.r_grid, s.rounds, s.points_per_round = [1e-4, 1e-2, 1.0], 2, 3
    s.max_steps, s.eval_every = 60, 10
    problem = random_problem()
    rounds_seen = []
    runs = tune_sweep(cfg, problem, name=f"test-{method}", on_round=lambda i, rs: rounds_seen.append(len(rs)))
    direct = solve_sweep(problem, SolverSettings.from_config(s))
    # the same rounds as the local search (round 0's grid, any edge extension, the zoom)
    assert rounds_seen == [sum(run.round == i for run in direct) for i in range(max(r.round for r in direct) + 1)]
    assert rounds_seen[0] == 3
    assert [(run.r, run.beta, run.round, run.method) for run in runs] == \
        [(run.r, run.beta, run.round, run.method) for run in direct]
    for got, want in zip(runs, direct):
        assert np.array_equal(got.steps, want.steps)
        assert got.accuracy.keys() == want.accuracy.keys()
        for name in want.accuracy:  # the trial's process sums in its own order: one example of slack
            assert_accuracies_close(got.accuracy[name], want.accuracy[name], len(problem.eval_labels[name]),
                                    f"{method} r={got.r} {name}")
        np.testing.assert_allclose(got.grad_norm, want.grad_norm, rtol=1e-9)
        assert got.converged == want.converged and got.final_step == want.final_step
    for choose in (choose_early_stopping, choose_converged):
        assert choose(runs, problem.select_on) == choose(direct, problem.select_on)
    # Tune kept its files under the run's output folder; the driver recorded the solver metrics.
    assert any((tmp_path / "out" / "tune").iterdir())
    steps = sum(run.final_step for run in direct)
    assert scrape_metrics({"ray_entk_solver_steps_total": steps}).get("ray_entk_solver_steps_total", 0) >= steps


# --------------------------------------------------------------------------------------------
# End to end: pipeline.run with the Ray backend equals the local run
# --------------------------------------------------------------------------------------------
def test_pipeline_run_on_ray_matches_local(ray_local, tmp_path):
    from entk_ray import pipeline

    def config(name: str, use_ray: bool) -> Config:
        cfg = Config()
        cfg.use_ray = use_ray
        cfg.features.p = 2000
        cfg.features.batch_size = 16
        cfg.data.n_train, cfg.data.n_id_val, cfg.data.n_ood = 32, 16, 16
        cfg.data.image_size = 32
        cfg.solver.r_grid, cfg.solver.rounds, cfg.solver.points_per_round = [1e-3, 1e-1, 10.0], 2, 3
        cfg.solver.max_steps = 50
        cfg.ray.shard_size = 16
        cfg.store.out_dir = str(tmp_path / name)
        return cfg

    on_ray = pipeline.run(config("ray", True), progress=False, log=lambda _: None)
    local = pipeline.run(config("local", False), progress=False, log=lambda _: None)
    assert on_ray.fingerprint == local.fingerprint
    assert [run.r for run in on_ray.runs] == [run.r for run in local.runs]
    for got, want in zip(on_ray.rows, local.rows):
        assert got["method"] == want["method"]
        assert got["id_acc"] == pytest.approx(want["id_acc"], abs=1e-12)
        assert got["ood_acc"] == pytest.approx(want["ood_acc"], abs=1e-12)
    assert (tmp_path / "ray" / "results.json").is_file()
    assert ray.is_initialized()
    import json  # the span analysis comes with both runs and agrees (K from shards: round-off)
    spans = [json.loads((tmp_path / name / "results.json").read_text())["span"] for name in ("ray", "local")]
    for name in spans[1]["analysis"]["sets"]:
        got, want = (s["analysis"]["sets"][name]["mean"] for s in spans)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9)
    assert (tmp_path / "ray" / "span.png").is_file() and (tmp_path / "ray" / "spectrum.png").is_file()


# --------------------------------------------------------------------------------------------
# A multi-node cluster
# --------------------------------------------------------------------------------------------
def test_cluster_kernels_equal_single_process(ray_cluster, tmp_path):
    cfg = tiny_config(tmp_path)
    benchmark = tiny_benchmark(n_train=64, n_id_val=32, n_ood=32, seed=5)
    factory = TinyFeaturizerFactory(cfg.features, seed=2)
    backend = RayBackend(cfg, featurizer_factory=factory, store=None)
    ks = backend.kernels(cfg, benchmark, progress=False)
    _, _, train, _, sharded = reference(factory, benchmark, cfg.ray.shard_size)
    assert_same_kernel(ks.train, sharded[TRAIN])
    assert rel_err(ks.train, train) <= 1e-6
    for name in benchmark.eval_sets():
        assert_same_kernel(ks.evals[name], sharded[name])
    # One GPU actor per worker node: shards were computed on two different nodes.
    assert len(backend.stats["nodes"]) == 2
