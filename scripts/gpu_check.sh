#!/usr/bin/env bash
# GPU check (< 5 min on one GPU): the quick-start's features, kernels and β sweep through Ray on
# the GPU(s) of this machine, then a kernel-block micro-benchmark. Prints
#   * feature throughput (examples/s) of the Ray feature actors on the GPU,
#   * kernel-block GFLOP/s of entk_ray.kernels.gram_block on the GPU (float64 = the pipeline's
#     compute dtype, and float32 for reference),
#   * kernel blocks of the Ray run on the GPU as well (BLOCK_GPUS=0.25 of a GPU per task; 0: CPU),
#   * that the Ray K equals a single-process K computed on the same GPU (relative error).
#
#   scripts/gpu_check.sh                        # defaults below
#   N_TRAIN=2000 P=500000 scripts/gpu_check.sh  # larger
#   ALLOW_CPU=1 N_TRAIN=64 N_VAL=32 N_OOD=32 P=5000 SHARD=32 BATCH=32 scripts/gpu_check.sh
#                                               # smoke-test this script on a machine without a GPU
#
# Needs: this project installed (pip install -e .), a CUDA build of torch, and a GPU; no network.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

N_TRAIN="${N_TRAIN:-1000}" N_VAL="${N_VAL:-500}" N_OOD="${N_OOD:-500}" P="${P:-500000}" \
IMAGE_SIZE="${IMAGE_SIZE:-64}" SHARD="${SHARD:-256}" BATCH="${BATCH:-64}" OUT="${OUT:-results/gpu_check}" \
ALLOW_CPU="${ALLOW_CPU:-0}" BLOCK_GPUS="${BLOCK_GPUS:-0.25}" \
exec "$PYTHON" - <<'PY'
import os
import time

import numpy as np
import torch

env = os.environ
on_gpu = torch.cuda.is_available()
if not on_gpu and env["ALLOW_CPU"] != "1":
    raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA device (ALLOW_CPU=1 runs it on the CPU)")
device = "cuda" if on_gpu else "cpu"


def sync():
    if on_gpu:
        torch.cuda.synchronize()

from entk_ray import kernels as kern
from entk_ray.config import Config
from entk_ray.distributed import RayBackend
from entk_ray.featurizer import Featurizer
from entk_ray.pipeline import build_benchmark
from entk_ray.solvers import make_problem

cfg = Config()
cfg.use_ray = True
cfg.data.n_train, cfg.data.n_id_val, cfg.data.n_ood = int(env["N_TRAIN"]), int(env["N_VAL"]), int(env["N_OOD"])
cfg.data.image_size = int(env["IMAGE_SIZE"])
cfg.features.p = int(env["P"])
cfg.features.batch_size = int(env["BATCH"])
cfg.ray.shard_size = int(env["SHARD"])
cfg.ray.gpus_per_worker = 1.0
cfg.ray.block_gpus = float(env["BLOCK_GPUS"]) if on_gpu else 0.0  # kernel-block tasks on the GPU too
cfg.store.out_dir = env["OUT"]
cfg.validate()
name = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if on_gpu else "no GPU (CPU smoke test)"
print(f"gpu_check: {name}, torch {torch.__version__}, "
      f"n={cfg.data.n_train}+{cfg.data.n_id_val}+{cfg.data.n_ood}, p={cfg.features.p}, {cfg.data.image_size}px", flush=True)

benchmark = build_benchmark(cfg)
examples = len(benchmark.train) + sum(len(d) for d in benchmark.eval_sets().values())

# 1. The pipeline's heavy stages through Ray (local Ray on this machine; one actor per GPU).
backend = RayBackend(cfg, store=None)
try:
    import ray
    print(f"ray {ray.__version__}: {ray.cluster_resources().get('GPU', 0):.0f} GPUs, "
          f"{ray.cluster_resources().get('CPU', 0):.0f} CPUs (start-up {backend.init_s:.1f}s)", flush=True)
    t0 = time.perf_counter()
    ks = backend.kernels(cfg, benchmark, progress=False)
    t1 = time.perf_counter()
    problem = make_problem(ks.train, benchmark.train.labels, ks.evals,
                           {n: d.labels for n, d in benchmark.eval_sets().items()}, benchmark.num_classes)
    runs = backend.sweep(cfg, problem)
    t2 = time.perf_counter()
    devices = backend.stats["pids"]
    print(f"ray features+kernels: {t1 - t0:.1f}s (features {ks.timings['features_s']:.1f}s, "
          f"after-features kernels {ks.timings['kernels_s']:.1f}s), sweep {t2 - t1:.1f}s over {len(runs)} r values")
    print(f"examples/s (Ray feature actors, {len(devices)} processes): {examples / ks.timings['features_s']:.1f}")
finally:
    backend.close()

# 2. The same K in one process on the GPU (reference) and the kernel-block throughput.
featurizer = Featurizer.from_config(cfg.model, cfg.features, device=device)
sync()
t = time.perf_counter()
phi = featurizer.features(benchmark.train)
sync()
single_rate = len(benchmark.train) / (time.perf_counter() - t)
print(f"examples/s (one process, {device}, train split): {single_rate:.1f}")
reference = kern.train_kernel([phi[a:b] for a, b in kern.split_rows(phi.shape[0], cfg.ray.shard_size)])
err = float(np.linalg.norm(ks.train - reference) / np.linalg.norm(reference))
print(f"K relative difference Ray vs single process: {err:.2e}")

a = phi[: cfg.ray.shard_size].to(device)
b = phi[cfg.ray.shard_size: 2 * cfg.ray.shard_size].to(device)
for dtype in ("float64", "float32"):
    kern.gram_block(a, b, dtype)  # warm-up
    sync()
    reps, t = 5, time.perf_counter()
    for _ in range(reps):
        kern.gram_block(a, b, dtype)
    sync()
    seconds = (time.perf_counter() - t) / reps
    flops = 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
    print(f"kernel GFLOP/s ({dtype} gram_block {a.shape[0]}×{b.shape[0]}×{a.shape[1]}, incl. upcast + copy to host): "
          f"{flops / seconds / 1e9:.1f}")
if err > 1e-6:
    raise SystemExit(f"gpu_check: Ray K differs from the single-process K ({err:.2e})")
print("gpu_check: OK")
PY
