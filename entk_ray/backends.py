"""Where the heavy stages run: the :class:`Backend` interface, its one-process implementation,
and what a backend hands back (:class:`KernelSet`).

A backend turns a benchmark into kernels (features of every split, then K = ΦΦᵀ and each
K_e = Φ_eΦᵀ, plus penultimate embeddings for the linear probe) and runs the telescopic β sweep.
:class:`LocalBackend` does both in this process and is the reference;
``entk_ray.distributed.RayBackend`` does them on Ray actors, tasks and Tune and must reproduce it.
Both receive a featurizer factory (``entk_ray.featurizer``), so tests and benchmarks can plug in
their own model.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field

import numpy as np

from entk_ray import kernels as kern
from entk_ray.config import Config
from entk_ray.data.base import Benchmark
from entk_ray.fingerprints import digest
from entk_ray.solvers import KernelProblem, SolverRun, SolverSettings, solve_sweep


@dataclass
class KernelSet:
    """K, the evaluation kernels and the penultimate embeddings of every split."""

    train: np.ndarray
    evals: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]  # "train" and each evaluation set
    subset_fingerprint: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    p: int = 0  # coordinates in S (min(p, #candidate parameters))
    # k(x, x) = ‖φ(x)‖² of every evaluation example (for the span analysis, entk_ray.span); empty
    # when the backend could not provide them (e.g. kernels loaded from an older store)
    eval_diagonals: dict[str, np.ndarray] = field(default_factory=dict)


def run_fingerprint(cfg: Config, benchmark: Benchmark, subset_fingerprint: str, weights_fingerprint: str) -> str:
    """Hash of everything that determines Φ: weights, S, the examples and their transform, dtype."""
    return digest(fingerprint_parts(cfg, benchmark, subset_fingerprint, weights_fingerprint))


def fingerprint_parts(cfg: Config, benchmark: Benchmark, subset_fingerprint: str, weights_fingerprint: str) -> dict:
    """What :func:`run_fingerprint` hashes, readable (it goes into results.json)."""
    return {
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
    """Everything in this process: the reference the Ray backend must reproduce.

    Args:
        featurizer_factory: ``factory(device) -> Featurizer``; default: the configured model
            (:class:`entk_ray.featurizer.ConfigFeaturizerFactory`).
    """

    name = "local"

    def __init__(self, featurizer_factory=None):
        self.featurizer_factory = featurizer_factory

    def kernels(self, cfg: Config, benchmark: Benchmark, progress: bool = True) -> KernelSet:
        from entk_ray.featurizer import ConfigFeaturizerFactory

        factory = self.featurizer_factory or ConfigFeaturizerFactory(cfg.model, cfg.features, cfg.storage_options)
        timings = {}
        start = time.perf_counter()
        featurizer = factory(None)
        splits = {"train": benchmark.train, **benchmark.eval_sets()}
        phis, embs = {}, {}
        for name, dataset in splits.items():
            phis[name] = featurizer.features(dataset, progress=progress, desc=f"features {name}")
            embs[name] = featurizer.embeddings(dataset).numpy()
        timings["features_s"] = time.perf_counter() - start
        timings["examples_computed"] = float(sum(len(dataset) for dataset in splits.values()))
        start = time.perf_counter()
        train = kern.train_kernel([phis["train"]])
        evals = {name: kern.cross_kernel([phis[name]], [phis["train"]]) for name in benchmark.eval_sets()}
        timings["kernels_s"] = time.perf_counter() - start
        diagonals = {name: kern.row_sq_norms(phis[name]) for name in benchmark.eval_sets()}
        return KernelSet(train, evals, embs, featurizer.subset.fingerprint(), timings, featurizer.subset.p,
                         eval_diagonals=diagonals)

    def sweep(self, cfg: Config, problem: KernelProblem) -> list[SolverRun]:
        return solve_sweep(problem, SolverSettings.from_config(cfg.solver))
