"""A driver killed at any point and rerun with the same command recomputes nothing it finished.

The pipeline runs in a child process (``pipeline_child.py``: tiny model and benchmark, RayBackend
with a local artifact store, joined to this session's Ray) that SIGKILLs itself at a chosen
event: after 2 feature shards, after 3 kernel blocks, after the kernel set is stored, after the
first sweep round (its 3 trials). Each rerun starts from what the killed one left. Before every
rerun the store is listed; the rerun's events say what it computed (shards, blocks, sweep r
values), and none of it may be in that listing. The last run completes, and its table equals an
uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pipeline_child
import ray

from entk_ray import pipeline
from entk_ray.distributed import RayBackend
from entk_ray.report import format_table
from entk_ray.store import ArtifactStore

CHILD = Path(__file__).with_name("pipeline_child.py")
ROOT = Path(__file__).resolve().parents[1]


def run_child(base: Path, out: Path, store: Path, kill: dict | None, name: str) -> tuple[int, list[dict], str]:
    """Run the pipeline in a child process; (exit status, its events, its stderr)."""
    events = base / f"events-{name}.jsonl"
    spec = base / f"spec-{name}.json"
    spec.write_text(json.dumps({"out_dir": str(out), "store": str(store), "events": str(events), "kill": kill,
                                "address": ray.get_runtime_context().gcs_address}))
    events.touch()
    proc = subprocess.run([sys.executable, str(CHILD), str(spec)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, [json.loads(line) for line in events.read_text().splitlines()], proc.stderr


def stored_keys(store: Path) -> set[str]:
    """Keys of every complete artifact in the store (all fingerprints)."""
    artifacts = ArtifactStore(str(store))
    return {key for fp in artifacts.fingerprints() for key in artifacts.namespace(fp).keys()}


def computed(events: list[dict], kind: str) -> set[str]:
    return {e["key"] for e in events if e["event"] == kind}


def test_killed_driver_resumes_without_recomputing(ray_local, tmp_path, monkeypatch):
    store, out = tmp_path / "store", tmp_path / "out"

    # 1. Killed after 2 shards: they (and any other shard the actors finished) are stored.
    rc, events, err = run_child(tmp_path, out, store, {"event": "shard", "count": 2}, "1")
    assert rc == -9, err[-3000:]
    stored = stored_keys(store)
    finished_shards = {k for k in stored if k.endswith("/phi")}
    assert computed(events, "shard") <= finished_shards and len(finished_shards) >= 2
    assert not any(k.startswith("kernels/") for k in stored)

    # 2. Rerun, killed after 3 blocks: the stored shards are loaded, not recomputed.
    rc, events, err = run_child(tmp_path, out, store, {"event": "block", "count": 3}, "2")
    assert rc == -9, err[-3000:]
    assert not computed(events, "shard") & stored, "a finished shard was recomputed"
    assert computed(events, "shard_loaded") & finished_shards, "no stored shard was loaded"
    stored = stored_keys(store)
    finished_blocks = {k for k in stored if k.startswith("blocks/")}
    assert len(finished_blocks) >= 3

    # 3. Rerun, killed once the kernel set is stored: no finished shard or block is recomputed.
    rc, events, err = run_child(tmp_path, out, store, {"event": "kernels", "count": 1}, "3")
    assert rc == -9, err[-3000:]
    assert not (computed(events, "shard") | computed(events, "block")) & stored, "finished work was recomputed"
    assert computed(events, "block"), "every block was already stored: the kill came too late to test anything"
    stored = stored_keys(store)
    assert "kernels/train" in stored and not any(k.startswith(("blocks/", "shards/")) for k in stored)

    # 4. Rerun, killed after the first sweep round (3 r values, one trial each): kernels are
    #    loaded, no feature or block work at all.
    rc, events, err = run_child(tmp_path, out, store, {"event": "sweep_trial", "count": 3}, "4")
    assert rc == -9, err[-3000:]
    assert not {e["event"] for e in events} & {"actors", "shard", "shard_loaded", "block"}
    stored = stored_keys(store)
    solved = {k.rsplit("/", 1)[1] for k in stored if k.startswith("sweep-runs/")}
    assert computed(events, "sweep_trial") <= solved and len(solved) >= 3

    # 5. Rerun to the end: only the r values not yet solved run.
    rc, events, err = run_child(tmp_path, out, store, None, "5")
    assert rc == 0, err[-3000:]
    assert {e["event"] for e in events} <= {"sweep_trial", "round"}
    assert computed(events, "sweep_trial") and not computed(events, "sweep_trial") & solved
    stats = json.loads((out / "stats.json").read_text())
    assert stats["reused"] and stats["shards_computed"] == stats["blocks_computed"] == 0
    assert stats["sweep_runs_cached"] == len(solved) and stats["sweep_runs_computed"] >= 1
    assert not any(k.startswith("sweep-runs/") for k in stored_keys(store))  # folded into sweeps/<key>

    # The same table as an uninterrupted run (in this process, with its own output folder and store).
    cfg = pipeline_child.make_config(str(tmp_path / "ref"), str(tmp_path / "ref-store"))
    monkeypatch.setattr(pipeline, "build_benchmark", pipeline_child.benchmark)
    backend = RayBackend(cfg, featurizer_factory=pipeline_child.factory(cfg))
    pipeline.run(cfg, backend=backend, progress=False, log=lambda _msg: None)
    resumed = json.loads((out / "results.json").read_text())
    assert "store_load_s" in resumed["timings"] and "examples_per_s" not in resumed["timings"]  # nothing computed
    reference = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert format_table(resumed["rows"]) == format_table(reference["rows"])
    for got, want in zip(resumed["rows"], reference["rows"]):
        assert (got["method"], got.get("r"), got.get("step"), got["id_acc"], got["ood_acc"]) == \
               (want["method"], want.get("r"), want.get("step"), want["id_acc"], want["ood_acc"])


def test_corrupt_artifacts_are_recomputed_and_the_run_goes_on(ray_local, tmp_path, monkeypatch, caplog):
    """Flipped bytes in K and an edited sweep document are detected on load, logged with their
    key, discarded and recomputed; the results are those of the undamaged run."""
    import math

    monkeypatch.setattr(pipeline, "build_benchmark", pipeline_child.benchmark)
    cfg = pipeline_child.make_config(str(tmp_path / "out"), str(tmp_path / "store"))
    cfg.solver.rounds = 1  # a short sweep: what is tested is the store

    def run():
        backend = RayBackend(cfg, featurizer_factory=pipeline_child.factory(cfg))
        result = pipeline.run(cfg, backend=backend, progress=False, log=lambda _msg: None)
        return result, backend

    first, backend = run()
    folder = tmp_path / "store" / backend.fingerprint

    # An edited sweep document (better-looking accuracies) is not believed.
    [sweep] = list((folder / "sweeps").glob("*.json"))
    doc = json.loads(sweep.read_text())
    for run_doc in doc["value"]:
        run_doc["accuracy"] = {name: [0.99] * len(acc) for name, acc in run_doc["accuracy"].items()}
    sweep.write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="entk_ray.store"):
        second, backend = run()
    assert f"'sweeps/{sweep.stem}'" in caplog.text
    assert backend.stats["reused"] and backend.stats["sweep_runs_computed"] == len(cfg.solver.r_grid)
    assert format_table(second.rows) == format_table(first.rows)

    # Flipped bytes in K: recomputed (from scratch: the partials were deleted once K was stored).
    data = bytearray((folder / "kernels" / "train.npy").read_bytes())
    data[-16] ^= 0xFF
    (folder / "kernels" / "train.npy").write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level("WARNING", logger="entk_ray.store"):
        third, backend = run()
    assert "'kernels/train'" in caplog.text
    assert not backend.stats["reused"] and backend.stats["shards_computed"] > 0
    assert all(math.isfinite(row["beta"]) for row in third.rows if "beta" in row)
    assert format_table(third.rows) == format_table(first.rows)


def test_stored_bfloat16_shards_are_loaded_not_recomputed(ray_local, tmp_path):
    """Φ shards are stored in their storage dtype (bfloat16 as its int16 bits) and a rerun whose
    blocks are missing loads them into the object store: no feature is computed again."""
    import numpy as np

    from entk_ray.distributed.testing import TinyFeaturizerFactory, tiny_benchmark

    cfg = pipeline_child.make_config(str(tmp_path / "out"), str(tmp_path / "store"))
    cfg.features.storage_dtype = "bfloat16"
    benchmark = tiny_benchmark(n_train=48, n_id_val=16, n_ood=16, seed=4)
    factory = TinyFeaturizerFactory(cfg.features, seed=3)
    first = RayBackend(cfg, featurizer_factory=factory, keep_partials=True)
    ks = first.kernels(cfg, benchmark, progress=False)
    ns = first.namespace
    phi_keys = [k for k in ns.keys("shards/") if k.endswith("/phi")]
    assert len(phi_keys) == 3 + 1 + 1
    assert ns.meta(phi_keys[0])["dtype"] == "<i2" and ns.meta(phi_keys[0])["meta"]["storage_dtype"] == "bfloat16"
    ns.delete("kernels/")
    ns.delete("blocks/")

    again = RayBackend(cfg, featurizer_factory=factory)
    ks2 = again.kernels(cfg, benchmark, progress=False)
    assert again.stats["shards_loaded"] == 5 and again.stats["shards_computed"] == 0
    # Same Φ bits in, same block code: equal up to round-off (the BLAS may sum in another order).
    np.testing.assert_allclose(ks2.train, ks.train, rtol=0, atol=1e-6 * np.abs(ks.train).max())
    np.testing.assert_allclose(ks2.evals["ood:shifted"], ks.evals["ood:shifted"], rtol=0,
                               atol=1e-6 * np.abs(ks.train).max())
    np.testing.assert_array_equal(ks2.embeddings["train"], ks.embeddings["train"])
