"""One validated configuration for a run: dataclasses, YAML loading and ``key=value`` overrides.

Everything a run depends on lives here, and :meth:`Config.validate` is the one place that checks
it. Validation runs before any data is read or any model is built, and every error names the
field and the offending value, e.g. ``features.p must be a positive integer, got 0``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from entk_ray.errors import UserInputError
from entk_ray.redaction import redact, redact_override

FEATURE_METHODS = ("auto", "sampled", "hooks", "func")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
BENCHMARKS = ("digits", "living17", "entity13", "entity30", "nonliving26", "image_folder")
SOLVER_METHODS = ("spectral", "nag")
SOLVER_DEVICES = ("cpu", "cuda", "auto")
SOLVER_DTYPES = ("float64", "float32")
TARGETS = ("onehot", "centered")
SELECTIONS = ("id", "holdout")
CORRUPT_POLICIES = ("fail", "skip")
FINETUNE_BASELINES = ("ft", "lpft", "scratch")
FINETUNE_PRECISIONS = ("auto", "fp32", "bf16")
FINETUNE_AUGMENTS = ("auto", "none")
FINETUNE_BATCHNORM = ("auto", "train", "frozen")
IMAGE_BENCHMARKS = ("living17", "entity13", "entity30", "nonliving26", "image_folder")  # decoded from image files
# plan.hardware: detected, a preset of entk_ray.plan.PRESETS, or the plan.* numbers
PLAN_HARDWARE = ("auto", "custom", "h100", "g5.12xlarge", "p4d.24xlarge", "r6i.8xlarge")
PLAN_KERNEL_DTYPES = ("auto", "float64", "float32", "tf32", "bf16")
PLAN_SOLVERS = ("auto", "gpu-spectral-float64", "gpu-spectral-float32", "gpu-nag-float64", "cpu-spectral-float64",
                "cpu-nag-float64")


class ConfigError(UserInputError, ValueError):
    """A configuration value is invalid; the message names the field and the value."""


@dataclass
class ModelConfig:
    """Backbone g_θ and the scalar head f(x) = wᵀ g_θ(x)."""

    name: str = "efficientnet_lite0"
    # Path (local or s3://) to a checkpoint. None: the bundled Lite0 weights, or for torchvision
    # models the file in the local torch hub cache (never downloaded).
    weights: str | None = None
    checkpoint_format: str = "auto"
    head_seed: int = 0


@dataclass
class FeatureConfig:
    """Per-example gradient features φ(x) = ∂f(x)/∂θ_S over a seeded parameter subset S."""

    p: int = 500_000
    param_seed: int = 0
    include_head: bool = False
    # How gradients become Φ (entk_ray.feature_maps): uniform (S drawn uniformly; the default),
    # head, stratified, norm, last_blocks:K, jl (Rademacher projection) or jl:gaussian.
    map: str = "uniform"
    method: str = "auto"  # auto/sampled: only S's coordinates; hooks: per-layer gradients; func: vmap(grad)
    batch_size: int = 32
    chunk_size: int = 8  # examples per vmap call: bounds memory at chunk × #params floats
    storage_dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    num_workers: int = 0  # DataLoader workers for decoding images
    # CUDA only: TF32 (10-bit mantissa products, float32 sums) for the feature computation's
    # matmuls and convolutions. Off by default; measure its effect on K before turning it on.
    tf32: bool = False


@dataclass
class DataConfig:
    benchmark: str = "digits"
    seed: int = 0
    image_size: int = 64
    # Sizes; None means the whole split.
    n_train: int | None = 1000
    n_id_val: int | None = 500
    n_ood: int | None = 500
    # ImageNet-based BREEDS benchmarks (living17, ...): a local path or s3://bucket/prefix.
    imagenet_root: str | None = None
    crop_size: int = 224  # image-file benchmarks: Resize(crop·256/224), CenterCrop(crop)
    corrupt_policy: str = "fail"  # unreadable images: fail (list them) or skip (drop, warn with the count)
    corrupt_check: str = "header"  # header (PIL verify), decode (full decode) or none
    index_cache: str | None = None  # folder (local or s3://) for the Parquet file index
    refresh_index: bool = False  # relist the files instead of using the cached index
    # Flat ImageNet val/ only: ground truth (LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt)
    # and, for the latter, the devkit's ILSVRC2012_ID → wnid mapping (meta.mat, or one wnid per line).
    imagenet_val_ground_truth: str | None = None
    imagenet_class_mapping: str | None = None
    # image_folder benchmark: folders with one subfolder per class (local or s3://).
    id_train_dir: str | None = None
    id_val_dir: str | None = None
    ood_dirs: list[str] = field(default_factory=list)


@dataclass
class SolverConfig:
    """Kernel ridge regression on the dual, solved by NAG, with a telescopic β search.

    β = r · tr(K)/n. Round 0 sweeps ``r_grid``; each later round zooms around the best r with a
    log-space grid half as wide, ``rounds`` rounds in all. When the best r is the smallest or
    largest value tried, the search extends past it at the grid's spacing, at most
    ``max_extensions`` grid steps beyond ``r_grid`` on each side (one extra round each time).
    """

    method: str = "spectral"  # spectral: exact NAG path from one eigh; nag: iterative NAG
    r_grid: list[float] = field(default_factory=lambda: [10.0**k for k in range(-6, 3)])
    rounds: int = 3
    points_per_round: int = 9
    max_extensions: int = 3
    max_steps: int = 1000
    eval_every: int = 10
    tol: float = 1e-6
    momentum: str = "strongly_convex"  # or "schedule": μ_t = (t-1)/(t+2)
    targets: str = "onehot"
    selection: str = "id"  # id: select on the ID set (as the write-up); holdout: on a train slice
    holdout_fraction: float = 0.1
    seed: int = 0
    # Where the paths run: cpu (numpy), cuda (torch on a GPU: a round's β batched) or auto (a GPU
    # when the process sees one). The run's plan sets both from its solver choice.
    device: str = "cpu"
    dtype: str = "float64"  # the eigh's dtype: float32 only for method=spectral


@dataclass
class ProbeConfig:
    """Linear probe: standardized penultimate features, multinomial L2 logistic regression."""

    c_grid: list[float] = field(default_factory=lambda: [10.0**k for k in range(-7, 3)])
    max_iter: int = 1000


@dataclass
class ReportConfig:
    """The results table: 95 % percentile-bootstrap intervals over the evaluation examples."""

    bootstrap_resamples: int = 1000  # 0: no intervals
    bootstrap_seed: int = 0


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" or ray://...: join a cluster
    num_workers: int | None = None  # feature actors; None: one per GPU, else one per CPU slot
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    shard_size: int = 256
    block_gpus: float = 0.0  # fractional GPU per kernel-block task (0: CPU)
    max_blocks_in_flight: int = 8
    tune_max_concurrent: int | None = None


@dataclass
class FinetuneConfig:
    """Trained baselines beside the eNTK (``entk_ray.finetune``), Kumar et al.'s Living-17 recipe.

    ``ft``: fine-tune every parameter from the pretrained backbone with a fresh linear head;
    ``lpft``: the same from the run's linear probe as the head; ``scratch``: the same network from
    random initialization. Each trains with SGD (momentum, no weight decay), cross-entropy and a
    per-step cosine schedule for ``epochs`` epochs at every learning rate of ``lr_grid`` (one Ray
    Tune trial each); the learning rate and the epoch are chosen on the eNTK's selection set.
    """

    baselines: list[str] = field(default_factory=list)  # any of ft, lpft, scratch ("ft,lpft" works too)
    epochs: int = 20
    batch_size: int = 64  # global: split evenly across a trial's Ray Train workers
    lr_grid: list[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0  # head and scratch initialization, data order, augmentation
    augment: str = "auto"  # auto: RandomResizedCrop (+ flip for photos), see entk_ray.data.augment; none
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16
    channels_last: bool = True  # CUDA only
    sync_batchnorm: bool = True  # SyncBatchNorm across the GPU workers of a trial (CPU workers keep their own)
    # BatchNorm while training ft/lpft: train (batch statistics, Kumar et al.) or frozen (the pretrained
    # running statistics; for small batches or inputs far from the pretraining data). scratch: always train.
    # auto: frozen on the digits shift (batch statistics there stall training: docs/finetuning.md), else train.
    batchnorm: str = "auto"
    eval_batch_size: int = 256
    num_workers: int = 1  # Ray Train workers (DDP) per trial; trials run side by side on the rest
    use_gpu: bool | None = None  # None: when the Ray cluster has GPUs
    cpus_per_worker: float = 1.0  # on GPUs give each worker CPUs to decode images, e.g. 8–12
    loader_workers: int | None = None  # DataLoader processes per training worker; None: cpus_per_worker − 1
    max_concurrent: int | None = None  # trials at once; None: as many as the cluster holds
    max_failures: int = 0  # worker-group restarts per trial, each from the last checkpoint

    def __post_init__(self):
        if isinstance(self.baselines, str):  # --baselines ft,lpft,scratch
            names = [name.strip() for name in self.baselines.split(",")]
            self.baselines = [name for name in names if name and name != "none"]


@dataclass
class StoreConfig:
    out_dir: str = "results/demo"
    artifact_store: str | None = None  # local folder or s3://...; None: <out_dir>/artifacts


@dataclass
class PlanConfig:
    """The plan made before any work (:mod:`entk_ray.plan`): the hardware it is made for, whether
    a run that does not fit is refused, and the choices a user may force instead of the plan."""

    hardware: str = "auto"  # auto: this machine or the connected Ray cluster; a preset; custom
    nodes: int = 1  # worker nodes of the preset (or of the custom spec)
    head: str | None = None  # a preset for a separate driver node (e.g. r6i.8xlarge); None: a worker node
    enforce: bool = True  # refuse a run that does not fit (false: print the shortfalls and go on)
    storage_dtype: str = "auto"  # auto: features.storage_dtype when Φ fits in memory, else bfloat16; a dtype: forced
    kernel_dtype: str = "auto"  # auto: float64 unless the GPU's float64 rate is < ¼ of its float32 rate
    solver: str = "auto"  # auto: the fastest float64 solver that fits
    tile_rows: int | None = None  # kernel tile rows; None: the plan's choice
    # hardware: custom, per node (GB = 10⁹ bytes)
    gpus: int = 0
    gpu_type: str = "H100"  # whose planning rates apply: H100, A100-40G, A10G (others: A10G's)
    gpu_memory_gb: float | None = None  # None: the GPU type's
    cpus: int = 16
    ram_gb: float = 64.0
    disk_gb: float = 100.0
    object_store_gb: float | None = None  # None: Ray's default
    shm_gb: float | None = None  # None: half the RAM


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    use_ray: bool = False
    # fsspec options for every s3:// (or other remote) path of the run: data, weights, index
    # cache and artifact store, e.g. {"client_kwargs": {"endpoint_url": ...}, "key": ..., "secret": ...}.
    storage_options: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _from_dict(cls, data or {}, prefix="")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_one_line(exc)}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: list[str] | None) -> "Config":
        """Apply ``section.field=value`` strings; values are parsed as YAML (``1e-3``, ``[1,2]``)."""
        data = self.to_dict()
        for item in overrides or []:
            shown = redact_override(item)  # what an error may show of it (no credentials)
            if "=" not in item:
                raise ConfigError(f"override {shown!r} must look like section.field=value")
            key, raw = item.split("=", 1)
            parts = key.strip().split(".")
            # below a mapping field (storage_options) any key may be set, nested ones included
            free = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) in _mapping_fields(Config)), None)
            node = data
            for depth, part in enumerate(parts[:-1]):
                if free is not None and depth >= free and isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"override {shown!r}: unknown config field {key!r}")
                node = node[part]
            if not isinstance(node, dict) or (parts[-1] not in node and free is None):
                raise ConfigError(f"override {shown!r}: unknown config field {key!r}")
            try:
                node[parts[-1]] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                detail = f"{raw!r} is not a valid YAML value ({_one_line(exc)})" if shown == item else \
                    "the value is not valid YAML"
                raise ConfigError(f"override {shown!r}: {detail}; "
                                  f"quote strings and close brackets, e.g. solver.r_grid=[0.001, 0.1]") from exc
        return Config.from_dict(data)

    # ------------------------------------------------------------------ validation
    def validate(self, check_paths: bool = True) -> "Config":
        """Check every field; raise :class:`ConfigError` naming the first bad one. Returns self.

        ``check_paths=False`` neither requires nor checks the data's and weights' locations (a plan
        made without the data, ``--plan``)."""
        from entk_ray.models import BACKBONES

        _check_types(self, "")  # every field against its annotation: types, finite numbers, lists
        m, f, d, s, pr, r = self.model, self.features, self.data, self.solver, self.probe, self.ray
        options = self.storage_options
        _choice("model.name", m.name, tuple(BACKBONES))
        _choice("model.checkpoint_format", m.checkpoint_format, BACKBONES[m.name].checkpoint_formats)
        _int("model.head_seed", m.head_seed)
        if check_paths and m.weights is not None:
            _existing_path("model.weights", m.weights, options)
        if check_paths and m.weights is None:
            _default_weights_available(m.name)

        _int("features.p", f.p, minimum=1, what="a positive integer")
        _int("features.param_seed", f.param_seed)
        _choice("features.method", f.method, FEATURE_METHODS)
        _feature_map("features.map", f.map)
        _int("features.batch_size", f.batch_size, minimum=1, what="a positive integer")
        _int("features.chunk_size", f.chunk_size, minimum=1, what="a positive integer")
        _choice("features.storage_dtype", f.storage_dtype, STORAGE_DTYPES)
        _choice("features.device", f.device.split(":")[0], ("auto", "cpu", "cuda"))
        _int("features.num_workers", f.num_workers, minimum=0, what="a non-negative integer")
        if not isinstance(f.tf32, bool):
            raise ConfigError(f"features.tf32 must be true or false, got {f.tf32!r}")

        _choice("data.benchmark", d.benchmark, BENCHMARKS)
        _int("data.seed", d.seed)
        _int("data.image_size", d.image_size, minimum=8, what="an integer ≥ 8")
        for name in ("n_train", "n_id_val", "n_ood"):
            value = getattr(d, name)
            if value is not None:
                _int(f"data.{name}", value, minimum=1, what="a positive integer or null")
        _int("data.crop_size", d.crop_size, minimum=8, what="an integer ≥ 8")
        _choice("data.corrupt_policy", d.corrupt_policy, CORRUPT_POLICIES)
        _choice("data.corrupt_check", d.corrupt_check, ("header", "decode", "none"))
        if check_paths:
            for name in ("imagenet_val_ground_truth", "imagenet_class_mapping"):
                if getattr(d, name):
                    _existing_path(f"data.{name}", getattr(d, name), options)
        if d.benchmark in ("living17", "entity13", "entity30", "nonliving26") and check_paths:
            if not d.imagenet_root:
                raise ConfigError(f"data.imagenet_root is required for data.benchmark={d.benchmark!r}")
            _existing_path("data.imagenet_root", d.imagenet_root, options)
        if d.benchmark == "image_folder" and check_paths:
            for name in ("id_train_dir", "id_val_dir"):
                if not getattr(d, name):
                    raise ConfigError(f"data.{name} is required for data.benchmark='image_folder'")
            if not d.ood_dirs:
                raise ConfigError("data.ood_dirs must list at least one folder for data.benchmark='image_folder'")
            for name in ("id_train_dir", "id_val_dir"):
                _existing_path(f"data.{name}", getattr(d, name), options)
            for i, path in enumerate(d.ood_dirs):
                _existing_path(f"data.ood_dirs[{i}]", path, options)

        _choice("solver.method", s.method, SOLVER_METHODS)
        _positive_grid("solver.r_grid", s.r_grid)
        _int("solver.rounds", s.rounds, minimum=1, what="a positive integer")
        _int("solver.points_per_round", s.points_per_round, minimum=2, what="an integer ≥ 2")
        _int("solver.max_extensions", s.max_extensions, minimum=0, what="a non-negative integer")
        _int("solver.max_steps", s.max_steps, minimum=1, what="a positive integer")
        _int("solver.eval_every", s.eval_every, minimum=1, what="a positive integer")
        if not isinstance(s.tol, (int, float)) or not s.tol > 0:
            raise ConfigError(f"solver.tol must be a positive number, got {s.tol!r}")
        _choice("solver.momentum", s.momentum, ("strongly_convex", "schedule"))
        _choice("solver.targets", s.targets, TARGETS)
        _choice("solver.selection", s.selection, SELECTIONS)
        if not isinstance(s.holdout_fraction, (int, float)) or not 0 < s.holdout_fraction < 1:
            raise ConfigError(f"solver.holdout_fraction must be in (0, 1), got {s.holdout_fraction!r}")
        _choice("solver.device", s.device, SOLVER_DEVICES)
        _choice("solver.dtype", s.dtype, SOLVER_DTYPES)
        if s.dtype == "float32" and s.method != "spectral":
            raise ConfigError(f"solver.dtype=float32 needs solver.method=spectral (a float32 eigh); "
                              f"NAG runs in float64, got solver.method={s.method!r}")

        _positive_grid("probe.c_grid", pr.c_grid)
        _int("probe.max_iter", pr.max_iter, minimum=1, what="a positive integer")
        _int("report.bootstrap_resamples", self.report.bootstrap_resamples, minimum=0,
             what="a non-negative integer (0: no intervals)")
        _int("report.bootstrap_seed", self.report.bootstrap_seed)

        if r.num_workers is not None:
            _int("ray.num_workers", r.num_workers, minimum=1, what="a positive integer or null")
        for name in ("gpus_per_worker", "cpus_per_worker", "block_gpus"):
            value = getattr(r, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"ray.{name} must be a non-negative number, got {value!r}")
        _int("ray.shard_size", r.shard_size, minimum=1, what="a positive integer")
        _int("ray.max_blocks_in_flight", r.max_blocks_in_flight, minimum=1, what="a positive integer")

        ft = self.finetune
        if not isinstance(ft.baselines, list):
            raise ConfigError(f"finetune.baselines must be a list of {', '.join(FINETUNE_BASELINES)}, got {ft.baselines!r}")
        for i, name in enumerate(ft.baselines):
            _choice(f"finetune.baselines[{i}]", name, FINETUNE_BASELINES)
        if "scratch" in ft.baselines:
            from entk_ray.finetune import random_backbones

            if m.name not in random_backbones():
                raise ConfigError(f"finetune.baselines 'scratch' needs a random initialization of model.name="
                                  f"{m.name!r}; known: {', '.join(random_backbones())}")
        if len(set(ft.baselines)) != len(ft.baselines):
            raise ConfigError(f"finetune.baselines lists a baseline twice: {ft.baselines!r}")
        _int("finetune.epochs", ft.epochs, minimum=1, what="a positive integer")
        _int("finetune.batch_size", ft.batch_size, minimum=1, what="a positive integer")
        _int("finetune.num_workers", ft.num_workers, minimum=1, what="a positive integer")
        if ft.batch_size % ft.num_workers:
            raise ConfigError(f"finetune.batch_size ({ft.batch_size}) must be a multiple of finetune.num_workers "
                              f"({ft.num_workers}): each worker takes an equal share of the global batch")
        _positive_grid("finetune.lr_grid", ft.lr_grid)
        for name in ("momentum", "weight_decay"):
            value = getattr(ft, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"finetune.{name} must be a non-negative number, got {value!r}")
        _int("finetune.seed", ft.seed)
        _choice("finetune.augment", ft.augment, FINETUNE_AUGMENTS)
        _choice("finetune.precision", ft.precision, FINETUNE_PRECISIONS)
        _choice("finetune.batchnorm", ft.batchnorm, FINETUNE_BATCHNORM)
        for name in ("channels_last", "sync_batchnorm"):
            if not isinstance(getattr(ft, name), bool):
                raise ConfigError(f"finetune.{name} must be true or false, got {getattr(ft, name)!r}")
        if ft.use_gpu is not None and not isinstance(ft.use_gpu, bool):
            raise ConfigError(f"finetune.use_gpu must be true, false or null, got {ft.use_gpu!r}")
        _int("finetune.eval_batch_size", ft.eval_batch_size, minimum=1, what="a positive integer")
        if not isinstance(ft.cpus_per_worker, (int, float)) or isinstance(ft.cpus_per_worker, bool) \
                or not ft.cpus_per_worker > 0:
            raise ConfigError(f"finetune.cpus_per_worker must be a positive number, got {ft.cpus_per_worker!r}")
        if ft.loader_workers is not None:
            _int("finetune.loader_workers", ft.loader_workers, minimum=0, what="a non-negative integer or null")
        if ft.max_concurrent is not None:
            _int("finetune.max_concurrent", ft.max_concurrent, minimum=1, what="a positive integer or null")
        _int("finetune.max_failures", ft.max_failures, minimum=-1, what="an integer ≥ -1 (-1: retry forever)")

        pl = self.plan
        _choice("plan.hardware", pl.hardware, PLAN_HARDWARE)
        _int("plan.nodes", pl.nodes, minimum=1, what="a positive integer")
        if pl.head is not None:
            _choice("plan.head", pl.head, PLAN_HARDWARE[2:])
        if not isinstance(pl.enforce, bool):
            raise ConfigError(f"plan.enforce must be true or false, got {pl.enforce!r}")
        _choice("plan.storage_dtype", pl.storage_dtype, ("auto", *STORAGE_DTYPES))
        _choice("plan.kernel_dtype", pl.kernel_dtype, PLAN_KERNEL_DTYPES)
        _choice("plan.solver", pl.solver, PLAN_SOLVERS)
        if pl.tile_rows is not None:
            _int("plan.tile_rows", pl.tile_rows, minimum=1, what="a positive integer or null")
        _int("plan.gpus", pl.gpus, minimum=0, what="a non-negative integer")
        _int("plan.cpus", pl.cpus, minimum=1, what="a positive integer")
        for name in ("ram_gb", "disk_gb", "gpu_memory_gb", "object_store_gb", "shm_gb"):
            value = getattr(pl, name)
            if value is None and name not in ("ram_gb", "disk_gb"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"plan.{name} must be a positive number of GB, got {value!r}")
        return self


def _from_dict(cls, data: dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"unknown config field '{prefix}{key}' (known: {known})")
        ftype = fields[key].type
        sub = _SECTIONS.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[key] = _from_dict(sub, value, f"{prefix}{key}.") if sub else _coerce_floats(str(ftype), value)
    return cls(**kwargs)


def _mapping_fields(cls, prefix: str = "") -> set[str]:
    """Dotted names of the free-form mapping fields (``dict[...]``) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    names = set()
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            names |= _mapping_fields(annotation, f"{prefix}{f.name}.")
        elif typing.get_origin(annotation) is dict:
            names.add(f"{prefix}{f.name}")
    return names


def _coerce_floats(ftype: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string: accept such strings (and ints) where floats are expected."""
    def to_float(v):
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return v
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    if ftype.startswith("list[float]") and isinstance(value, list):
        return [to_float(v) for v in value]
    if ftype.startswith("float"):
        return to_float(value)
    return value


_SECTIONS = {
    c.__name__: c
    for c in (ModelConfig, FeatureConfig, DataConfig, SolverConfig, ProbeConfig, ReportConfig, RayConfig, StoreConfig,
              FinetuneConfig, PlanConfig)
}


def _check_types(section: Any, prefix: str) -> None:
    """Check every field of a config dataclass (recursively) against its annotation: ``int``,
    ``float`` (finite: no NaN or ±inf), ``bool``, ``str``, ``X | None``, ``list[X]`` and
    ``dict[str, Any]``. A section added later is covered without code here."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        name, value, annotation = f"{prefix}{f.name}", getattr(section, f.name), hints[f.name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, annotation):
                raise ConfigError(f"{name} must be a mapping of its fields, got {redact(value)!r}")
            _check_types(value, f"{name}.")
            continue
        mismatch = _type_mismatch(name, value, annotation)
        if mismatch is not None:
            where, expected, got = mismatch
            raise ConfigError(f"{where} must be {expected}, got {redact(got)!r}")


def _type_mismatch(name: str, value: Any, annotation: Any) -> tuple[str, str, Any] | None:
    """None when ``value`` fits ``annotation``, else (the field or element, what it must be, its value)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        found = [_type_mismatch(name, value, a) for a in options]
        if any(m is None for m in found):
            return None
        if len(options) == 1 and found[0][0] != name:  # the list fits, one element does not
            return found[0]
        return name, _describe(annotation), value
    if origin is list:
        if not isinstance(value, list):
            return name, _describe(annotation), value
        for i, item in enumerate(value):
            mismatch = _type_mismatch(f"{name}[{i}]", item, args[0] if args else Any)
            if mismatch is not None:
                return mismatch
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return name, _describe(annotation), value
        key_type, value_type = args if args else (Any, Any)
        for key, item in value.items():
            mismatch = _type_mismatch(f"{name} key", key, key_type) or \
                _type_mismatch(f"{name}.{key}", item, value_type)
            if mismatch is not None:
                return mismatch
        return None
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif annotation is type(None):
        ok = value is None
    elif isinstance(annotation, type):
        ok = isinstance(value, annotation)
    else:
        ok = True  # an annotation this checker does not know: the specific checks below apply
    return None if ok else (name, _describe(annotation), value)


def _describe(annotation: Any) -> str:
    """``int | None`` → "an integer or null"; ``list[float]`` → "a list of finite numbers"."""
    names = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
             float: ("a finite number", "finite numbers"), str: ("a string", "strings"),
             type(None): ("null", "nulls")}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        item = args[0] if args else Any
        return f"a list of {names[item][1]}" if item in names else "a list"
    if origin is dict:
        return "a mapping"
    return names.get(annotation, (getattr(annotation, "__name__", str(annotation)),))[0]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _int(name: str, value: Any, minimum: int | None = None, what: str = "an integer") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def _positive_grid(name: str, values: list) -> None:
    """A non-empty list of positive numbers (a hyper-parameter grid)."""
    if not values:
        raise ConfigError(f"{name} must not be empty")
    for i, value in enumerate(values):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{name}[{i}] must be a positive number, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _feature_map(name: str, value: Any) -> None:
    from entk_ray.feature_maps import parse_map_spec

    try:
        parse_map_spec(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _default_weights_available(model_name: str) -> None:
    """Without model.weights the backbone's default file must be here (nothing is downloaded):
    say so before any work, with the two ways out."""
    from entk_ray.models import BACKBONES, WeightsNotFoundError

    try:
        BACKBONES[model_name].default_weights()
    except WeightsNotFoundError as exc:
        raise ConfigError(
            f"model.weights is not set and the default {model_name} weights are not available here. "
            f"Pass a checkpoint with --weights PATH (model.weights: a torchvision state_dict or a MoCo-v2 "
            f"checkpoint, local or s3://), or use the bundled EfficientNet-Lite0 with --model efficientnet_lite0. "
            f"({exc})") from exc


def _existing_path(name: str, path: str, storage_options: dict[str, Any]) -> None:
    from entk_ray.storage import filesystem_for

    try:
        fs, root = filesystem_for(path, storage_options)
        ok = fs.exists(root)
    except Exception as exc:  # an unreachable S3 endpoint is as bad as a missing path
        raise ConfigError(f"{name} = {path!r} cannot be checked: {exc}") from exc
    if not ok:
        raise ConfigError(f"{name} = {path!r} does not exist")
