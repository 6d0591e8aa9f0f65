"""data → features → kernels → β sweep → linear probe → report, with or without Ray.

One example's journey: an image is transformed (``entk_ray.data``), the scalar-head model
(``entk_ray.models``) maps it to φ(x) = ∂f(x)/∂θ_S (``entk_ray.features``), its row of K and of
each K_e is an inner product of such features (``entk_ray.kernels``), and its prediction is
argmax_c (K_e α)_c for the dual coefficients α chosen by the telescopic β sweep
(``entk_ray.solvers``).

The compute-heavy stages go through a :class:`Backend`: :class:`LocalBackend` runs them in this
process; ``entk_ray.distributed.RayBackend`` runs them as Ray actors, tasks and a Tune sweep.
"""
from __future__ import annotations

import abc
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from entk_ray import kernels as kern
from entk_ray.baselines import ProbeResult, linear_probe
from entk_ray.config import Config, ModelConfig, FeatureConfig
from entk_ray.data.base import Benchmark
from entk_ray.features import (ParameterSubset, compute_embeddings, compute_features, make_feature_computer,
                               select_parameters)
from entk_ray.solvers import (Choice, KernelProblem, SolverRun, choose_converged, choose_early_stopping,
                              make_problem, solve_sweep)


# --------------------------------------------------------------------------------------------
# Building blocks shared by every backend
# --------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Featurizer:
    """The scalar-head model, the parameter subset S and a feature computer, built once per
    process (or Ray actor) from the config. ``shard`` maps dataset rows to (Φ, g_θ(x))."""

    def __init__(self, model_cfg: ModelConfig, feature_cfg: FeatureConfig, storage_options: dict | None = None,
                 device: str | torch.device | None = None):
        from entk_ray.models import build_model

        self.feature_cfg = feature_cfg
        self.device = resolve_device(feature_cfg.device) if device is None else torch.device(device)
        self.model = build_model(model_cfg, storage_options=storage_options).to(self.device).eval()
        self.subset: ParameterSubset = select_parameters(self.model, feature_cfg.p, feature_cfg.param_seed,
                                                         include_head=feature_cfg.include_head)
        self.computer = make_feature_computer(self.model, self.subset, feature_cfg.method, feature_cfg.chunk_size)

    def features(self, dataset, indices=None, progress: bool = False, desc: str = "features") -> torch.Tensor:
        f = self.feature_cfg
        return compute_features(self.computer, dataset, indices, batch_size=f.batch_size,
                                storage_dtype=f.storage_dtype, num_workers=f.num_workers, progress=progress,
                                desc=desc)

    def embeddings(self, dataset, indices=None) -> torch.Tensor:
        f = self.feature_cfg
        return compute_embeddings(self.model, dataset, indices, batch_size=max(f.batch_size, 64),
                                  num_workers=f.num_workers)

    def shard(self, dataset, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features(dataset, indices), self.embeddings(dataset, indices)


@dataclass
class KernelSet:
    """K, the evaluation kernels and the penultimate embeddings of every split."""

    train: np.ndarray
    evals: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]  # "train" and each evaluation set
    subset_fingerprint: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    p: int = 0  # coordinates in S (min(p, #candidate parameters))


def run_fingerprint(cfg: Config, benchmark: Benchmark, subset_fingerprint: str, weights_fingerprint: str) -> str:
    """Hash of everything that determines Φ: weights, S, the examples and their transform, dtype."""
    parts = {
        "weights": weights_fingerprint,
        "model": cfg.model.name,
        "head_seed": cfg.model.head_seed,
        "subset": subset_fingerprint,
        "p": cfg.features.p,
        "param_seed": cfg.features.param_seed,
        "include_head": cfg.features.include_head,
        "dtype": cfg.features.storage_dtype,
        "data": benchmark.manifest_hash(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class Backend(abc.ABC):
    """Where the heavy stages run."""

    name = "abstract"

    @abc.abstractmethod
    def kernels(self, cfg: Config, benchmark: Benchmark, progress: bool = True) -> KernelSet:
        """Features of every split, then K and each K_e (and penultimate embeddings)."""

    @abc.abstractmethod
    def sweep(self, cfg: Config, problem: KernelProblem) -> list[SolverRun]:
        """The telescopic β search; one :class:`SolverRun` per evaluated r."""

    def close(self) -> None:
        pass


class LocalBackend(Backend):
    """Everything in this process: the reference the Ray backend must reproduce."""

    name = "local"

    def kernels(self, cfg: Config, benchmark: Benchmark, progress: bool = True) -> KernelSet:
        timings = {}
        start = time.perf_counter()
        featurizer = Featurizer(cfg.model, cfg.features, cfg.data.storage_options)
        splits = {"train": benchmark.train, **benchmark.eval_sets()}
        phis, embs = {}, {}
        for name, dataset in splits.items():
            phis[name] = featurizer.features(dataset, progress=progress, desc=f"features {name}")
            embs[name] = featurizer.embeddings(dataset).numpy()
        timings["features_s"] = time.perf_counter() - start
        start = time.perf_counter()
        train = kern.train_kernel([phis["train"]])
        evals = {name: kern.cross_kernel([phis[name]], [phis["train"]]) for name in benchmark.eval_sets()}
        timings["kernels_s"] = time.perf_counter() - start
        return KernelSet(train, evals, embs, featurizer.subset.fingerprint(), timings, featurizer.subset.p)

    def sweep(self, cfg: Config, problem: KernelProblem) -> list[SolverRun]:
        s = cfg.solver
        return solve_sweep(problem, s.r_grid, s.rounds, s.points_per_round, s.method, s.max_steps,
                           s.eval_every, s.tol, s.momentum)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def build_benchmark(cfg: Config) -> Benchmark:
    """The configured benchmark, preprocessed for the configured model."""
    from entk_ray.models import normalization

    d = cfg.data
    mean, std = normalization(cfg.model.name)
    if d.benchmark == "digits":
        from entk_ray.data.digits import build_digits_benchmark

        return build_digits_benchmark(d, mean, std)
    from entk_ray.data.transforms import eval_transform_for_crop

    transform = eval_transform_for_crop(d.crop_size, mean=mean, std=std)
    common = dict(cache_dir=d.index_cache, corrupt_check=d.corrupt_check)
    if d.benchmark == "image_folder":
        from entk_ray.data.image_folder import build_image_folder_benchmark

        return build_image_folder_benchmark(d, transform, **common)
    from entk_ray.data.imagenet import build_breeds_benchmark

    return build_breeds_benchmark(d, transform, name=d.benchmark, val_ground_truth=d.imagenet_val_ground_truth,
                                  val_class_mapping=d.imagenet_class_mapping, refresh_index=d.refresh_index,
                                  **common)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    rows: list[dict]
    runs: list[SolverRun]
    probe: ProbeResult
    problem_select_on: str
    timings: dict[str, float]
    fingerprint: str
    split_sizes: dict[str, int]
    paths: dict[str, Path] = field(default_factory=dict)


def _row(choice: Choice, id_name: str, oods: list[str]) -> dict:
    return {"method": choice.method, "id_acc": choice.accuracy[id_name],
            "ood_acc": choice.accuracy[oods[0]] if oods else None,
            "ood": {name.removeprefix("ood:"): choice.accuracy[name] for name in oods},
            "r": choice.r, "beta": choice.beta, "step": choice.step, "converged": choice.converged,
            "source": "measured"}


def make_backend(cfg: Config) -> Backend:
    if cfg.use_ray:
        from entk_ray.distributed import RayBackend

        return RayBackend(cfg)
    return LocalBackend()


def run(cfg: Config, backend: Backend | None = None, progress: bool = True,
        log: Callable[[str], None] = print, reference_rows: list[dict] | None = None) -> RunResult:
    """Run the whole method and write the report into ``cfg.store.out_dir``."""
    cfg.validate()
    t0 = time.perf_counter()
    benchmark = build_benchmark(cfg)
    sizes = {"train": len(benchmark.train), **{k: len(v) for k, v in benchmark.eval_sets().items()}}
    log(f"benchmark {benchmark.name}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    timings = {"data_s": time.perf_counter() - t0}

    own_backend = backend is None
    backend = backend or make_backend(cfg)
    try:
        ks = backend.kernels(cfg, benchmark, progress=progress)
        timings.update(ks.timings)
        examples = sum(sizes.values())
        rate = examples / timings["features_s"] if timings.get("features_s") else float("nan")
        timings["examples_per_s"] = rate
        log(f"features: {examples} examples in {timings.get('features_s', 0):.1f}s ({rate:.1f} examples/s, "
            f"decoding + gradients); kernels: K {ks.train.shape} in {timings.get('kernels_s', 0):.1f}s; "
            f"p={ks.p}, S={ks.subset_fingerprint}")

        s = cfg.solver
        eval_labels = {name: ds.labels for name, ds in benchmark.eval_sets().items()}
        problem = make_problem(ks.train, benchmark.train.labels, ks.evals, eval_labels, benchmark.num_classes,
                               targets=s.targets, selection=s.selection, holdout_fraction=s.holdout_fraction,
                               seed=s.seed)
        start = time.perf_counter()
        runs = backend.sweep(cfg, problem)
        timings["sweep_s"] = time.perf_counter() - start
        log(f"β sweep: {len(runs)} values of r over {s.rounds} rounds ({timings['sweep_s']:.1f}s)")
    finally:
        if own_backend:
            backend.close()

    start = time.perf_counter()
    probe = run_linear_probe(cfg, benchmark, ks, problem)
    timings["probe_s"] = time.perf_counter() - start

    oods = [name for name in problem.eval_kernels if name.startswith("ood:")]
    early = choose_early_stopping(runs, problem.select_on)
    converged = choose_converged(runs, problem.select_on)
    probe_row = {"method": "Linear probing", "id_acc": probe.accuracy["id_val"],
                 "ood_acc": probe.accuracy[oods[0]] if oods else None,
                 "ood": {n.removeprefix("ood:"): probe.accuracy[n] for n in oods}, "C": probe.c,
                 "source": "measured"}
    rows = list(reference_rows or []) + [probe_row, _row(early, "id_val", oods), _row(converged, "id_val", oods)]
    timings["total_s"] = time.perf_counter() - t0

    from entk_ray.models import weights_fingerprint

    fingerprint = run_fingerprint(cfg, benchmark, ks.subset_fingerprint,
                                  weights_fingerprint(cfg.model, cfg.data.storage_options))
    result = RunResult(rows, runs, probe, problem.select_on, timings, fingerprint, sizes)
    from entk_ray.report import write_results

    result.paths = write_results(cfg.store.out_dir, rows, runs, problem.select_on, "id_val", extra={
        "benchmark": benchmark.name, "split_sizes": sizes, "timings": timings, "fingerprint": fingerprint,
        "subset_fingerprint": ks.subset_fingerprint, "probe_sweep": probe.sweep, "config": cfg.to_dict(),
        "backend": backend.name})
    return result


def run_linear_probe(cfg: Config, benchmark: Benchmark, ks: KernelSet, problem: KernelProblem) -> ProbeResult:
    """The linear probe on the same splits (and the same selection set) as the eNTK."""
    train_x, train_y = ks.embeddings["train"], benchmark.train.labels
    evals = {name: (ks.embeddings[name], ds.labels) for name, ds in benchmark.eval_sets().items()}
    if problem.select_on == "holdout":
        from entk_ray.solvers import holdout_split

        fit, hold = holdout_split(train_y, cfg.solver.holdout_fraction, cfg.solver.seed)
        evals["holdout"] = (train_x[hold], train_y[hold])
        train_x, train_y = train_x[fit], train_y[fit]
    return linear_probe(train_x, train_y, evals, problem.select_on, cfg.probe.c_grid, cfg.probe.max_iter)
