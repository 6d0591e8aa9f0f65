"""A plan before any work: what a run needs, stage by stage, on the hardware it will run on.

From the run's config (model, resolution, p, storage dtype, solver) and sizes (n train examples,
e evaluation examples, C classes) and from the resources (GPUs and their memory, host RAM, object
store, /dev/shm, disk, CPUs, nodes), :func:`make_plan` chooses

* Φ's storage dtype: the configured one (float32 by default) when Φ fits in memory, else
  bfloat16; a forced dtype (``plan.storage_dtype``) that cannot fit is refused;
* where Φ lives: the Ray object store as Ray sizes it by default, a larger object store (the
  setting to start Ray with), or the object store plus spilling to local disk;
* the kernel tiles (rows, shards per tile, tasks per GPU) and the kernels' compute dtype;
* where and how the solver runs: ``gpu-spectral-float64``, ``gpu-spectral-float32``,
  ``gpu-nag-float64`` (batched NAG: all β of a round in one pass over K) or ``cpu-spectral-float64``
  / ``cpu-nag-float64``; these compute the same NAG path, so the fastest float64 one that fits is
  chosen unless ``plan.solver`` names one;

with the memory and time of each stage and the arithmetic behind them (:meth:`Plan.format`). A
plan that cannot fit raises :class:`PlanError` naming the shortfall and settings that would fit.
Times come from :data:`PLANNING_RATES`, one table with the source of every rate: measurements on
an H100 (issues 8, 12 and 13) and, for the A10G, A100 and CPUs, the assumptions of
``docs/scaling.md``. The module imports neither Ray nor torch; :func:`detect_resources` reads them
lazily when they are already loaded or installed.

``python -m entk_ray.plan --hardware h100`` prints the plan for full Living-17;
``python -m entk_ray.plan --markdown`` prints the tables of ``docs/scaling.md``.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from entk_ray.config import IMAGE_BENCHMARKS, PLAN_HARDWARE, Config
from entk_ray.errors import UserInputError

GB = 1e9
GiB = 2.0**30

# ------------------------------------------------------------------------------------------------
# Planning rates: every number a time or memory estimate uses, with its source
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    source: str
    measured: bool


_I13 = "issue 13, H100 80 GB, torch 2.11"
_DOC = "the first docs/scaling.md"
#: (device, quantity) → rate. Devices: GPU types and ``CPU``; quantities: ``features`` (per-example
#: gradient pipeline, ResNet-50 224 px, p = 500k, fp32, examples/s per GPU or per CPU core),
#: ``features_floor`` (batched forward + full backward, same model), ``features_cap`` (the
#: per-example pipeline's rate on a tiny model: overheads, not FLOPs, bound it), ``gram_<dtype>``
#: (kernel product, TFLOP/s per GPU or GFLOP/s per CPU core), ``eigh_float64`` / ``eigh_float32``
#: (seconds at a reference n; scaled as n³), ``hbm`` and ``h2d`` (GB/s).
PLANNING_RATES: dict[tuple[str, str], Rate] = {
    ("H100", "features"): Rate(296, "ex/s", f"{_I13}: compute_features over a dataset, 296–346 ex/s (low end)", True),
    ("H100", "features_floor"): Rate(1781, "ex/s", "issues 8, 12, 13: batched forward + backward, batch 128", True),
    ("H100", "features_cap"): Rate(379, "ex/s", f"{_I13}: one process, EfficientNet-Lite0 64 px, 379–452 ex/s", True),
    ("H100", "gram_float64"): Rate(45, "TFLOP/s", f"{_I13}: gram_block 4096×4096×500k", True),
    ("H100", "gram_float32"): Rate(40, "TFLOP/s", f"{_I13}: gram_block 4096×4096×500k, TF32 off", True),
    ("H100", "gram_tf32"): Rate(175, "TFLOP/s", f"{_I13}: gram_block 4096×4096×500k, TF32 on", True),
    ("H100", "gram_bf16"): Rate(594, "TFLOP/s", f"{_I13}: a raw bf16 matmul", True),
    ("H100", "eigh_float64"): Rate(11.8, "s at n = 24,576", f"{_I13}: torch.linalg.eigh on the GPU", True),
    ("H100", "eigh_float32"): Rate(35, "s at n = 44,200", f"{_I13}: torch.linalg.eigh on the GPU, 47 GB peak", True),
    ("H100", "hbm"): Rate(3350, "GB/s", "H100 SXM data sheet", False),
    ("H100", "h2d"): Rate(20, "GB/s", f"pinned host→GPU copies, {_DOC}", False),
    ("A100-40G", "features"): Rate(200, "ex/s", f"≈ ¼ of ResNet-50 training throughput, {_DOC}", False),
    ("A100-40G", "gram_float64"): Rate(6.8, "TFLOP/s", f"9.7 TFLOP/s peak × 0.7, {_DOC}", False),
    ("A100-40G", "gram_float32"): Rate(13.7, "TFLOP/s", f"19.5 TFLOP/s peak × 0.7, {_DOC}", False),
    ("A100-40G", "gram_tf32"): Rate(109, "TFLOP/s", "156 TFLOP/s data-sheet peak × 0.7", False),
    ("A100-40G", "gram_bf16"): Rate(218, "TFLOP/s", "312 TFLOP/s data-sheet peak × 0.7", False),
    ("A100-40G", "hbm"): Rate(1555, "GB/s", _DOC, False),
    ("A100-40G", "h2d"): Rate(20, "GB/s", f"pinned host→GPU copies, {_DOC}", False),
    ("A10G", "features"): Rate(60, "ex/s", f"≈ ¼ of ResNet-50 training throughput, {_DOC}", False),
    ("A10G", "gram_float64"): Rate(0.7, "TFLOP/s", f"1/32 rate ≈ 1 TFLOP/s × 0.7, {_DOC}", False),
    ("A10G", "gram_float32"): Rate(21.8, "TFLOP/s", f"31.2 TFLOP/s peak × 0.7, {_DOC}", False),
    ("A10G", "gram_tf32"): Rate(43.8, "TFLOP/s", "62.5 TFLOP/s data-sheet peak × 0.7", False),
    ("A10G", "gram_bf16"): Rate(87.5, "TFLOP/s", "125 TFLOP/s data-sheet peak × 0.7", False),
    ("A10G", "hbm"): Rate(600, "GB/s", _DOC, False),
    ("A10G", "h2d"): Rate(20, "GB/s", f"pinned host→GPU copies, {_DOC}", False),
    ("CPU", "features"): Rate(0.32, "ex/s per core",
                              f"31.25 GFLOP/s per core × 0.25 / 24.6 GFLOP per example, {_DOC}", False),
    ("CPU", "gram_float64"): Rate(41, "GFLOP/s per core", "issue 13: LocalBackend kernels, 2.1e13 FLOP (n = 4,096 + "
                                "1,024 eval, p = 500k, float64) in 31.6 s on 16 cores", True),
    ("CPU", "gram_float32"): Rate(82, "GFLOP/s per core", "twice the float64 rate", False),
    ("CPU", "eigh_float64"): Rate(14.6, "s at n = 8,192 on 16 cores", "issue 13: numpy eigh, 16 cores", True),
    ("CPU", "memory_bandwidth"): Rate(100, "GB/s per node", _DOC, False),
    ("CPU", "decode"): Rate(8, "ms per image per core", f"JPEG decode + resize + crop, {_DOC}", False),
    ("Ray", "sweep_overhead"): Rate(1.9, "s", "issue 10: benchmarks/ray_overhead.py --sweep-only --repeats 7, "
                                            "2 cores: the quick-start-sized sweep took 2.38 s through Tune, 0.50 s in "
                                            "one process; Tune's floor (a run of one no-op trial) 1.43 s", True),
    # Trained baselines (entk_ray.finetune): ResNet-50 training steps at 224 px, batch 64.
    ("H100", "train_fp32"): Rate(1781, "ex/s", "issue 12: forward + backward of ResNet-50 at 224 px, fp32", True),
    ("H100", "train_bf16"): Rate(2754, "ex/s", "issue 12: the same under bf16 autocast with channels_last", True),
    ("A100-40G", "train_fp32"): Rate(round(1781 * 1555 / 3350), "ex/s", "H100's × HBM bandwidth ratio 1555/3350 "
                                     "(a batch-64 step runs at ≈ 7 % of the H100's bf16 peak: memory-bound)", False),
    ("A100-40G", "train_bf16"): Rate(round(2754 * 1555 / 3350), "ex/s", "H100's × HBM bandwidth ratio 1555/3350",
                                     False),
    ("A10G", "train_fp32"): Rate(round(1781 * 600 / 3350), "ex/s", "H100's × HBM bandwidth ratio 600/3350", False),
    ("A10G", "train_bf16"): Rate(round(2754 * 600 / 3350), "ex/s", "H100's × HBM bandwidth ratio 600/3350", False),
    ("Ray", "trainer_start"): Rate(25, "s per trial", "issue 12: a trivial TorchTrainer.fit took 21–28 s on the "
                                   "loaded 2-core development machine (an upper figure)", True),
}
#: Reference sizes of the eigh measurements.
EIGH_REFERENCE_N = {("H100", "float64"): 24576, ("H100", "float32"): 44200, ("CPU", "float64"): 8192}
EIGH_REFERENCE_CORES = 16

#: GPU types: memory (bytes) and the device whose rates an unlisted GPU borrows.
GPU_MEMORY = {"H100": 80 * GB, "A100-40G": 40 * GB, "A10G": 24 * GB}

#: Forward multiply-adds at 224 px (published figures); a per-example gradient ≈ 3 forwards.
MODEL_MACS_224 = {"resnet50": 4.1e9, "resnet18": 1.82e9, "efficientnet_lite0": 0.39e9}
#: GPU memory of the per-example feature computer per example of a batch: 39 GB at batch 128 for
#: ResNet-50 224 px (issue 8), scaled by forward MACs for other models and resolutions (assumption).
FEATURE_GPU_BYTES_PER_EXAMPLE = 39 * GB / 128

# Memory model constants (assumptions, stated in the plan's lines where used).
USABLE_GPU_FRACTION = 0.9  # the rest: CUDA context, allocator fragmentation
GPU_CONTEXT_BYTES = 1 * GB  # CUDA context + cuBLAS workspace of one task
STORE_HEADROOM = 1.05  # object-store room beyond the objects themselves
SPILL_DISK_FRACTION = 0.8  # of the free disk, usable for Ray's spill files
ACTOR_HOST_BYTES = 3 * GB  # one feature actor's process (model, loader, CUDA context)
EIGH_GPU_FACTOR = 6.0  # GPU eigh peak / (n² × bytes): 47 GB at n = 44,200 float32 (issue 13)
EIGH_CPU_FACTOR = 5.0  # CPU eigh peak / (n² × 8 B), K included: 63–78 GB at n = 44,200 (docs/scaling.md)
MIN_GPU_TILE_ROWS = 2048  # below this a block's copies outweigh its products
MAX_TILE_ROWS = 8192  # beyond this the copies are already below the products; a retry redoes less
CPU_TILE_ROWS = 1024  # CPU products run at their rate from a few hundred rows; bound memory instead
MIN_CPU_TRAIN_TILES = 4  # on CPUs, tiles of fewer rows (whole shards) when n is small
GPU_COLUMN_CHUNK = 16384  # = entk_ray.kernels.GPU_COLUMN_CHUNK (tested)
CPU_COLUMN_CHUNK = 65536  # = entk_ray.kernels.DEFAULT_COLUMN_CHUNK (tested)
RAY_DEFAULT_STORE_FRACTION = 0.3  # Ray: 30 % of the node's memory ...
RAY_DEFAULT_STORE_CAP = 200 * GB  # ... at most 200 GB ...
RAY_SHM_FRACTION = 0.95  # ... and at most 95 % of /dev/shm (but not below 10 GB)
RAY_SHM_FLOOR = 10 * GB

STORAGE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
OPERAND_BYTES = {"float64": 8, "float32": 4, "tf32": 4, "bf16": 2}
ACCUMULATE_BYTES = {"float64": 8, "float32": 4, "tf32": 4, "bf16": 4}
NUM_CLASSES = {"digits": 10, "living17": 17, "entity13": 13, "entity30": 30, "nonliving26": 26}


def rate(device: str, quantity: str) -> float:
    """A planning rate's value. A GPU type without its own entry for ``quantity`` (an unlisted
    GPU) borrows the A10G's, the slowest GPU in the table."""
    key = (device, quantity)
    if key not in PLANNING_RATES and device not in ("CPU", "Ray"):
        key = ("A10G", quantity)
    return PLANNING_RATES[key].value


class PlanError(UserInputError, ValueError):
    """The run does not fit the hardware; the message names the shortfall and settings that fit."""

    def __init__(self, message: str, plan: "Plan | None" = None):
        super().__init__(message)
        self.plan = plan


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSizes:
    """Examples per split and classes: n train, each evaluation set's size, C."""

    n_train: int
    evals: Mapping[str, int]
    num_classes: int
    label: str = ""

    @property
    def n_eval(self) -> int:
        return int(sum(self.evals.values()))

    @property
    def n_total(self) -> int:
        return self.n_train + self.n_eval

    @classmethod
    def from_benchmark(cls, benchmark) -> "RunSizes":
        """Sizes of a loaded :class:`entk_ray.data.base.Benchmark`."""
        return cls(len(benchmark.train), {name: len(ds) for name, ds in benchmark.eval_sets().items()},
                   benchmark.num_classes, benchmark.name)

    def scaled(self, factor: float) -> "RunSizes":
        return RunSizes(max(1, round(self.n_train * factor)),
                        {k: max(1, round(v * factor)) for k, v in self.evals.items()}, self.num_classes,
                        f"{self.label} × {factor:g}")


#: Full Living-17 (BREEDS, Santurkar et al.): 34 source subclasses × 1,300 train images, ID and OOD
#: validation 1,700 each, 17 superclasses. Lets ``--plan`` run without ImageNet on disk.
LIVING17_FULL = RunSizes(44200, {"id_val": 1700, "ood": 1700}, 17, "living17")
NOMINAL_SIZES = {"living17": LIVING17_FULL}


def sizes_from_config(cfg: Config) -> RunSizes:
    """The run's sizes without reading data: ``data.n_*`` when all are set, else the benchmark's
    nominal full size (Living-17); other benchmarks need :meth:`RunSizes.from_benchmark`."""
    d = cfg.data
    nominal = NOMINAL_SIZES.get(d.benchmark)
    n_ood_sets = len(d.ood_dirs) if d.benchmark == "image_folder" else 1
    if nominal is not None:
        ood = {k: v for k, v in nominal.evals.items() if k != "id_val"}
        return RunSizes(d.n_train or nominal.n_train,
                        {"id_val": d.n_id_val or nominal.evals["id_val"],
                         **{k: d.n_ood or v for k, v in ood.items()}},
                        nominal.num_classes, d.benchmark if d.n_train is None else f"{d.benchmark} (subset)")
    if None in (d.n_train, d.n_id_val, d.n_ood) or d.benchmark not in NUM_CLASSES:
        raise PlanError(f"the sizes of data.benchmark={d.benchmark!r} are not known without its data: set "
                        "data.n_train, data.n_id_val and data.n_ood, or plan with RunSizes.from_benchmark(benchmark)")
    evals = {"id_val": d.n_id_val, **{f"ood{i}" if n_ood_sets > 1 else "ood": d.n_ood for i in range(n_ood_sets)}}
    return RunSizes(d.n_train, evals, NUM_CLASSES[d.benchmark], d.benchmark)


# ------------------------------------------------------------------------------------------------
# Resources
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeSpec:
    """One machine. Bytes throughout; ``shm_bytes`` None means Linux's default (half the RAM),
    ``object_store_bytes`` None means Ray's default (see :meth:`default_object_store`)."""

    name: str
    gpus: int
    gpu_type: str | None
    gpu_memory_bytes: float
    cpus: int
    ram_bytes: float
    disk_bytes: float
    shm_bytes: float | None = None
    object_store_bytes: float | None = None
    disk_gbps: float = 1.0  # spill bandwidth
    network_gbps: float = 1.25  # node-to-node object transfer
    note: str = ""

    @property
    def shm(self) -> float:
        return self.shm_bytes if self.shm_bytes is not None else self.ram_bytes / 2

    def default_object_store(self) -> float:
        """Ray's default: min(0.3 × RAM, 200 GB, max(10 GB, 0.95 × /dev/shm)) (ray._private.utils)."""
        cap = min(RAY_DEFAULT_STORE_CAP, max(RAY_SHM_FLOOR, RAY_SHM_FRACTION * self.shm))
        return min(RAY_DEFAULT_STORE_FRACTION * self.ram_bytes, cap)

    def object_store(self) -> float:
        return self.object_store_bytes if self.object_store_bytes is not None else self.default_object_store()

    def max_object_store(self) -> float:
        """The largest object store in /dev/shm (a larger one falls back to disk-backed /tmp)."""
        return max(self.object_store(), RAY_SHM_FRACTION * self.shm)

    def describe(self) -> str:
        gpu = f"{self.gpus} × {self.gpu_type} ({_b(self.gpu_memory_bytes)}), " if self.gpus else "no GPU, "
        shm = f"/dev/shm {_b(self.shm)}" + (" (half the RAM)" if self.shm_bytes is None else "")
        return (f"{gpu}{self.cpus} CPUs, RAM {_b(self.ram_bytes)}, {shm}, disk {_b(self.disk_bytes)}"
                + (f"; {self.note}" if self.note else ""))


@dataclass(frozen=True)
class Resources:
    """Worker node types with their counts (features and kernels run there) and the head node
    that runs the driver (None: the first worker node)."""

    name: str
    workers: tuple[tuple[NodeSpec, int], ...]
    head: NodeSpec | None = None

    @property
    def gpus(self) -> int:
        return sum(node.gpus * count for node, count in self.workers)

    @property
    def nodes(self) -> int:
        return sum(count for _, count in self.workers) + (1 if self.head is not None else 0)

    @property
    def gpu_nodes(self) -> list[tuple[NodeSpec, int]]:
        return [(node, count) for node, count in self.workers if node.gpus]

    @property
    def driver_node(self) -> NodeSpec:
        return self.head if self.head is not None else self.workers[0][0]

    @property
    def worker_cpus(self) -> int:
        return sum(node.cpus * count for node, count in self.workers)

    @property
    def gpu_type(self) -> str | None:
        """The GPU type whose rates the plan uses: the slowest one present (by feature rate)."""
        types = {node.gpu_type for node, _ in self.gpu_nodes if node.gpu_type}
        return min(types, key=lambda t: (rate(t, "features"), t)) if types else None

    @property
    def gpu_memory(self) -> float:
        return min((node.gpu_memory_bytes for node, _ in self.gpu_nodes), default=0.0)

    def describe(self) -> str:
        parts = [f"{count} × {node.name} [{node.describe()}]" for node, count in self.workers]
        head = f"; driver on a head {self.head.name} [{self.head.describe()}]" if self.head else "; driver on the (first) node"
        return " + ".join(parts) + head


def _aws(name: str, gpus: int, gpu_type: str | None, cpus: int, ram_gib: float, disk_gib: float,
         network_gbps: float) -> NodeSpec:
    """A node type of cluster/aws.yaml: Docker with --shm-size=64g, gp3 EBS root volume."""
    return NodeSpec(name, gpus, gpu_type, GPU_MEMORY.get(gpu_type, 0.0) if gpu_type else 0.0, cpus, ram_gib * GiB,
                    disk_gib * GiB, shm_bytes=64 * GiB, disk_gbps=0.125, network_gbps=network_gbps,
                    note="cluster/aws.yaml: --shm-size=64g, gp3 root volume (0.125 GB/s)")


#: Node types: those of cluster/aws.yaml (their /dev/shm and disks as it sets them; network rates
#: are AWS's nominal figures, an assumption) and one H100 machine.
PRESETS: dict[str, NodeSpec] = {
    "h100": NodeSpec("h100", 1, "H100", GPU_MEMORY["H100"], 16, 128 * GiB, 64 * GiB, disk_gbps=1.0,
                     note="local NVMe assumed at 1 GB/s"),
    "g5.12xlarge": _aws("g5.12xlarge", 4, "A10G", 48, 192, 300, network_gbps=5.0),
    "p4d.24xlarge": _aws("p4d.24xlarge", 8, "A100-40G", 96, 1152, 500, network_gbps=12.5),
    "r6i.8xlarge": _aws("r6i.8xlarge", 0, None, 32, 256, 500, network_gbps=1.56),
}


def preset(name: str, nodes: int = 1, head: str | None = None) -> Resources:
    """``nodes`` × the preset node type, with an optional separate head node type."""
    if name not in PRESETS:
        raise PlanError(f"unknown hardware preset {name!r}; known: {', '.join(PRESETS)}")
    if head is not None and head not in PRESETS:
        raise PlanError(f"unknown head preset {head!r}; known: {', '.join(PRESETS)}")
    label = f"{nodes} × {name}" if nodes > 1 else name
    if head is not None:
        label += f" + head {head}"
    return Resources(label, ((PRESETS[name], nodes),), PRESETS[head] if head else None)


def custom_resources(*, gpus: int = 0, gpu_type: str = "H100", gpu_memory_gb: float | None = None, cpus: int = 16,
                     ram_gb: float = 64.0, disk_gb: float = 100.0, object_store_gb: float | None = None,
                     shm_gb: float | None = None, nodes: int = 1, name: str = "custom") -> Resources:
    """Resources from plain numbers (GB = 10⁹ bytes); no Ray, no torch."""
    memory = (gpu_memory_gb * GB if gpu_memory_gb is not None else GPU_MEMORY.get(gpu_type, 0.0)) if gpus else 0.0
    node = NodeSpec(name, int(gpus), gpu_type if gpus else None, memory, int(cpus), ram_gb * GB, disk_gb * GB,
                    shm_bytes=shm_gb * GB if shm_gb is not None else None,
                    object_store_bytes=object_store_gb * GB if object_store_gb is not None else None)
    return Resources(f"{nodes} × {name}" if nodes > 1 else name, ((node, int(nodes)),))


def gpu_type_from_name(name: str) -> str:
    """A CUDA device name (or Ray accelerator type) → a key of :data:`GPU_MEMORY` when known."""
    upper = name.upper()
    if "H100" in upper or "H200" in upper:
        return "H100"
    if "A100" in upper:
        return "A100-40G"
    if "A10G" in upper:
        return "A10G"
    return name or "GPU"


def resources_from_ray_nodes(nodes: Sequence[Mapping[str, Any]], gpu_memory_bytes: float | None = None,
                             disk_bytes: float | None = None) -> Resources:
    """Resources from ``ray.nodes()`` (a list of dicts; pure, testable without Ray).

    Ray reports CPUs, GPUs, ``memory`` (RAM left for tasks) and ``object_store_memory`` per node and
    an ``accelerator_type:<X>`` resource; RAM ≈ memory + object store. GPU memory comes from the
    GPU type's table entry (or ``gpu_memory_bytes``); disk is not reported (``disk_bytes``, else
    this machine's). GPUs whose memory is thus unknown (no known accelerator type: custom
    ``num_gpus``, e.g. the tests' fake GPUs) are left out of the plan, which then puts no work on
    them; ``plan.hardware=custom`` plans for them."""
    disk = disk_bytes if disk_bytes is not None else shutil.disk_usage(tempfile.gettempdir()).free
    specs: dict[NodeSpec, int] = {}
    for info in nodes:
        if not info.get("Alive", True):
            continue
        res = info.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        accel = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), "")
        gpu_type = gpu_type_from_name(accel) if gpus else None
        memory = gpu_memory_bytes or GPU_MEMORY.get(gpu_type or "", 0.0)
        note = "from ray.nodes()"
        if gpus and not memory:
            note += f"; {gpus} GPU(s) of unknown type and memory left out of the plan"
            gpus, gpu_type = 0, None
        store = float(res.get("object_store_memory", 0.0))
        ram = float(res.get("memory", 0.0)) + store
        spec = NodeSpec(f"ray node ({gpus} GPU)" if gpus else "ray node", gpus, gpu_type, memory if gpus else 0.0,
                        int(res.get("CPU", 0)), ram, disk, shm_bytes=store / RAY_SHM_FRACTION,
                        object_store_bytes=store, note=note)
        specs[spec] = specs.get(spec, 0) + 1
    if not specs:
        raise PlanError("ray.nodes() lists no live node")
    ordered = sorted(specs.items(), key=lambda item: -item[0].gpus)
    return Resources("connected Ray cluster", tuple(ordered))


def local_resources() -> Resources:
    """This machine: CPUs, RAM, /dev/shm, free disk, and CUDA GPUs when torch sees them."""
    cpus = os.cpu_count() or 1
    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        st = os.statvfs("/dev/shm")
        shm = float(st.f_frsize * st.f_blocks)
    except OSError:
        shm = None
    disk = float(shutil.disk_usage(tempfile.gettempdir()).free)
    gpus, gpu_type, gpu_memory = 0, None, 0.0
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            props = torch.cuda.get_device_properties(0)
            gpu_memory = float(props.total_memory)
            gpu_type = gpu_type_from_name(props.name)
    except ImportError:  # planning needs no torch
        pass
    node = NodeSpec("this machine", gpus, gpu_type, gpu_memory, cpus, ram, disk, shm_bytes=shm)
    return Resources("this machine", ((node, 1),))


def detect_resources() -> Resources:
    """The connected Ray cluster when Ray is initialized in this process, else this machine."""
    ray = sys.modules.get("ray")  # never imported here: only read when the caller connected it
    if ray is not None and ray.is_initialized():
        local = local_resources()
        node = local.workers[0][0]
        return resources_from_ray_nodes(ray.nodes(), gpu_memory_bytes=node.gpu_memory_bytes or None,
                                        disk_bytes=node.disk_bytes)
    return local_resources()


def resources_from_config(cfg: Config) -> Resources:
    """``plan.hardware``: auto (detected), a preset, or custom (the ``plan.*`` numbers)."""
    pc = cfg.plan
    if pc.hardware == "auto":
        return detect_resources()
    if pc.hardware == "custom":
        return custom_resources(gpus=pc.gpus, gpu_type=pc.gpu_type, gpu_memory_gb=pc.gpu_memory_gb, cpus=pc.cpus,
                                ram_gb=pc.ram_gb, disk_gb=pc.disk_gb, object_store_gb=pc.object_store_gb,
                                shm_gb=pc.shm_gb, nodes=pc.nodes)
    return preset(pc.hardware, pc.nodes, pc.head)


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One stage's estimate: ``seconds`` and the arithmetic lines behind it."""

    name: str
    seconds: float
    headline: str
    lines: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What a run will do on its hardware (see the module docstring). Fields later stages read:
    ``storage_dtype``, ``object_store_bytes`` (None: Ray's default is enough), ``spill_bytes``,
    ``tile_rows``, ``block_gpus``, ``kernel_dtype``, ``solver``, ``solver_device``,
    ``solver_dtype``, ``solver_method``, ``decode_workers``."""

    title: str
    sizes: RunSizes
    resources: Resources
    p: int
    model: str
    resolution: int
    use_ray: bool
    storage_dtype: str
    storage_forced: bool
    phi_bytes: float
    object_store_bytes: float | None
    object_store_needed_bytes: float
    spill_bytes: float
    kernel_dtype: str
    kernel_device: str
    tile_rows: int
    shard_size: int
    block_gpus: float
    max_blocks_in_flight: int
    kernel_tasks: int
    solver: str
    solver_device: str
    solver_dtype: str
    solver_method: str
    decode_workers: int
    stages: list[Stage]
    storage_lines: list[str]
    memory_lines: list[str]
    host_peak_bytes: float
    shortfalls: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.shortfalls

    @property
    def total_seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def shards_per_tile(self) -> int:
        return max(1, self.tile_rows // self.shard_size)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def format(self) -> str:
        """The plan as text: sizes, hardware, Φ, each stage with its arithmetic, memory, total."""
        out = [self.title,
               f"  hardware: {self.resources.name}: {self.resources.describe()}",
               f"Φ storage: {self.storage_dtype}" + (" (forced)" if self.storage_forced else "")]
        out += [f"  {line}" for line in self.storage_lines]
        for stage in self.stages:
            out.append(f"{stage.name}: {_t(stage.seconds)} — {stage.headline}")
            out += [f"  {line}" for line in stage.lines]
        out.append("Host memory")
        out += [f"  {line}" for line in self.memory_lines]
        out.append(f"Total: {' + '.join(_t(s.seconds) for s in self.stages)} = {_t(self.total_seconds)}")
        for note in self.notes:
            out.append(f"Note: {note}")
        if self.fits:
            out.append("Fits.")
        else:
            out.append("Does not fit: " + "; ".join(self.shortfalls))
            if self.suggestions:
                out.append("Settings that would fit: " + "; ".join(self.suggestions))
        return "\n".join(out)

    def refusal(self) -> str:
        message = f"plan refused ({self.resources.name}): " + "; ".join(self.shortfalls)
        if self.suggestions:
            message += ". Settings that would fit: " + "; ".join(self.suggestions)
        return message

    def to_dict(self) -> dict[str, Any]:
        """The choices and per-stage seconds, for the results file."""
        return {
            "hardware": self.resources.name, "fits": self.fits, "storage_dtype": self.storage_dtype,
            "phi_bytes": self.phi_bytes, "object_store_bytes": self.object_store_bytes,
            "object_store_needed_bytes": self.object_store_needed_bytes, "spill_bytes": self.spill_bytes,
            "kernel_dtype": self.kernel_dtype, "kernel_device": self.kernel_device, "tile_rows": self.tile_rows,
            "block_gpus": self.block_gpus, "kernel_tasks": self.kernel_tasks, "solver": self.solver,
            "solver_device": self.solver_device, "solver_dtype": self.solver_dtype,
            "decode_workers": self.decode_workers, "host_peak_bytes": self.host_peak_bytes,
            "stages_s": {s.name: s.seconds for s in self.stages}, "total_s": self.total_seconds,
            "shortfalls": list(self.shortfalls), "suggestions": list(self.suggestions),
        }

    def apply(self, cfg: Config) -> Config:
        """A copy of ``cfg`` with the plan's choices that have config fields: Φ's storage dtype,
        kernel tiles, compute dtype, kernel-task GPUs and in-flight tasks, decode workers, the
        solver's method, device and dtype. Planning the copy again gives the same plan."""
        new = Config.from_dict(cfg.to_dict())
        new.features.storage_dtype = self.storage_dtype
        new.plan.tile_rows = self.tile_rows
        new.plan.kernel_dtype = self.kernel_dtype
        new.ray.block_gpus = self.block_gpus
        new.ray.max_blocks_in_flight = self.max_blocks_in_flight
        new.features.num_workers = max(new.features.num_workers, self.decode_workers)
        new.solver.method = self.solver_method
        new.solver.device = self.solver_device
        new.solver.dtype = self.solver_dtype
        return new


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------
def _b(x: float) -> str:
    """Bytes in decimal units (GB = 10⁹ B)."""
    if x < 0:
        return f"−{_b(-x)}"
    if x >= 1e12:
        return f"{x / 1e12:.2f} TB"
    if x >= 1e9:
        return f"{x / 1e9:.1f} GB"
    if x >= 1e6:
        return f"{x / 1e6:.0f} MB"
    return f"{x / 1e3:.0f} kB"


def _t(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _n(x: float) -> str:
    return f"{int(round(x)):,}"


def _f(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:,.0f}"


def _e(x: float) -> str:
    """A large count as 1.33e15."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    model: str
    resolution: int
    p: int
    benchmark: str
    use_ray: bool
    shard_size: int
    batch_size: int
    num_workers: int
    configured_dtype: str
    forced_dtype: str | None
    kernel_dtype: str
    solver: str
    method: str
    block_gpus: float
    max_in_flight: int
    rounds: int
    points: int
    max_steps: int
    eval_every: int
    tile_rows: int | None
    enforce: bool


def _inputs(cfg: Config, enforce: bool | None) -> _Inputs:
    d, f, s, pc = cfg.data, cfg.features, cfg.solver, cfg.plan
    image = d.benchmark in IMAGE_BENCHMARKS
    return _Inputs(
        model=cfg.model.name, resolution=d.crop_size if image else d.image_size, p=f.p, benchmark=d.benchmark,
        use_ray=cfg.use_ray, shard_size=cfg.ray.shard_size, batch_size=f.batch_size, num_workers=f.num_workers,
        configured_dtype=f.storage_dtype, forced_dtype=None if pc.storage_dtype == "auto" else pc.storage_dtype,
        kernel_dtype=pc.kernel_dtype, solver=pc.solver, method=s.method, block_gpus=cfg.ray.block_gpus,
        max_in_flight=cfg.ray.max_blocks_in_flight, rounds=s.rounds, points=max(len(s.r_grid), s.points_per_round),
        max_steps=s.max_steps, eval_every=s.eval_every, tile_rows=pc.tile_rows,
        enforce=pc.enforce if enforce is None else enforce)


def make_plan(cfg: Config, sizes: RunSizes | None = None, resources: Resources | None = None, *,
              enforce: bool | None = None) -> Plan:
    """The plan for ``cfg`` on ``resources`` (default: from ``cfg.plan``) at ``sizes`` (default:
    :func:`sizes_from_config`). Raises :class:`PlanError` when it does not fit and ``enforce``
    (default ``cfg.plan.enforce``); otherwise the returned plan lists its shortfalls."""
    sizes = sizes or sizes_from_config(cfg)
    resources = resources or resources_from_config(cfg)
    x = _inputs(cfg, enforce)
    planner = _Planner(x, sizes, resources)
    plan = planner.run()
    if not plan.fits and x.enforce:
        raise PlanError(plan.refusal(), plan)
    return plan


#: Where Φ goes, best first: Ray's default object store, a larger one, the store plus spilling, nowhere.
_PLACEMENTS = ("default", "raise", "spill", "no")


class _Planner:
    """The arithmetic of :func:`make_plan`, stage by stage."""

    def __init__(self, x: _Inputs, sizes: RunSizes, resources: Resources):
        self.x, self.sizes, self.res = x, sizes, resources
        self.shortfalls: list[str] = []
        self.suggestions: list[str] = []
        self.notes: list[str] = []
        self.G = resources.gpus
        self.gpu = resources.gpu_type
        self.n, self.e, self.N = sizes.n_train, sizes.n_eval, sizes.n_total
        self.K_bytes = 8.0 * self.n * self.n
        self.Ke_bytes = 8.0 * self.e * self.n

    # ------------------------------------------------------------------ Φ and the object store
    def _phi_bytes(self, dtype: str) -> float:
        return float(self.N) * self.x.p * STORAGE_BYTES[dtype]

    def _node_share(self, node: NodeSpec) -> float:
        """Fraction of Φ one node of this type holds: shards go where the feature actors run."""
        if self.G:
            return node.gpus / self.G if node.gpus else 0.0
        return node.cpus / max(1, self.res.worker_cpus)

    def _remote_tiles(self, node: NodeSpec, dtype: str, t: int, share: float = 0.5) -> float:
        """Tile copies a node's running tile tasks fetch from other nodes into its object store:
        ``node.gpus / share`` tasks read 2 tiles each, (k−1)/k of them held elsewhere (k GPU nodes)."""
        k = sum(count for _, count in self.res.gpu_nodes)
        if k <= 1 or not node.gpus or not self.x.use_ray:
            return 0.0
        return node.gpus / share * 2 * t * self.x.p * STORAGE_BYTES[dtype] * (k - 1) / k

    def _placement(self, dtype: str) -> dict[str, Any]:
        """Where Φ in ``dtype`` goes on every node type: default store, a larger store, or spill."""
        phi = self._phi_bytes(dtype)
        needed_max, spill_total, store_setting = 0.0, 0.0, None
        worst = None
        t_min = min(MIN_GPU_TILE_ROWS, math.ceil(max(self.n, 1) / self.x.shard_size) * self.x.shard_size)
        for node, count in self.res.workers:
            share = phi * self._node_share(node)
            remote = self._remote_tiles(node, dtype, t_min)
            needed = share * STORE_HEADROOM + remote if self.x.use_ray else share
            if self.x.use_ray:
                default, largest = node.object_store(), node.max_object_store()
            else:  # one process: Φ in its own memory
                default = largest = node.ram_bytes - self._host_reserve(node) - self._driver_bytes(node)
            spill_room = SPILL_DISK_FRACTION * node.disk_bytes if self.x.use_ray else 0.0
            needed_max = max(needed_max, needed)
            if needed <= default:
                node_status = "default"
            elif needed <= largest:
                node_status = "raise"
                store_setting = max(store_setting or 0.0, math.ceil(needed / GB) * GB)
            elif needed <= largest + spill_room:
                node_status = "spill"
                store_setting = max(store_setting or 0.0, largest)
                spill_total += count * (needed - largest)
            else:
                node_status = "no"
            rank = _PLACEMENTS.index(node_status)
            if worst is None or rank > worst[0]:  # the node type that fits worst speaks for the run
                worst = (rank, node, share, needed, default, largest, spill_room, remote)
        return {"dtype": dtype, "phi": phi, "status": _PLACEMENTS[worst[0]], "needed": needed_max,
                "spill": spill_total, "store": store_setting, "worst": worst}

    def _choose_storage(self) -> tuple[dict[str, Any], list[str]]:
        x = self.x
        lines: list[str] = []
        first = x.forced_dtype or x.configured_dtype
        candidates = [first] if x.forced_dtype else list(dict.fromkeys([first, "bfloat16"]))
        placements = [self._placement(d) for d in candidates]
        chosen = None
        if x.forced_dtype:
            chosen = placements[0]
        else:  # prefer the configured dtype in memory, then bfloat16 in memory, then spilling
            in_memory = [pl for pl in placements if pl["status"] in ("default", "raise")]
            spilling = [pl for pl in placements if pl["status"] == "spill"]
            chosen = (in_memory or spilling or placements[-1:])[0]
        for pl in placements[:placements.index(chosen)]:  # the dtypes tried before the chosen one
            if pl is not chosen:
                why = ("; spilling is slower than bfloat16 in memory"
                       if pl["status"] == "spill" and chosen["status"] in ("default", "raise") else "")
                lines.append(f"not {pl['dtype']}: {self._phi_formula(pl['dtype'])}; {self._status_text(pl)}{why}")
        return chosen, lines

    def _phi_formula(self, dtype: str) -> str:
        return (f"N·p·{STORAGE_BYTES[dtype]} B = {_n(self.N)} × {_n(self.x.p)} × {STORAGE_BYTES[dtype]} B = "
                f"{_b(self._phi_bytes(dtype))}")

    def _status_text(self, pl: dict[str, Any]) -> str:
        rank, node, share, needed, default, largest, spill_room, remote = pl["worst"]
        where = f" per {node.name} node" if self.res.nodes > 1 else ""
        fetched = f" + {_b(remote)} of tiles fetched from other nodes" if remote else ""
        need = (f"{_b(needed)}{where} ({_b(share)} + {STORE_HEADROOM - 1:.0%} room{fetched})" if self.x.use_ray
                else f"{_b(needed)}")
        if pl["status"] == "default":
            return (f"{need} ≤ {_b(default)}, the object store as Ray sizes it by default" if self.x.use_ray
                    else f"{need} ≤ {_b(default)} of process memory")
        if pl["status"] == "raise":
            return (f"{need} > {_b(default)}, Ray's default object store, but ≤ {_b(largest)} "
                    f"(0.95 × /dev/shm {_b(node.shm)}): start Ray with object_store_memory = {_b(pl['store'])}")
        if pl["status"] == "spill":
            return (f"{need} > {_b(largest)}, the largest object store /dev/shm allows: "
                    f"{_b(needed - largest)} spills to local disk ({_b(spill_room)} usable)")
        if self.x.use_ray:
            return (f"does not fit: {need} > object store {_b(largest)} + disk for spilling "
                    f"{_b(spill_room)} ({SPILL_DISK_FRACTION:.0%} of {_b(node.disk_bytes)})")
        return f"does not fit: {need} > {_b(default)} of process memory"

    # ------------------------------------------------------------------ host memory
    def _host_reserve(self, node: NodeSpec) -> float:
        """The OS, Ray's own processes and the driver's Python: 5 % of RAM, 4–16 GB (assumption)."""
        return min(max(4 * GB, 0.05 * node.ram_bytes), 16 * GB)

    def _driver_bytes(self, node: NodeSpec) -> float:
        return self.K_bytes + self.Ke_bytes if node is self.res.driver_node else 0.0

    # ------------------------------------------------------------------ stages
    def run(self) -> Plan:
        x, res = self.x, self.res
        storage, alt_lines = self._choose_storage()
        dtype = storage["dtype"]
        b = STORAGE_BYTES[dtype]
        storage_lines = [f"{dtype}: {self._phi_formula(dtype)} (train {_b(self.n * x.p * b)} + eval "
                         f"{_b(self.e * x.p * b)}); a shard of {_n(x.shard_size)} rows is "
                         f"{_b(x.shard_size * x.p * b)}"]
        storage_lines.append(("object store: " if x.use_ray else "in process memory: ") + self._status_text(storage))
        storage_lines += alt_lines
        if dtype != "float32":
            storage_lines.append("the relative error of K from this dtype is measured on a sample block "
                                 "(entk_ray.kernels.kernel_error) and belongs in the results")
        if storage["status"] == "no":
            self._refuse_storage(storage)

        features = self._features_stage()
        kernels, tiles = self._kernels_stage(storage)
        solver_stage, solver = self._solver_stage()
        sweep = self._sweep_store_bytes(solver["method"])
        if x.use_ray:  # after Φ is released, the sweep ships its input through the driver node's store
            driver, what = res.driver_node, self._sweep_label(solver["method"])
            store = max(storage["store"] or 0.0, driver.object_store())
            if sweep > store:
                if sweep <= driver.max_object_store():
                    storage["store"] = math.ceil(sweep / GB) * GB
                    storage_lines.append(f"{what} ({_b(sweep)}) needs object_store_memory = "
                                         f"{_b(storage['store'])} on the driver's node")
                else:
                    self.notes.append(f"{what} ({_b(sweep)}) exceeds the driver node's object store "
                                      f"({_b(driver.max_object_store())}): Ray spills it to disk")
        stages = [features, kernels, solver_stage]
        if x.use_ray:
            stages.append(Stage("Ray overhead", rate("Ray", "sweep_overhead"), "Tune run: trial actor start, trial hand-offs",
                                [f"{PLANNING_RATES[('Ray', 'sweep_overhead')].source}"]))
        memory_lines, host_peak = self._host_memory(storage, tiles, solver)
        mode = "Ray" if x.use_ray else "one process"
        title = (f"Plan: {self.sizes.label or x.benchmark} · {x.model} at {x.resolution} px · p = {_n(x.p)} · {mode}\n"
                 f"  examples: n = {_n(self.n)} train + e = {_n(self.e)} eval ("
                 + ", ".join(f"{k} {_n(v)}" for k, v in self.sizes.evals.items())
                 + f") = N = {_n(self.N)}; C = {self.sizes.num_classes} classes")
        return Plan(
            title=title, sizes=self.sizes, resources=res, p=x.p, model=x.model, resolution=x.resolution,
            use_ray=x.use_ray, storage_dtype=dtype, storage_forced=x.forced_dtype is not None,
            phi_bytes=storage["phi"], object_store_bytes=storage["store"],
            object_store_needed_bytes=max(storage["needed"], sweep),
            spill_bytes=storage["spill"], kernel_dtype=tiles["dtype"], kernel_device=tiles["device"],
            tile_rows=tiles["rows"], shard_size=x.shard_size, block_gpus=tiles["block_gpus"],
            max_blocks_in_flight=tiles["in_flight"], kernel_tasks=tiles["tasks"], solver=solver["name"],
            solver_device=solver["device"], solver_dtype=solver["dtype"], solver_method=solver["method"],
            decode_workers=self.decode_workers, stages=stages, storage_lines=storage_lines,
            memory_lines=memory_lines, host_peak_bytes=host_peak, shortfalls=self.shortfalls,
            suggestions=list(dict.fromkeys(self.suggestions)), notes=self.notes)

    def _refuse_storage(self, storage: dict[str, Any]) -> None:
        x = self.x
        rank, node, share, needed, default, largest, spill_room, remote = storage["worst"]
        why = "forced by plan.storage_dtype" if x.forced_dtype else "no storage dtype fits"
        if x.use_ray:
            per = f", {_b(needed)} per {node.name} node with the object store's room" if self.res.nodes > 1 else (
                f", {_b(needed)} with the object store's {STORE_HEADROOM - 1:.0%} room")
            self.shortfalls.append(
                f"Φ needs {_b(storage['phi'])} in {storage['dtype']} ({why}){per}; an object store of at most "
                f"{_b(largest)} (0.95 × /dev/shm {_b(node.shm)}) and {_b(spill_room)} of disk for spilling "
                f"({SPILL_DISK_FRACTION:.0%} of {_b(node.disk_bytes)}) hold {_b(largest + spill_room)}")
        else:
            self.shortfalls.append(f"Φ needs {_b(storage['phi'])} in {storage['dtype']} ({why}); this process has "
                                   f"{_b(default)} of memory for it")
        for other in ("bfloat16", "float16"):
            if other == storage["dtype"] or STORAGE_BYTES[other] >= STORAGE_BYTES[storage["dtype"]]:
                continue
            alt = self._placement(other)
            if alt["status"] != "no":
                text = {"default": "in the default object store", "raise": f"object store {_b(alt['store'] or 0)}",
                        "spill": f"{_b(alt['spill'])} spilled to disk"}[alt["status"]]
                self.suggestions.append(f"--storage-dtype {other} (plan.storage_dtype={other}): "
                                        f"{_b(alt['phi'])}, {text}")
                break
        # More nodes of the same kind: Φ spreads over their object stores and disks.
        per_node = largest + spill_room
        count = sum(c for n_, c in self.res.workers if n_ is node)
        more = math.ceil(needed * count / max(per_node, 1.0))
        if more > count:
            self.suggestions.append(f"{more} nodes of this kind (plan.nodes={more}), Φ spread over their object stores")
        if x.use_ray:
            ram_needed = needed + self._host_reserve(node) + self._driver_bytes(node) + ACTOR_HOST_BYTES * max(1, node.gpus)
            self.suggestions.append(f"a larger object store: {_b(math.ceil(needed / GB) * GB)} "
                                    f"(ray start --object-store-memory, /dev/shm ≥ {_b(needed / RAY_SHM_FRACTION)}; "
                                    f"RAM ≥ {_b(ram_needed)})")
            self.suggestions.append(f"≥ {_b((needed - largest) / SPILL_DISK_FRACTION)} of local disk for Ray to spill to")

    def _features_stage(self) -> Stage:
        x, res = self.x, self.res
        macs = MODEL_MACS_224.get(x.model, MODEL_MACS_224["resnet50"]) * (x.resolution / 224) ** 2
        scale = MODEL_MACS_224["resnet50"] / macs
        lines = []
        image = x.benchmark in IMAGE_BENCHMARKS
        self.decode_workers = x.num_workers
        if self.G:
            per_gpu = rate(self.gpu, "features")
            cap = per_gpu * rate("H100", "features_cap") / rate("H100", "features")
            per_gpu_model = min(per_gpu * scale, cap)
            src = PLANNING_RATES.get((self.gpu, "features"), PLANNING_RATES[("A10G", "features")])
            lines.append(f"per GPU {_f(per_gpu)} ex/s for ResNet-50 at 224 px ({'measured' if src.measured else 'assumption'}: "
                         f"{src.source})")
            if abs(scale - 1) > 1e-9:
                lines.append(f"{x.model} at {x.resolution} px: × {_f(scale)} (forward MACs {_f(macs / 1e9)} G vs 4.1 G), "
                             f"capped at {_f(cap)} ex/s (per-example overheads) → {_f(per_gpu_model)} ex/s")
            gpu_rate = per_gpu_model * self.G
            if image:
                gpu_node = res.gpu_nodes[0][0]
                per_actor = gpu_node.cpus // gpu_node.gpus - 1  # CPUs beside the actor's own
                want = math.ceil(per_gpu_model * rate("CPU", "decode") / 1000) + 1
                self.decode_workers = max(x.num_workers, min(want, max(1, per_actor)))
                decode = self.G * max(1, self.decode_workers) * 1000 / rate("CPU", "decode")
                lines.append(f"decoding: {max(1, self.decode_workers)} loader worker(s) per actor × {self.G} actors / "
                             f"{_f(rate('CPU', 'decode'))} ms = {_f(decode)} ex/s"
                             + (f" (features.num_workers = {self.decode_workers}: {_f(per_gpu_model)} ex/s × 8 ms "
                                f"needs {want})" if self.decode_workers != x.num_workers else ""))
                total_rate = min(gpu_rate, decode)
            else:
                total_rate = gpu_rate
            seconds = self.N / total_rate
            lines.append(f"time N / rate = {_n(self.N)} / {_f(total_rate)} ex/s = {_t(seconds)}")
            mem = x.batch_size * FEATURE_GPU_BYTES_PER_EXAMPLE / scale
            usable = USABLE_GPU_FRACTION * res.gpu_memory
            lines.append(f"GPU memory per actor ≈ batch {x.batch_size} × {_b(FEATURE_GPU_BYTES_PER_EXAMPLE / scale)} = "
                         f"{_b(mem)} of {_b(usable)} usable (issue 8: 39 GB at batch 128, ResNet-50 224 px)")
            if mem > usable:
                fit_batch = max(1, int(usable / (FEATURE_GPU_BYTES_PER_EXAMPLE / scale)))
                self.shortfalls.append(f"a feature batch of {x.batch_size} needs {_b(mem)} of GPU memory; "
                                       f"{_b(usable)} usable")
                self.suggestions.append(f"--batch-size {fit_batch}")
            headline = f"{self.G} feature actor(s) on {self.G} × {self.gpu}"
        else:
            cores = res.worker_cpus
            per_core = rate("CPU", "features") * scale
            seconds = self.N / (per_core * cores)
            lines.append(f"no GPU: per core {_f(per_core)} ex/s ({PLANNING_RATES[('CPU', 'features')].source}"
                         + (f"; × {_f(scale)} for {x.model} at {x.resolution} px" if abs(scale - 1) > 1e-9 else "")
                         + ")")
            lines.append(f"time N / (rate × cores) = {_n(self.N)} / ({_f(per_core)} × {cores}) = {_t(seconds)}")
            headline = f"feature actors on {cores} CPU cores"
        return Stage("features", seconds, headline, lines)

    # ------------------------------------------------------------------ kernels
    def _task_gpu_bytes(self, ta: int, tb: int, storage: str, compute: str, diagonal: bool = False) -> float:
        """GPU memory of one tile task: tiles + block (+ its float64 copy) + upcast chunks + context."""
        p, sb = self.x.p, STORAGE_BYTES[storage]
        tiles = (ta if diagonal else ta + tb) * p * sb
        acc = ACCUMULATE_BYTES[compute]
        block = ta * tb * acc + (ta * tb * 8 if acc != 8 else 0) + (ta * tb * 4 if compute == "bf16" else 0)
        same = (storage == "float32" and compute in ("float32", "tf32")) or (storage == "bfloat16" and compute == "bf16")
        work = 0 if same else (ta + (0 if diagonal else tb)) * GPU_COLUMN_CHUNK * OPERAND_BYTES[compute]
        return tiles + block + work + GPU_CONTEXT_BYTES

    def _store_room(self, node: NodeSpec, placement: dict[str, Any]) -> float:
        """Object-store room a node has beside its share of Φ."""
        store = max(placement["store"] or 0.0, node.object_store())
        return store - placement["phi"] * self._node_share(node) * STORE_HEADROOM

    def _kernel_dtype(self) -> str:
        if self.x.kernel_dtype != "auto":
            return self.x.kernel_dtype
        if not self.G:
            return "float64"
        r64, r32 = rate(self.gpu, "gram_float64"), rate(self.gpu, "gram_float32")
        return "float64" if r64 >= 0.25 * r32 else "float32"

    def _tile_grid(self, t: int) -> dict[str, Any]:
        """Tiles of t rows over train and each eval split; tasks, FLOPs, bytes copied."""
        def tiles(rows: int) -> list[int]:
            return [min(t, rows - s) for s in range(0, rows, t)]

        train = tiles(self.n)
        pairs = [(a, b, i == j) for i, a in enumerate(train) for j, b in enumerate(train) if j >= i]
        evals = {name: tiles(m) for name, m in self.sizes.evals.items()}
        pairs += [(a, b, False) for rows in evals.values() for a in rows for b in train]
        macs = sum(a * b for a, b, _ in pairs)
        copied = sum((a if diag else a + b) for a, b, diag in pairs)
        return {"train": train, "evals": evals, "pairs": pairs, "tasks": len(pairs),
                "train_tasks": len(train) * (len(train) + 1) // 2, "flops": 2.0 * self.x.p * macs,
                "rows_copied": copied}

    def _kernels_stage(self, placement: dict[str, Any]) -> tuple[Stage, dict[str, Any]]:
        x, res = self.x, self.res
        storage = placement["dtype"]
        compute = self._kernel_dtype()
        s = x.shard_size
        n_rounded = math.ceil(max(self.n, 1) / s) * s
        lines = []
        if self.G:
            device = "cuda"
            shares = [x.block_gpus] if x.block_gpus > 0 else [0.5, 1.0]
            chosen = None
            for share in shares:
                usable = USABLE_GPU_FRACTION * res.gpu_memory * share
                limit = min(x.tile_rows or MAX_TILE_ROWS, n_rounded)
                t = (limit // s) * s if limit >= s else s
                while t > s and self._task_gpu_bytes(t, t, storage, compute) > usable:
                    t -= s
                fits = self._task_gpu_bytes(t, t, storage, compute) <= usable
                # Tiles fetched from other nodes must fit beside each node's share of Φ.
                while t - s >= MIN_GPU_TILE_ROWS and x.tile_rows is None and any(
                        self._remote_tiles(node, storage, t, share) > self._store_room(node, placement)
                        for node, _ in res.gpu_nodes):
                    t -= s
                # Enough tasks for every GPU slot, while tiles stay ≥ 2,048 rows.
                slots = int(round(self.G / share))
                while (fits and t - s >= MIN_GPU_TILE_ROWS and x.tile_rows is None
                       and self._tile_grid(t)["train_tasks"] < slots):
                    t -= s
                candidate = (share, t, fits, usable)
                if fits and (t >= min(MIN_GPU_TILE_ROWS, n_rounded) or x.tile_rows):
                    chosen = candidate
                    break
                if chosen is None or (fits and not chosen[2]) or (fits == chosen[2] and t > chosen[1]):
                    chosen = candidate
            share, t, fits, usable = chosen
            if not fits:
                self.shortfalls.append(f"one kernel tile task of {_n(t)} rows needs "
                                       f"{_b(self._task_gpu_bytes(t, t, storage, compute))} of GPU memory; "
                                       f"{_b(usable)} usable")
                self.suggestions.append(f"a smaller ray.shard_size (tiles are whole shards of {_n(s)} rows)")
            elif t < min(MIN_GPU_TILE_ROWS, n_rounded):
                self.notes.append(f"kernel tiles of {_n(t)} rows (< {MIN_GPU_TILE_ROWS:,}): GPU memory bounds them")
            grid = self._tile_grid(t)
            slots = int(round(self.G / share))
            in_flight = max(x.max_in_flight, slots)
            mem = self._task_gpu_bytes(t, t, storage, compute)
            sb, ob = STORAGE_BYTES[storage], OPERAND_BYTES[compute]
            acc = ACCUMULATE_BYTES[compute]
            lines.append(f"tiles of {_n(t)} rows = {t // s} shards of {_n(s)}: train {len(grid['train'])}, "
                         + ", ".join(f"{k} {len(v)}" for k, v in grid["evals"].items())
                         + f" → {grid['train_tasks']} train + {grid['tasks'] - grid['train_tasks']} eval = "
                         f"{grid['tasks']} tasks named kernel_tile, {1 / share:g} per GPU (ray.block_gpus = {share:g})")
            parts = [f"2 tiles 2 × {_n(t)} × {_n(x.p)} × {sb} B = {_b(2 * t * x.p * sb)}",
                     f"block {_n(t)}² × {acc} B = {_b(t * t * acc)}"]
            if acc != 8:
                parts.append(f"its float64 copy {_b(t * t * 8)}")
            if compute == "bf16":
                parts.append(f"bf16 product {_b(t * t * 4)}")
            if mem - GPU_CONTEXT_BYTES - 2 * t * x.p * sb - t * t * acc > 1:
                parts.append(f"upcast chunks 2 × {_n(t)} × {_n(GPU_COLUMN_CHUNK)} × {ob} B = "
                             f"{_b(2 * t * GPU_COLUMN_CHUNK * ob)}")
            parts.append(f"context {_b(GPU_CONTEXT_BYTES)}")
            lines.append(f"GPU memory per task: {' + '.join(parts)} = {_b(mem)} ≤ {_b(usable)} "
                         f"({USABLE_GPU_FRACTION:g} × {_b(res.gpu_memory)} × {share:g})" if fits else
                         f"GPU memory per task: {' + '.join(parts)} = {_b(mem)} > {_b(usable)}")
            r = rate(self.gpu, f"gram_{compute}") * 1e12
            compute_s = grid["flops"] / (r * self.G)
            bytes_copied = grid["rows_copied"] * x.p * sb
            h2d = rate(self.gpu, "h2d") * 1e9
            copy_s = bytes_copied / (h2d * self.G)
            lines.append(f"products 2p·Σ t_a·t_b = {_e(grid['flops'])} FLOP / ({_f(r / 1e12)} TFLOP/s {compute} × "
                         f"{self.G} GPU) = {_t(compute_s)}")
            overlap = share < 1
            lines.append(f"copies p·b·Σ rows = {_b(bytes_copied)} / ({_f(h2d / 1e9)} GB/s × {self.G} GPU) = "
                         f"{_t(copy_s)}; " + ("overlapped with the products (2 tasks per GPU) → the larger"
                                               if overlap else "not overlapped (1 task per GPU) → their sum"))
            seconds = max(compute_s, copy_s) if overlap else compute_s + copy_s
            nodes = sum(c for _, c in res.gpu_nodes)
            if nodes > 1:
                net = min(n_.network_gbps for n_, _ in res.gpu_nodes) * 1e9
                remote = bytes_copied * (nodes - 1) / nodes
                net_s = remote / (net * nodes)
                lines.append(f"tiles from other nodes: {_b(bytes_copied)} × {nodes - 1}/{nodes} / "
                             f"({_f(net / 1e9)} GB/s × {nodes} nodes) = {_t(net_s)}")
                seconds = max(seconds, net_s)
            headline = f"{compute} on {self.G} × {self.gpu}, tiles of {_n(t)} rows"
            tiles = {"rows": t, "device": device, "dtype": compute, "block_gpus": share, "in_flight": in_flight,
                     "tasks": grid["tasks"], "task_bytes": mem, "pinned": 2 * s * x.p * sb * slots}
        else:
            device = "cpu"
            # At least MIN_CPU_TRAIN_TILES train tiles: a diagonal tile is computed whole, so at
            # small n one tile per shard (the blocks spread over the cores, little is computed twice).
            small = (math.ceil(max(self.n, 1) / MIN_CPU_TRAIN_TILES) // s) * s
            t = x.tile_rows or max(s, min((CPU_TILE_ROWS // s) * s, small))
            grid = self._tile_grid(t)
            cores = res.worker_cpus
            in_flight = max(x.max_in_flight, cores)
            workers = min(cores, in_flight)
            r = rate("CPU", f"gram_{compute}" if compute in ("float64", "float32") else "gram_float32") * 1e9
            seconds = grid["flops"] / (r * workers)
            task_bytes = 2 * t * CPU_COLUMN_CHUNK * OPERAND_BYTES[compute] + t * t * 8
            lines.append(f"tiles of {_n(t)} rows: {grid['tasks']} tasks named kernel_tile on CPUs, "
                         f"{workers} at a time (min(CPUs {cores}, ray.max_blocks_in_flight {in_flight}))")
            lines.append(f"products {_e(grid['flops'])} FLOP / ({_f(r / 1e9)} GFLOP/s per core × {workers}) = "
                         f"{_t(seconds)}")
            lines.append(f"host memory per task: upcast chunks 2 × {_n(t)} × {_n(CPU_COLUMN_CHUNK)} × "
                         f"{OPERAND_BYTES[compute]} B + block {_n(t)}² × 8 B = {_b(task_bytes)}")
            headline = f"{compute} on {workers} CPU cores, tiles of {_n(t)} rows"
            tiles = {"rows": t, "device": device, "dtype": compute, "block_gpus": 0.0, "in_flight": in_flight,
                     "tasks": grid["tasks"], "task_bytes": task_bytes, "pinned": 0.0, "cpu_tasks": workers}
        if placement["spill"] > 0:
            disk = min(n_.disk_gbps for n_, _ in res.workers) * 1e9
            reads = len(self._tile_grid(tiles["rows"])["train"])
            spill_s = placement["spill"] * (1 + reads) / (disk * sum(c for _, c in res.workers))
            lines.append(f"spilled Φ: {_b(placement['spill'])} written once and read by up to {reads} tasks each, "
                         f"at {_f(disk / 1e9)} GB/s per node: {_t(spill_s)} more")
            seconds += spill_s
        lines.append(f"driver: K {_n(self.n)}² × 8 B = {_b(self.K_bytes)} + K_e {_n(self.e)} × {_n(self.n)} × 8 B = "
                     f"{_b(self.Ke_bytes)} (float64)")
        return Stage("kernels", seconds, headline, lines), tiles

    # ------------------------------------------------------------------ solver
    def _solver_options(self) -> list[dict[str, Any]]:
        x, res = self.x, self.res
        n, e, C = self.n, self.e, self.sizes.num_classes
        P, steps, evals = x.points, x.max_steps, math.ceil(x.max_steps / x.eval_every)
        trials = x.rounds * P
        options = []
        eval_flops = trials * evals * 2.0 * e * n * C  # scores of every recorded step
        if self.G:
            gpu = self.gpu
            usable = USABLE_GPU_FRACTION * res.gpu_memory
            r64 = rate(gpu, "gram_float64") * 1e12
            r32 = rate(gpu, "gram_float32") * 1e12
            hbm = rate(gpu, "hbm") * 1e9
            for dtype, bytes_, r, ref in (("float64", 8, r64, ("H100", "float64")),
                                          ("float32", 4, r32, ("H100", "float32"))):
                mem = EIGH_GPU_FACTOR * n * n * bytes_ + 2 * e * n * bytes_
                ref_n = EIGH_REFERENCE_N[ref]
                ref_s = rate("H100", f"eigh_{dtype}")
                h100 = rate("H100", f"gram_{dtype}") * 1e12
                eigh_s = ref_s * (n / ref_n) ** 3 * h100 / r
                rest = (2.0 * e * n * n + eval_flops) / r
                lines = [f"eigh {dtype}: {_f(ref_s)} s at n = {_n(ref_n)} (H100, measured) × ({_n(n)}/{_n(ref_n)})³"
                         + (f" × {_f(h100 / r)} (this GPU's {dtype} rate)" if abs(h100 / r - 1) > 1e-9 else "")
                         + f" = {_t(eigh_s)}",
                         f"K_e·U 2·e·n² = {_e(2.0 * e * n * n)} FLOP + path scores {_e(eval_flops)} FLOP at "
                         f"{_f(r / 1e12)} TFLOP/s = {_t(rest)}",
                         f"GPU memory {EIGH_GPU_FACTOR:g}·n²·{bytes_} B + K_e, K_e·U = {_b(mem)} "
                         f"({'≤' if mem <= usable else '>'} {_b(usable)}; issue 13: 47 GB at n = 44,200 float32)"]
                options.append({"name": f"gpu-spectral-{dtype}", "device": "cuda", "dtype": dtype, "method": "spectral",
                                "seconds": eigh_s + rest, "fits": mem <= usable, "lines": lines,
                                "why": f"{_b(mem)} of GPU memory > {_b(usable)}", "host_extra": 0.0})
            # Batched NAG: the β of a round share each pass over K; the GPUs split the β.
            solver_gpus = min(self.G, P)
            per_gpu = math.ceil(P / solver_gpus)
            mem = self.K_bytes + self.Ke_bytes + 4 * n * C * per_gpu * 8
            step_compute = 2.0 * n * n * C * per_gpu / r64
            step_memory = self.K_bytes / hbm
            step = max(step_compute, step_memory)
            evals_s = x.rounds * evals * 2.0 * e * n * C * per_gpu / r64
            seconds = x.rounds * steps * step + evals_s
            lines = [f"batched NAG: {P} β per round over {solver_gpus} GPU(s) = {per_gpu} per GPU, one pass over K per step",
                     f"step max(2·n²·C·{per_gpu} / {_f(r64 / 1e12)} TFLOP/s = {_t(step_compute)}, "
                     f"K {_b(self.K_bytes)} / {_f(hbm / 1e9)} GB/s = {_t(step_memory)}) × {x.rounds} rounds × "
                     f"{_n(steps)} steps + scores every {x.eval_every} steps {_t(evals_s)} = {_t(seconds)} "
                     f"(at most: a trial may stop early)",
                     f"GPU memory K + K_e + iterates = {_b(mem)} ({'≤' if mem <= usable else '>'} {_b(usable)})"]
            options.append({"name": "gpu-nag-float64", "device": "cuda", "dtype": "float64", "method": "nag",
                            "seconds": seconds, "fits": mem <= usable, "lines": lines,
                            "why": f"K + K_e = {_b(mem)} of GPU memory > {_b(usable)}", "host_extra": 0.0})
        head = res.driver_node
        cores = head.cpus
        base_free = head.ram_bytes - self._host_reserve(head) - self.K_bytes - self.Ke_bytes
        host_free = base_free - self._sweep_store_bytes("spectral")
        r64c = rate("CPU", "gram_float64") * 1e9 * cores
        ref_n = EIGH_REFERENCE_N[("CPU", "float64")]
        eigh_s = rate("CPU", "eigh_float64") * (n / ref_n) ** 3 * EIGH_REFERENCE_CORES / cores
        rest = (2.0 * e * n * n + eval_flops) / r64c
        extra = (EIGH_CPU_FACTOR - 1) * self.K_bytes
        lines = [f"eigh float64: {_f(rate('CPU', 'eigh_float64'))} s at n = {_n(ref_n)} on 16 cores (measured) × "
                 f"({_n(n)}/{_n(ref_n)})³ × 16/{cores} cores = {_t(eigh_s)}",
                 f"K_e·U + path scores {_e(2.0 * e * n * n + eval_flops)} FLOP / ({_f(r64c / 1e9)} GFLOP/s) = {_t(rest)}",
                 f"host memory {EIGH_CPU_FACTOR:g}·n²·8 B = {_b(EIGH_CPU_FACTOR * self.K_bytes)} with K "
                 f"({'≤' if extra <= host_free else '>'} {_b(max(0.0, host_free + self.K_bytes))} free beside K_e and "
                 f"{self._sweep_label('spectral')})"]
        options.append({"name": "cpu-spectral-float64", "device": "cpu", "dtype": "float64", "method": "spectral",
                        "seconds": eigh_s + rest, "fits": extra <= host_free, "lines": lines,
                        "why": (f"{_b(EIGH_CPU_FACTOR * self.K_bytes)} of host memory > "
                                f"{_b(host_free + self.K_bytes)} free" if host_free + self.K_bytes > 0 else
                                "K and K_e alone exceed the driver node's RAM"),
                        "host_extra": extra})
        bw = rate("CPU", "memory_bandwidth") * 1e9
        step = max(self.K_bytes / bw, 2.0 * n * n * C / r64c)
        seconds = trials * steps * step + eval_flops / r64c
        lines = [f"NAG per β: {trials} trials × {_n(steps)} steps × max(K {_b(self.K_bytes)} / "
                 f"{_f(bw / 1e9)} GB/s, 2·n²·C / {_f(r64c / 1e9)} GFLOP/s) = {_t(seconds)} (at most)"]
        options.append({"name": "cpu-nag-float64", "device": "cpu", "dtype": "float64", "method": "nag",
                        "seconds": seconds, "fits": base_free - self._sweep_store_bytes("nag") >= 0, "lines": lines,
                        "why": f"K, K_e and {self._sweep_label('nag')} need "
                               f"{_b(self.K_bytes + self.Ke_bytes + self._sweep_store_bytes('nag'))} of host memory; "
                               f"RAM {_b(head.ram_bytes)}", "host_extra": 0.0})
        return options

    def _solver_stage(self) -> tuple[Stage, dict[str, Any]]:
        x = self.x
        options = self._solver_options()
        by_name = {o["name"]: o for o in options}
        if x.solver != "auto":
            if x.solver not in by_name:
                self.shortfalls.append(f"plan.solver={x.solver} needs a GPU and there is none")
                chosen = min(options, key=lambda o: o["seconds"])
            else:
                chosen = by_name[x.solver]
                if not chosen["fits"]:
                    self.shortfalls.append(f"plan.solver={x.solver}: {chosen['why']}")
        else:
            exact = [o for o in options if o["fits"] and o["dtype"] == "float64"]
            if exact:
                chosen = min(exact, key=lambda o: o["seconds"])
                # The fastest solver's device, with the configured solver.method when it fits there.
                same = [o for o in exact if o["device"] == chosen["device"] and o["method"] == x.method]
                chosen = same[0] if same else chosen
            else:
                chosen = min(options, key=lambda o: o["seconds"])
                self.shortfalls.append("no float64 solver fits: " + "; ".join(f"{o['name']}: {o['why']}" for o in options
                                                                              if o["dtype"] == "float64"))
                fitting32 = [o for o in options if o["fits"]]
                if fitting32:
                    self.suggestions.append(f"plan.solver={fitting32[0]['name']}")
        lines = list(chosen["lines"])
        for o in options:
            if o is chosen:
                continue
            state = f"{_t(o['seconds'])}" if o["fits"] else f"does not fit ({o['why']})"
            lines.append(f"instead {o['name']}: {state}" + (" — float32, chosen only by plan.solver"
                                                            if o["dtype"] == "float32" and o["fits"] else ""))
        where = "GPU" if chosen["device"] == "cuda" else f"{self.res.driver_node.cpus} CPU cores of the driver's node"
        headline = f"{chosen['name']} on the {where}"
        return Stage("solver", chosen["seconds"], headline, lines), chosen

    def _sweep_store_bytes(self, method: str) -> float:
        """What the Tune sweep puts in the driver node's object store once (tune.with_parameters):
        for ``spectral`` the Spectrum (eigenvalues, UᵀY and K_e U: n·(1 + C + e) float64), for
        ``nag`` the whole problem (K and K_e)."""
        if not self.x.use_ray:
            return 0.0
        if method == "spectral":
            return 8.0 * self.n * (1 + self.sizes.num_classes + self.e) * STORE_HEADROOM
        return (self.K_bytes + self.Ke_bytes) * STORE_HEADROOM

    @staticmethod
    def _sweep_label(method: str) -> str:
        return "the Spectrum for Tune" if method == "spectral" else "K and K_e for Tune"

    # ------------------------------------------------------------------ host memory
    def _host_memory(self, storage: dict[str, Any], tiles: dict[str, Any], solver: dict[str, Any]) -> tuple[list[str], float]:
        lines, peak = [], 0.0
        phi = storage["phi"]
        for node, count in self.res.workers + ((self.res.head, 1),) if self.res.head else self.res.workers:
            share = phi * self._node_share(node)
            in_store = share if storage["status"] in ("default", "raise") else min(share, node.max_object_store())
            parts = [(("Φ in the object store" if self.x.use_ray else "Φ"), in_store)]
            if node is self.res.driver_node:
                parts.append(("K + K_e", self.K_bytes + self.Ke_bytes))
            if node.gpus:
                parts.append((f"{node.gpus} feature actors", ACTOR_HOST_BYTES * node.gpus))
                if tiles["pinned"]:
                    parts.append(("pinned staging", tiles["pinned"] * node.gpus / max(1, self.G)))
            elif not self.G and node in (n_ for n_, _ in self.res.workers):
                parts.append((f"{tiles.get('cpu_tasks', 1)} kernel tasks", tiles["task_bytes"] * tiles.get("cpu_tasks", 1)))
            parts.append(("OS and Ray", self._host_reserve(node)))
            total = sum(v for _, v in parts)
            peak = max(peak, total)
            label = f"{node.name}" + (" (driver)" if node is self.res.driver_node else "")
            lines.append(f"{label}, kernels stage: " + " + ".join(f"{k} {_b(v)}" for k, v in parts if v)
                         + f" = {_b(total)} {'≤' if total <= node.ram_bytes else '>'} RAM {_b(node.ram_bytes)}")
            if total > node.ram_bytes and storage["status"] != "no":
                self.shortfalls.append(f"host memory on {label}: {_b(total)} > RAM {_b(node.ram_bytes)}")
            if node is self.res.driver_node:
                parts = [("K + K_e", self.K_bytes + self.Ke_bytes)]
                if self.x.use_ray:
                    parts.append((self._sweep_label(solver["method"]), self._sweep_store_bytes(solver["method"])))
                if solver["device"] == "cpu":
                    parts.append((f"{solver['name']} workspace", solver["host_extra"]))
                parts.append(("OS and Ray", self._host_reserve(node)))
                total = sum(v for _, v in parts)
                peak = max(peak, total)
                lines.append(f"{label}, solver stage (Φ released): " + " + ".join(f"{k} {_b(v)}" for k, v in parts if v)
                             + f" = {_b(total)} {'≤' if total <= node.ram_bytes else '>'} RAM {_b(node.ram_bytes)}")
                if total > node.ram_bytes and solver["fits"]:
                    self.shortfalls.append(f"host memory on {label} while solving: {_b(total)} > RAM {_b(node.ram_bytes)}")
        return lines, peak


# ------------------------------------------------------------------------------------------------
# The trained baselines' learning-rate sweep (entk_ray.finetune, on Ray Train + Tune)
# ------------------------------------------------------------------------------------------------
#: ResNet-50: parameters (weights; gradients and SGD momentum are as many again each) and BatchNorm buffers.
RESNET50_PARAMETERS = 25.56e6
RESNET50_BUFFERS = 0.05e6
#: Activations kept for the backward pass per training image at 224 px in fp32 (an estimate: ResNet-50
#: at batch 256 takes ≈ 26 GB); bf16 autocast keeps most of them in 2 bytes.
TRAIN_ACTIVATION_BYTES = {"fp32": 100e6, "bf16": 55e6}
TRAIN_WORKSPACE_BYTES = 1.5 * GB  # CUDA context + cuDNN workspace
#: An evaluation image (forward only, no activations kept) costs this fraction of a training image.
EVAL_COST_FRACTION = 1 / 3
LOADER_PROCESS_BYTES = 0.4 * GB  # one DataLoader process decoding JPEGs
TRAIN_WORKER_HOST_BYTES = 2 * GB  # one Ray Train worker: torch, the model, pinned batches


@dataclass(frozen=True)
class FinetuneSweepPlan:
    """Time and memory of the baselines' sweep (every method × learning rate) on some resources.

    Per trial (one ``TorchTrainer`` of ``workers`` GPUs): ``epochs`` passes over
    ``steps = ⌊n / batch⌋`` global batches (``images = steps · batch`` per epoch) at
    ``rate = min(GPU rate × workers, decode rate)``, plus ``epochs + 1`` evaluations of the
    ``e`` evaluation images at ``rate / EVAL_COST_FRACTION``, plus the trainer's start-up. Trials run
    ``at_once`` side by side (GPUs and CPUs permitting); each method is one Tune run, so the sweep
    takes ``methods · ⌈lrs / at_once⌉`` waves of one trial's time."""

    resources: Resources
    gpu_type: str
    precision: str  # "fp32" or "bf16"
    methods: int
    lrs: int
    epochs: int
    batch_size: int
    workers: int  # GPUs per trial
    cpus_per_worker: float
    images_per_epoch: int
    eval_images: int
    gpu_rate: float  # images/s of the trial's GPUs
    decode_rate: float  # images/s its CPUs decode (JPEG + crop)
    at_once: int
    trial_seconds: float
    gpu_bytes: float  # per GPU
    host_bytes: float  # per trial
    checkpoint_bytes: float

    @property
    def trials(self) -> int:
        return self.methods * self.lrs

    @property
    def sweep_seconds(self) -> float:
        return self.waves * self.trial_seconds

    @property
    def rate(self) -> float:
        return min(self.gpu_rate, self.decode_rate)

    @property
    def epoch_seconds(self) -> float:
        return self.images_per_epoch / self.rate

    @property
    def waves(self) -> int:
        return self.methods * math.ceil(self.lrs / self.at_once)

    @property
    def gpu_hours(self) -> float:
        return self.trials * self.workers * self.trial_seconds / 3600

    @property
    def store_written_bytes(self) -> float:
        return self.trials * self.epochs * self.checkpoint_bytes

    @property
    def store_kept_bytes(self) -> float:
        return self.trials * self.checkpoint_bytes  # Ray Train keeps one checkpoint per trial


def plan_finetune_sweep(cfg: Config, sizes: RunSizes | None = None, resources: Resources | None = None
                        ) -> FinetuneSweepPlan:
    """The :class:`FinetuneSweepPlan` of ``cfg.finetune`` (all three baselines when none is listed)
    for ResNet-50 at 224 px on ``resources`` (default: ``plan.*``), from :data:`PLANNING_RATES`."""
    ft = cfg.finetune
    sizes = sizes or sizes_from_config(cfg)
    resources = resources or resources_from_config(cfg)
    gpu_type = resources.gpu_type
    if gpu_type is None:
        raise PlanError("the fine-tuning sweep is planned for GPU workers; these resources have no GPU")
    if ft.precision not in ("auto", "fp32", "bf16"):
        raise PlanError(f"finetune.precision={ft.precision!r} is not fp32, bf16 or auto")
    precision = "fp32" if ft.precision == "fp32" else "bf16"  # auto: bf16 on CUDA
    if precision == "bf16" and not ft.channels_last:
        raise PlanError("the bf16 rate was measured with channels_last; plan with finetune.channels_last=true")
    node = resources.gpu_nodes[0][0]
    cpus_per_gpu = node.cpus / node.gpus
    if ft.cpus_per_worker > cpus_per_gpu:
        raise PlanError(f"finetune.cpus_per_worker={ft.cpus_per_worker:g} exceeds the {cpus_per_gpu:g} CPUs per GPU "
                        f"of {node.name}: the GPUs could not all train at once")
    workers = ft.num_workers
    if workers > resources.gpus:
        raise PlanError(f"finetune.num_workers={workers} exceeds the {resources.gpus} GPUs")
    steps = sizes.n_train // ft.batch_size
    images = steps * ft.batch_size
    gpu_rate = rate(gpu_type, f"train_{precision}") * workers
    decode_cores = max(1, int(ft.cpus_per_worker) - 1) if ft.cpus_per_worker >= 2 else 1  # loader processes
    decode_rate = workers * decode_cores * 1000 / rate("CPU", "decode")
    trial_rate = min(gpu_rate, decode_rate)
    trial_seconds = (ft.epochs * images + (ft.epochs + 1) * sizes.n_eval * EVAL_COST_FRACTION) / trial_rate \
        + rate("Ray", "trainer_start")
    at_once = max(1, min(resources.gpus // workers,
                         int(sum(n.cpus * c for n, c in resources.gpu_nodes) // (ft.cpus_per_worker * workers))))
    methods = len(ft.baselines) or 3
    lrs = len(ft.lr_grid)
    model_bytes = (RESNET50_PARAMETERS + RESNET50_BUFFERS) * 4
    gpu_bytes = (3 * RESNET50_PARAMETERS * 4 + ft.batch_size / workers * TRAIN_ACTIVATION_BYTES[precision]
                 + TRAIN_WORKSPACE_BYTES)
    host_bytes = workers * (TRAIN_WORKER_HOST_BYTES + decode_cores * LOADER_PROCESS_BYTES)
    return FinetuneSweepPlan(resources, gpu_type, precision, methods, lrs, ft.epochs, ft.batch_size, workers,
                             float(ft.cpus_per_worker), images, sizes.n_eval, gpu_rate, decode_rate, at_once,
                             trial_seconds, gpu_bytes, host_bytes, model_bytes + RESNET50_PARAMETERS * 4)


def finetune_markdown() -> str:
    """The fine-tuning sweep's table for docs/scaling.md: Kumar et al.'s recipe on full Living-17."""
    # (preset, nodes, precision, GPUs per trial)
    cases = [("h100", 1, "bf16", 1), ("h100", 1, "fp32", 1), ("g5.12xlarge", 1, "bf16", 1),
             ("g5.12xlarge", 2, "bf16", 1), ("p4d.24xlarge", 1, "bf16", 1), ("p4d.24xlarge", 1, "fp32", 1),
             ("p4d.24xlarge", 2, "bf16", 2)]
    out = ["| hardware | precision | GPUs per trial | `finetune.cpus_per_worker` | images/s per trial (GPU, decode) | "
           "one epoch | one trial | trials at once | sweep | GPU-hours | GPU memory per GPU | host memory per trial |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for hw, nodes, precision, workers in cases:
        node = PRESETS[hw]
        cfg = living17_config(hardware=hw, nodes=nodes)
        cfg.finetune.baselines = ["ft", "lpft", "scratch"]
        cfg.finetune.precision = precision
        cfg.finetune.num_workers = workers
        cfg.finetune.cpus_per_worker = node.cpus // node.gpus
        f = plan_finetune_sweep(cfg)
        bound = "decode" if f.decode_rate < f.gpu_rate else "GPU"
        out.append(f"| {f.resources.name} | {precision}{' + channels_last' if precision == 'bf16' else ''} | "
                   f"{workers}{' (DDP)' if workers > 1 else ''} | "
                   f"{f.cpus_per_worker:g} | **{_n(f.rate)}** ({_n(f.gpu_rate)}, {_n(f.decode_rate)}; {bound}-bound) | "
                   f"{_t(f.epoch_seconds)} | {_t(f.trial_seconds)} | {f.at_once} | **{_t(f.sweep_seconds)}** "
                   f"({f.waves} waves) | {f.gpu_hours:.1f} | {_b(f.gpu_bytes)} | {_b(f.host_bytes)} |")
    f = plan_finetune_sweep(living17_config(hardware="h100"))
    out.append("")
    out.append(f"{f.trials} trials ({f.methods} methods × {f.lrs} learning rates) × {f.epochs} epochs of "
               f"{_n(f.images_per_epoch)} images (⌊44,200 / {f.batch_size}⌋ batches of {f.batch_size}), "
               f"{f.epochs + 1} evaluations of {_n(f.eval_images)} images each (⅓ of a training image's cost), "
               f"plus {_f(rate('Ray', 'trainer_start'))} s of trainer start-up per trial. Store: a checkpoint "
               f"(weights + BatchNorm buffers + SGD momentum) is {_b(f.checkpoint_bytes)}, written every epoch "
               f"({_b(f.store_written_bytes)} per sweep) and kept once per trial ({_b(f.store_kept_bytes)}).")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Tables for docs/scaling.md
# ------------------------------------------------------------------------------------------------
def living17_config(**plan_fields: Any) -> Config:
    """The full Living-17 run: ResNet-50, 224 px, p = 500,000, on Ray, with ``plan.*`` overrides."""
    cfg = Config()
    cfg.model.name = "resnet50"
    cfg.data.benchmark = "living17"
    cfg.data.n_train = cfg.data.n_id_val = cfg.data.n_ood = None
    cfg.features.p = 500_000
    cfg.use_ray = True
    for key, value in plan_fields.items():
        setattr(cfg.plan, key, value)
    return cfg


#: The refused example: float32 Φ forced on one 24 GB GPU with 64 GB of RAM and 64 GB of disk.
REFUSED_EXAMPLE = dict(hardware="custom", gpus=1, gpu_type="A10G", gpu_memory_gb=24, cpus=16, ram_gb=64, disk_gb=64,
                       storage_dtype="float32")


def markdown_tables() -> str:
    """The tables of docs/scaling.md, from this module's arithmetic."""
    out = []
    out.append("### Planning rates\n")
    out.append("| device | quantity | value | measured | source |\n|---|---|---|---|---|")
    for (device, quantity), r in PLANNING_RATES.items():
        out.append(f"| {device} | {quantity} | {_f(r.value)} {r.unit} | {'yes' if r.measured else 'no'} | {r.source} |")
    out.append("\n### Hardware presets\n")
    out.append("| preset | GPUs | CPUs | RAM | /dev/shm | Ray's default object store | largest object store | disk |\n"
               "|---|---|---|---|---|---|---|---|")
    for name, node in PRESETS.items():
        gpus = f"{node.gpus} × {node.gpu_type} {_b(node.gpu_memory_bytes)}" if node.gpus else "—"
        out.append(f"| {name} | {gpus} | {node.cpus} | {_b(node.ram_bytes)} | {_b(node.shm)} | "
                   f"{_b(node.default_object_store())} | {_b(node.max_object_store())} | {_b(node.disk_bytes)} |")
    out.append("\n### Full Living-17 (n = 44,200 + 3,400, p = 500,000, ResNet-50 224 px, Ray) by hardware\n")
    out.append("| hardware | Φ | object store | kernel tiles | features | kernels | solver | Ray | total |\n"
               "|---|---|---|---|---|---|---|---|---|")
    cases = [("h100", {}), ("g5.12xlarge", {}), ("p4d.24xlarge", {}), ("r6i.8xlarge", {}),
             ("g5.12xlarge", {"nodes": 2, "head": "r6i.8xlarge"}), ("p4d.24xlarge", {"nodes": 2, "head": "r6i.8xlarge"})]
    for hw, extra in cases:
        plan = make_plan(living17_config(hardware=hw, **extra), enforce=False)
        store = (_b(plan.object_store_bytes) + (f" + {_b(plan.spill_bytes)} spilled" if plan.spill_bytes else "")
                 if plan.object_store_bytes else "default")
        tiles = f"{_n(plan.tile_rows)} rows, {plan.kernel_dtype}, {plan.block_gpus:g} GPU" if plan.kernel_device == "cuda" \
            else f"{_n(plan.tile_rows)} rows, {plan.kernel_dtype}, CPU"
        s = {st.name: st.seconds for st in plan.stages}
        out.append(f"| {plan.resources.name} | {plan.storage_dtype} {_b(plan.phi_bytes)} | {store} | {tiles} | "
                   f"{_t(s['features'])} | {_t(s['kernels'])} | {plan.solver} {_t(s['solver'])} | "
                   f"{_t(s.get('Ray overhead', 0))} | {_t(plan.total_seconds)}" + ("" if plan.fits else " (does not fit)")
                   + " |")
    out.append("\n### Kernel tiles for full Living-17 (train K and both K_e)\n")
    out.append("| tile rows | tasks | Φ copied to GPUs, float32 | Φ copied, bfloat16 | GPU memory per task (float32 Φ, float64 products) |\n"
               "|---|---|---|---|---|")
    planner = _Planner(_inputs(living17_config(), False), LIVING17_FULL, preset("h100"))
    for t in (256, 1024, 2048, 4096, 8192):
        grid = planner._tile_grid(t)
        out.append(f"| {_n(t)} | {_n(grid['tasks'])} | {_b(grid['rows_copied'] * 500_000 * 4)} | "
                   f"{_b(grid['rows_copied'] * 500_000 * 2)} | {_b(planner._task_gpu_bytes(t, t, 'float32', 'float64'))} |")
    out.append("\n### Features, full Living-17, by GPU count (examples/s per GPU from the planning rates)\n")
    out.append("| GPUs | A10G | A100-40G | H100 |\n|---|---|---|---|")
    for g in (1, 4, 8):
        row = [f"{_t(LIVING17_FULL.n_total / (g * rate(gpu, 'features')))}" for gpu in ("A10G", "A100-40G", "H100")]
        out.append(f"| {g} | " + " | ".join(row) + " |")
    out.append("\n### Refused: float32 Φ forced on one 24 GB GPU with 64 GB of RAM and 64 GB of disk\n")
    try:
        make_plan(living17_config(**REFUSED_EXAMPLE))
        out.append("(fits)")
    except PlanError as exc:
        out.append("```\n" + str(exc) + "\n```")
    out.append("\n### At 10× the data (n = 442,000, e = 34,000) on 2 × p4d.24xlarge\n")
    big = make_plan(living17_config(hardware="p4d.24xlarge", nodes=2), LIVING17_FULL.scaled(10), enforce=False)
    out.append("```\n" + (big.refusal() if not big.fits else "fits") + "\n```")
    return "\n".join(out)


#: Regions of docs/scaling.md that are this module's output: marker name → text generator.
DOC_REGIONS = {
    "plan-tables": lambda: markdown_tables(),
    "plan-h100": lambda: "```\n" + make_plan(living17_config(hardware="h100")).format() + "\n```",
    "plan-finetune": lambda: finetune_markdown(),
}


def update_doc(text: str) -> str:
    """``text`` with every ``<!-- NAME: begin -->`` … ``<!-- NAME: end -->`` region of
    :data:`DOC_REGIONS` replaced by the current output (``scripts/plan_tables.py --write``)."""
    for name, generate in DOC_REGIONS.items():
        begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
        if begin not in text or end not in text:
            raise ValueError(f"the document has no {begin} … {end} region")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{generate()}\n{end}{tail}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m entk_ray.plan",
                                     description="Print the plan of full Living-17 (ResNet-50, 224 px, p = 500k) "
                                                 "on a hardware preset, or the tables of docs/scaling.md.")
    parser.add_argument("--hardware", default="h100", help=f"one of {', '.join(PLAN_HARDWARE)}")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--head", default=None)
    parser.add_argument("--storage-dtype", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--markdown", action="store_true", help="print the tables of docs/scaling.md")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_tables())
        return 0
    cfg = living17_config(hardware=args.hardware, nodes=args.nodes, head=args.head,
                          storage_dtype=args.storage_dtype).with_overrides(args.set)
    # Every section but the data one (the plan needs no ImageNet on disk).
    Config.from_dict({**cfg.to_dict(), "data": {}}).validate(check_paths=False)
    try:
        print(make_plan(cfg).format())
    except PlanError as exc:
        print(exc.plan.format() if exc.plan is not None else "")
        print(f"\nPlanError: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = [
    "LIVING17_FULL", "PLANNING_RATES", "PRESETS", "NodeSpec", "Plan", "PlanError", "Rate", "Resources", "RunSizes",
    "FinetuneSweepPlan", "Stage", "custom_resources", "detect_resources", "local_resources", "make_plan", "markdown_tables", "plan_finetune_sweep",
    "preset",
    "resources_from_config", "resources_from_ray_nodes", "sizes_from_config",
]
