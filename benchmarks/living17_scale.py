#!/usr/bin/env python
"""Full-size Living-17, synthetic data, through the real Ray pipeline: the scale benchmark.

    python benchmarks/living17_scale.py                  # 44,200 + 1,700 + 1,700 examples, 17 classes,
                                                         # ResNet-50 (random weights), 224 px, p = 500,000
    python benchmarks/living17_scale.py --scale 0.005    # the same code at 0.5 % of the examples
    python benchmarks/living17_scale.py --scale 0.005 --image-size 32 --p 20000   # tests/test_scale.py

The Living-17 shape (``entk_ray.plan.LIVING17_FULL``, times ``--scale``) with seeded synthetic
images made on the fly from their index (``entk_ray.data.synthetic``: no files) and a seeded random
ResNet-50 written as a torchvision checkpoint, run by ``pipeline.run`` on a local Ray that the run
starts itself (RayBackend: feature actors, ``kernel_tile`` tasks, the Tune β sweep, with the plan's
tiles, dtypes, object-store size and solver). It prints the plan, the wall time of every stage
beside the plan's estimate, the peak GPU memory (all processes, from the driver's view of each
GPU), host memory (the machine's, above its level at the start) and object-store memory (Ray's
plasma stats), the plan's projection for one node with 8 GPUs, and last
``ratio: <total seconds / 600>`` (the issue's target: ≤ 1 at full size on one H100).

``--image-size`` and ``--p`` change only the per-example cost (resolution, feature width), for a
test on a CPU; the sizes, the model and the code path stay. Results (``results.json`` with the
plan, timings and the sweep) go to ``--out`` (default: a new temporary folder, so nothing is
reused from an earlier run's artifact store).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from entk_ray.config import Config  # noqa: E402
from entk_ray.plan import (  # noqa: E402
    GPU_MEMORY,
    LIVING17_FULL,
    PRESETS,
    NodeSpec,
    Resources,
    RunSizes,
    make_plan,
)

GB = 1e9


def scaled_sizes(scale: float) -> RunSizes:
    return LIVING17_FULL.scaled(scale) if scale != 1 else LIVING17_FULL


def random_resnet50(path: Path, seed: int) -> Path:
    """A seeded, randomly initialized torchvision ResNet-50 saved as a state_dict (the real loading
    path reads it, as it would read ImageNet weights)."""
    import torch

    from entk_ray.models import create_resnet_backbone

    if not path.exists():
        torch.manual_seed(seed)
        state = create_resnet_backbone("resnet50").state_dict()
        torch.save(state, path)
    return path


def run_config(args, sizes: RunSizes, out: Path, weights: Path) -> Config:
    overrides = [
        "model.name=resnet50", f"model.weights={weights}", "model.checkpoint_format=torchvision",
        "data.benchmark=living17", f"data.crop_size={args.image_size}", f"data.n_train={sizes.n_train}",
        f"data.n_id_val={sizes.evals['id_val']}", f"data.n_ood={sizes.evals['ood']}", f"features.p={args.p}",
        f"features.batch_size={args.batch_size}", "use_ray=true", "ray.address=local", f"store.out_dir={out}",
        f"plan.hardware={args.hardware}",
    ]
    return Config().with_overrides(overrides + list(args.set))


def eight_gpu_node() -> Resources:
    """One node with 8 GPUs: this machine's GPU type (an H100 when it has none), with 8 × the
    CPUs, RAM and disk the ``h100`` preset has per GPU."""
    from entk_ray.plan import local_resources

    here = local_resources().workers[0][0]
    gpu = here.gpu_type if here.gpus and here.gpu_type in GPU_MEMORY else "H100"
    memory = here.gpu_memory_bytes if here.gpus else GPU_MEMORY["H100"]
    h100 = PRESETS["h100"]
    node = NodeSpec(f"8 × {gpu}", 8, gpu, memory, 8 * h100.cpus, 8 * h100.ram_bytes, 8 * h100.disk_bytes,
                    note="8 × the h100 preset's CPUs, RAM and disk")
    return Resources(f"one node, 8 × {gpu}", ((node, 1),))


class PeakMemory:
    """Samples, every ``period`` seconds on a thread: used GPU memory of every visible GPU (all
    processes: total − free), the machine's used host memory, and Ray's object-store bytes."""

    def __init__(self, period: float = 1.0):
        self.period = period
        self.host_start = host_used_bytes()
        self.peaks = {"gpu": 0.0, "host": 0.0, "object_store": 0.0, "spilled": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="peak-memory")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def sample(self) -> None:
        self.peaks["host"] = max(self.peaks["host"], host_used_bytes() - self.host_start)
        gpu = gpu_used_bytes()
        if gpu is not None:
            self.peaks["gpu"] = max(self.peaks["gpu"], gpu)
        store = object_store_stats()
        if store is not None:
            self.peaks["object_store"] = max(self.peaks["object_store"], store[0])
            self.peaks["spilled"] = max(self.peaks["spilled"], store[1])


def gpu_used_bytes() -> float | None:
    """Used memory of all GPUs, all processes: ``nvidia-smi`` (no CUDA context in this process),
    else torch's ``mem_get_info``; None without a GPU."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout
            return sum(float(line) for line in out.split()) * 2**20
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            return float(sum(total - free for free, total in
                             (torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count()))))
    except Exception:  # noqa: BLE001 - a failed sample is skipped
        pass
    return None


def host_used_bytes() -> float:
    """The machine's used memory, MemTotal − MemAvailable from /proc/meminfo (Linux; 0 elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return 0.0
    kib = {name: float(fields[name].split()[0]) for name in ("MemTotal", "MemAvailable") if name in fields}
    return 1024.0 * (kib["MemTotal"] - kib["MemAvailable"]) if len(kib) == 2 else 0.0


def object_store_stats() -> tuple[float, float] | None:
    """(bytes used, bytes spilled so far) of Ray's object stores, or None before Ray is up."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address),
                                      timeout_seconds=5)
        return float(reply.store_stats.object_store_bytes_used), float(reply.store_stats.spilled_bytes_total)
    except Exception:  # noqa: BLE001 - internal API: report nothing rather than fail the run
        return None


def _t(seconds: float) -> str:
    return f"{seconds:8.1f} s"


def full_size_config(cfg: Config) -> Config:
    """``cfg`` at Living-17's full per-example cost: 224 px, p = 500,000."""
    return cfg.with_overrides(["data.crop_size=224", "features.p=500000"])


def extrapolate(measured: dict[str, float], scaled_plan, full_plan) -> dict[str, float]:
    """Measured stage seconds × (the plan's full-size estimate / its estimate for this run): the
    plan's arithmetic (linear in N for features, N² for kernels, n³ for an eigh) carries the
    measurement to full size."""
    def est(plan, *names):
        return sum(plan.stage(n).seconds for n in names if any(s.name == n for s in plan.stages))

    pairs = {"features": ("features",), "kernels": ("kernels",), "sweep": ("solver", "Ray overhead")}
    out = {}
    for stage, names in pairs.items():
        small, big = est(scaled_plan, *names), est(full_plan, *names)
        if stage in measured and small > 0:
            out[stage] = measured[stage] * big / small
    return out


class Deadline:
    """``--max-seconds``: sends this process SIGINT (a KeyboardInterrupt in the main thread, also
    out of a blocking wait, so the pipeline's ``finally`` closes the backend and Ray) once the run
    has taken ``seconds``. Tune's own SIGINT handler is turned off (it would end the sweep's trials
    quietly and let the run go on)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.hit = seconds, False
        self._timer = None

    def __enter__(self):
        if self.seconds:
            import signal

            os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

            def fire():
                self.hit = True
                os.kill(os.getpid(), signal.SIGINT)

            self._timer = threading.Timer(self.seconds, fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc):
        if self._timer is not None:
            self._timer.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the example counts (same code)")
    parser.add_argument("--image-size", type=int, default=224, help="resolution (per-example cost only)")
    parser.add_argument("--p", type=int, default=500_000, help="gradient coordinates (per-example cost only)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per feature batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and of the random weights")
    parser.add_argument("--hardware", default="auto", help="plan.hardware (auto: this machine)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop the run after this long and report the stages finished so far")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and the projections, run nothing")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="any other config override, e.g. --set solver.max_steps=200")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale must be positive, got {args.scale}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")

    from entk_ray import pipeline
    from entk_ray.data.synthetic import synthetic_benchmark
    from entk_ray.models import normalization
    from entk_ray.plan import PlanError, local_resources

    out = Path(args.out or tempfile.mkdtemp(prefix="living17_scale_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes = scaled_sizes(args.scale)
    weights = out / f"resnet50-random-seed{args.seed}.pth"
    cfg = run_config(args, sizes, out, weights)
    print(f"living17_scale: scale {args.scale:g}: n = {sizes.n_train:,} train + {sizes.n_eval:,} eval, "
          f"{sizes.num_classes} classes, ResNet-50 (random weights, seed {args.seed}), {args.image_size} px, "
          f"p = {args.p:,}; output {out}", flush=True)
    here = local_resources() if args.hardware == "auto" else None
    full_cfg = full_size_config(cfg)
    full_plan = make_plan(full_cfg, LIVING17_FULL, here, enforce=False)
    eight = make_plan(full_cfg, LIVING17_FULL, eight_gpu_node(), enforce=False)
    if args.plan_only:
        print(make_plan(cfg, sizes, here, enforce=False).format())
        print(f"full size on {full_plan.resources.name} (the plan): {full_plan.total_seconds:.0f} s"
              + ("" if full_plan.fits else f"; does not fit: {'; '.join(full_plan.shortfalls)}"))
        print(f"full size on {eight.resources.name} (the plan): {eight.total_seconds:.0f} s")
        return 0
    random_resnet50(weights, args.seed)
    mean, std = normalization("resnet50")
    benchmark = synthetic_benchmark(sizes.n_train, sizes.evals["id_val"], sizes.evals["ood"], sizes.num_classes,
                                    args.image_size, args.seed, name=f"living17-synthetic × {args.scale:g}",
                                    mean=mean, std=std)

    start = time.perf_counter()

    def log(line: str) -> None:  # every pipeline line stamped with the run's clock: a stopped run still tells
        print(f"[{time.perf_counter() - start:8.1f} s] {line}", flush=True)

    result = None
    with PeakMemory() as peaks, Deadline(args.max_seconds) as deadline:
        try:
            result = pipeline.run(cfg, progress=not args.quiet, log=log, benchmark=benchmark)
        except PlanError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if not deadline.hit:
                raise
    total = time.perf_counter() - start
    memory = (f"peak memory: GPU {peaks.peaks['gpu'] / GB:.2f} GB (all processes), host {peaks.peaks['host'] / GB:.2f} GB "
              f"above the start (the whole machine's), object store {peaks.peaks['object_store'] / GB:.2f} GB "
              f"(spilled {peaks.peaks['spilled'] / GB:.2f} GB)")
    if result is None:
        print(f"\nstopped by --max-seconds {args.max_seconds:g} after {total:.1f} s: the stamped lines above are the "
              "stages that finished (features and kernels are logged together when the kernels are done)")
        print(memory)
        print(f"full size on {eight.resources.name} (the plan): {eight.total_seconds:.0f} s")
        print("the ratio below is a lower bound (the run did not finish)")
        print(f"ratio: {total / 600:.4f}")
        return 3

    if deadline.hit:  # the interrupt landed where something caught it: the numbers below are of a cut run
        print(f"\nnote: --max-seconds {args.max_seconds:g} passed during the run; a stage may have ended early")
    payload = json.loads(result.paths["results.json"].read_text())
    plan = payload["plan"]
    estimate = plan["stages_s"]
    t = result.timings
    measured = {"features": t.get("features_s", 0.0), "kernels": t.get("kernels_s", 0.0), "sweep": t.get("sweep_s", 0.0)}
    scaled_plan = make_plan(Config.from_dict(payload["config"]), sizes, here, enforce=False)
    # Carried to full size only on a GPU: on CPUs the small run's seconds are Ray's overheads, not the work.
    at_full = args.scale == 1 and args.image_size == 224 and args.p == 500_000
    full = extrapolate(measured, scaled_plan, full_plan) if full_plan.resources.gpus and not at_full else {}

    print("\nstage            measured       plan" + ("   full size (measured × plan's full/this)" if full else ""))
    rows = [("data", t.get("data_s", 0.0), None), ("Ray start", t.get("ray_init_s", 0.0), None),
            ("features", measured["features"], estimate.get("features")),
            ("kernels", measured["kernels"], estimate.get("kernels")),
            ("sweep", measured["sweep"], estimate.get("solver", 0.0) + estimate.get("Ray overhead", 0.0)),
            ("linear probe", t.get("probe_s", 0.0), None)]
    for name, seconds, est in rows:
        line = f"{name:<14} {_t(seconds)}   " + (_t(est) if est is not None else "       —")
        if name in full:
            line += f"   {_t(full[name])}"
        print(line)
    print(f"{'total':<14} {_t(total)}   {_t(plan['total_s'])}")
    print(memory)
    print(f"plan: {plan['solver']}, Φ {plan['storage_dtype']}, tiles of {plan['tile_rows']:,} rows in "
          f"{plan['kernel_dtype']}; hardware {plan['hardware']}")
    # 8 GPUs: features and kernel tiles spread over them; the sweep and the probe as measured.
    fe, ke = (full.get("features", measured["features"]), full.get("kernels", measured["kernels"]))
    rest = full.get("sweep", measured["sweep"]) + t.get("probe_s", 0.0) + t.get("ray_init_s", 0.0)
    gpus = full_plan.resources.gpus
    eight_plan = (f"{eight.total_seconds:.0f} s by the plan "
                  f"({', '.join(f'{s.name} {s.seconds:.0f} s' for s in eight.stages)})")
    if gpus:
        eight_measured = (fe + ke) * gpus / 8 + rest
        print(f"projected full size on {eight.resources.name}: {eight_measured:.0f} s (features and kernels of this "
              f"run{' at full size' if full else ''} × {gpus}/8 GPUs + sweep, probe and Ray start as here); "
              f"{eight_plan}")
    else:  # measured on CPUs: only the plan speaks for GPUs
        print(f"projected full size on {eight.resources.name}: {eight_plan}")
    accuracy = {row["method"]: row["id_acc"] for row in result.rows if row.get("source") == "measured"}
    print("ID accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    print(f"results: {result.paths['results.json']}")
    print(f"ratio: {total / 600:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
