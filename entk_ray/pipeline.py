"""data → features → kernels → β sweep → linear probe → report, with or without Ray.

One example's journey: an image is transformed (``entk_ray.data``), the scalar-head model
(``entk_ray.models``) maps it to φ(x) = ∂f(x)/∂θ_S (``entk_ray.features``), its row of K and of
each K_e is an inner product of such features (``entk_ray.kernels``), and its prediction is
argmax_c (K_e α)_c for the dual coefficients α chosen by the telescopic β sweep
(``entk_ray.solvers``).

The compute-heavy stages go through a backend (``entk_ray.backends``): ``LocalBackend`` runs them
in this process; ``entk_ray.distributed.RayBackend`` runs them as Ray actors, tasks and a Tune
sweep. This module is the orchestration both plug into; it imports the Ray layer only lazily, in
:func:`make_backend`, and nothing below it imports this module.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from entk_ray.backends import Backend, KernelSet, LocalBackend, fingerprint_parts
from entk_ray.baselines import ProbeResult, linear_probe
from entk_ray.config import Config
from entk_ray.data.base import Benchmark
from entk_ray.fingerprints import digest
from entk_ray.plan import Plan, PlanError
from entk_ray.progress import progress_enabled
from entk_ray.solvers import (Choice, KernelProblem, SolverRun, SolverSettings, choose_converged,
                              choose_early_stopping, make_problem, predictions_at, search_summary)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def build_benchmark(cfg: Config) -> Benchmark:
    """The configured benchmark, preprocessed the way the configured backbone's pretrained weights
    expect (:func:`entk_ray.models.preprocessing`: interpolation, crop fraction, mean/std).

    The digits benchmark takes only the normalization: its images are 8×8 counts upsampled
    (bilinear, see :mod:`entk_ray.data.digits`), not photos resized to the training resolution."""
    from entk_ray.models import preprocessing

    d = cfg.data
    prep = preprocessing(cfg.model.name)
    if d.benchmark == "digits":
        from entk_ray.data.digits import build_digits_benchmark

        return build_digits_benchmark(d, prep.mean, prep.std)
    from entk_ray.data.transforms import eval_transform_for_crop

    transform = eval_transform_for_crop(d.crop_size, crop_fraction=prep.crop_fraction, mean=prep.mean,
                                        std=prep.std, interpolation=prep.interpolation)
    common = dict(cache_dir=d.index_cache, corrupt_check=d.corrupt_check)
    if d.benchmark == "image_folder":
        from entk_ray.data.image_folder import build_image_folder_benchmark

        return build_image_folder_benchmark(d, transform, storage_options=cfg.storage_options, **common)
    from entk_ray.data.imagenet import build_breeds_benchmark

    return build_breeds_benchmark(d, transform, name=d.benchmark, storage_options=cfg.storage_options,
                                  val_ground_truth=d.imagenet_val_ground_truth,
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
    trained: dict = field(default_factory=dict)  # method → entk_ray.finetune.BaselineResult


def _row(choice: Choice, id_name: str, oods: list[str]) -> dict:
    return {"method": choice.method, "id_acc": choice.accuracy[id_name],
            "ood_acc": choice.accuracy[oods[0]] if oods else None,
            "ood": {name.removeprefix("ood:"): choice.accuracy[name] for name in oods},
            "r": choice.r, "beta": choice.beta, "step": choice.step, "converged": choice.converged,
            "tied": choice.tied, "selection_loss": choice.selection_loss, "source": "measured"}


def make_backend(cfg: Config, plan: Plan | None = None) -> Backend:
    """The configured backend; a Ray it starts gets the plan's object-store size."""
    if cfg.use_ray:
        from entk_ray.distributed import RayBackend

        return RayBackend(cfg, object_store_bytes=plan.object_store_bytes if plan is not None else None)
    return LocalBackend()


def _refuse_early(cfg: Config, log: Callable[[str], None]) -> None:
    """Before the data is indexed: a run that cannot fit at the config's nominal sizes (when
    they are known without the data) is refused at once; the full plan follows at the real sizes."""
    from entk_ray.plan import local_resources, make_plan, sizes_from_config

    try:
        sizes = sizes_from_config(cfg)
    except PlanError:  # sizes known only from the data (image folders): planned once it is indexed
        return
    resources = local_resources() if cfg.plan.hardware == "auto" and not cfg.use_ray else None
    try:
        make_plan(cfg, sizes, resources)
    except PlanError as exc:
        if exc.plan is not None:
            log(exc.plan.format())
        raise


def plan_run(cfg: Config, benchmark: Benchmark) -> Plan:
    """The run's plan at the benchmark's sizes (:func:`entk_ray.plan.make_plan`): for this machine
    when the run is one process, else for ``plan.hardware`` (``auto``: the connected Ray cluster, or
    this machine when Ray is not started yet). Raises :class:`~entk_ray.plan.PlanError` when it
    does not fit and ``plan.enforce`` is on."""
    from entk_ray.plan import RunSizes, local_resources, make_plan

    resources = local_resources() if cfg.plan.hardware == "auto" and not cfg.use_ray else None
    return make_plan(cfg, RunSizes.from_benchmark(benchmark), resources)


def _joins_cluster(cfg: Config) -> bool:
    """The plan is made for a Ray cluster this run joins (``ray.address`` names one, ``plan.hardware=auto``)."""
    return cfg.use_ray and cfg.ray.address not in (None, "local") and cfg.plan.hardware == "auto"


def plan_only(cfg: Config) -> Plan:
    """``--plan``: the plan at the config's sizes (:func:`entk_ray.plan.sizes_from_config`: no
    data is read) for ``plan.hardware``; ``auto`` is this machine, or the cluster at ``ray.address``
    (joined to read ``ray.nodes()``, then left). Raises :class:`~entk_ray.plan.PlanError` when
    the run does not fit."""
    from entk_ray.plan import local_resources, make_plan

    if not _joins_cluster(cfg):
        return make_plan(cfg, resources=local_resources() if cfg.plan.hardware == "auto" else None)
    backend = make_backend(cfg)
    try:
        return make_plan(cfg)
    finally:
        backend.close()


def run(cfg: Config, backend: Backend | None = None, progress: bool = True,
        log: Callable[[str], None] = print, reference_rows: list[dict] | None = None,
        classifier_factory=None, benchmark: Benchmark | None = None) -> RunResult:
    """Run the whole method and write the report into ``cfg.store.out_dir``.

    ``progress=False`` silences every progress bar and progress line of the run (``--quiet``).
    ``classifier_factory`` builds the networks of the trained baselines (``cfg.finetune.baselines``;
    default: the configured backbone, see ``entk_ray.finetune``).

    The plan comes first, once the splits' sizes are known and before any feature is computed: it
    is logged, applied to the config (:meth:`~entk_ray.plan.Plan.apply`: Φ's dtype, kernel tiles,
    the solver's method, device and dtype, ...), recorded in the results, and a plan that does not
    fit stops the run with :class:`~entk_ray.plan.PlanError` (unless ``plan.enforce`` is off).
    ``benchmark``: a ready benchmark (synthetic data, a test's); the data's locations in ``cfg``
    are then neither required nor read.
    """
    with progress_enabled(progress):
        return _run(cfg, backend, progress, log, reference_rows, classifier_factory, benchmark)


def _run(cfg: Config, backend: Backend | None, progress: bool, log: Callable[[str], None],
         reference_rows: list[dict] | None, classifier_factory=None,
         benchmark: Benchmark | None = None) -> RunResult:
    from entk_ray.provenance import run_context

    cfg.validate(check_paths=benchmark is None)
    context = run_context()  # first: the timestamp is the run's start
    own_backend = backend is None
    if own_backend and benchmark is None and not _joins_cluster(cfg):
        _refuse_early(cfg, log)
    t0 = time.perf_counter()
    benchmark = benchmark or build_benchmark(cfg)
    sizes = {"train": len(benchmark.train), **{k: len(v) for k, v in benchmark.eval_sets().items()}}
    log(f"benchmark {benchmark.name}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))
    timings = {"data_s": time.perf_counter() - t0}

    if own_backend and _joins_cluster(cfg):
        backend = make_backend(cfg)  # join the cluster first: the plan is made for its nodes
    try:
        plan = plan_run(cfg, benchmark)
    except PlanError as exc:
        if exc.plan is not None:
            log(exc.plan.format())
        if own_backend and backend is not None:
            backend.close()
        raise
    log(plan.format())
    cfg = plan.apply(cfg)
    backend = backend or make_backend(cfg, plan)
    try:
        ks = backend.kernels(cfg, benchmark, progress=progress)
        timings.update(ks.timings)
        log(features_line(timings, sum(sizes.values()), ks))

        s = cfg.solver
        eval_labels = {name: ds.labels for name, ds in benchmark.eval_sets().items()}
        problem = make_problem(ks.train, benchmark.train.labels, ks.evals, eval_labels, benchmark.num_classes,
                               targets=s.targets, selection=s.selection, holdout_fraction=s.holdout_fraction,
                               seed=s.seed)
        start = time.perf_counter()
        runs = backend.sweep(cfg, problem)
        timings["sweep_s"] = time.perf_counter() - start
        search = search_summary(runs, s.r_grid, s.max_extensions, problem.select_on)
        log(f"β sweep: {search['message']} ({timings['sweep_s']:.1f}s, {plan.solver})")
        extra = {"plan": plan.to_dict()}
        if s.dtype == "float32":  # float32 eigh: its accuracy against float64 NAG goes into the results
            from entk_ray.arrays import namespace_for
            from entk_ray.solvers import SolverSettings, float32_eigh_error

            start = time.perf_counter()
            extra["solver_float32_error"] = float32_eigh_error(problem, SolverSettings.from_config(s),
                                                               namespace=namespace_for("auto"))
            timings["float32_error_s"] = time.perf_counter() - start
            log(f"float32 eigh against float64 NAG (n = {extra['solver_float32_error']['n']}): largest accuracy "
                f"difference {extra['solver_float32_error']['max_accuracy_diff']:.4f}")
    finally:
        if own_backend:
            backend.close()

    start = time.perf_counter()
    probe = run_linear_probe(cfg, benchmark, ks, problem, progress=progress)
    timings["probe_s"] = time.perf_counter() - start

    oods = [name for name in problem.eval_kernels if name.startswith("ood:")]
    early = choose_early_stopping(runs, problem.select_on)
    converged = choose_converged(runs, problem.select_on)
    probe_row = {"method": "Linear probing", "id_acc": probe.accuracy["id_val"],
                 "ood_acc": probe.accuracy[oods[0]] if oods else None,
                 "ood": {n.removeprefix("ood:"): probe.accuracy[n] for n in oods}, "C": probe.c,
                 "tied": probe.tied, "source": "measured"}
    measured = [probe_row, _row(early, "id_val", oods), _row(converged, "id_val", oods)]

    start = time.perf_counter()
    report = cfg.report
    from entk_ray.report import add_intervals

    if report.bootstrap_resamples:
        labels = {name: problem.eval_labels[name] for name in ["id_val", *oods]}
        predictions = [probe.predictions, *chosen_predictions(problem, [early, converged], cfg.solver)]
        for row, predicted in zip(measured, predictions):
            # one example of slack: the sweep may have scored this point in another process
            add_intervals(row, {name: predicted[name] == labels[name] for name in labels}, "id_val",
                          report.bootstrap_resamples, report.bootstrap_seed, tolerance_examples=1)
    timings["intervals_s"] = time.perf_counter() - start
    rows = list(reference_rows or []) + measured

    from entk_ray.models import weights_fingerprint

    weights_fp = weights_fingerprint(cfg.model, cfg.storage_options)
    parts = fingerprint_parts(cfg, benchmark, ks.subset_fingerprint, weights_fp)
    fingerprint = digest(parts)
    trained = {}
    if cfg.finetune.baselines:  # fine-tuning, LP-FT, from scratch (entk_ray.finetune)
        from entk_ray.finetune import run_baselines

        start = time.perf_counter()
        trained = run_baselines(cfg, benchmark, probe, problem.select_on, fingerprint, log=log,
                                factory=classifier_factory)
        timings["finetune_s"] = time.perf_counter() - start
        for baseline in trained.values():
            row, correct = baseline.row(), baseline.chosen_correct()
            if report.bootstrap_resamples and correct is not None:
                add_intervals(row, {name: correct[name] for name in ["id_val", *oods]}, "id_val",
                              report.bootstrap_resamples, report.bootstrap_seed)
            rows.append(row)
    timings["total_s"] = time.perf_counter() - t0
    result = RunResult(rows, runs, probe, problem.select_on, timings, fingerprint, sizes, trained=trained)
    from entk_ray.report import write_results

    span = span_analysis(cfg, problem, ks, early, log)
    result.paths = write_results(cfg.store.out_dir, rows, runs, problem.select_on, "id_val", extra={
        "benchmark": benchmark.name, "context": context, "split_sizes": sizes, "timings": timings,
        "fingerprint": fingerprint, "fingerprint_parts": parts, "weights_fingerprint": weights_fp,
        "subset_fingerprint": ks.subset_fingerprint, "p": ks.p,
        "preprocessing": describe_preprocessing(cfg), "search": search,
        "bootstrap": {"resamples": report.bootstrap_resamples, "seed": report.bootstrap_seed,
                      "method": "percentile", "level": 0.95},
        "probe_sweep": probe.sweep, "config": cfg.to_dict(), "backend": backend.name, "span": span, **extra,
        **({"trained": {m: r.to_dict() for m, r in trained.items()}} if trained else {})})
    if span is not None:
        out_dir = Path(cfg.store.out_dir)
        result.paths.update({name: out_dir / name for name in ("span.json", "span.png", "spectrum.png")})
    if trained:
        from entk_ray.report_training import write_training

        result.paths.update(write_training(cfg.store.out_dir, trained, runs, rows, probe.accuracy))
    return result


def features_line(timings: dict, examples: int, ks: KernelSet) -> str:
    """The run's features/kernels line. Sets ``timings["examples_per_s"]`` (examples computed per
    second of the features stage; absent when nothing was computed)."""
    where = f"p={ks.p}, S={ks.subset_fingerprint}"
    if "store_load_s" in timings:
        return (f"features and kernels: K {ks.train.shape} and the evaluation kernels loaded from the artifact store "
                f"in {timings['store_load_s']:.1f}s (nothing computed); {where}")
    computed = int(timings.get("examples_computed", examples))
    seconds = timings.get("features_s", 0.0)
    done = f"{examples} examples" if computed == examples else \
        f"{computed} of {examples} examples computed ({examples - computed} loaded from the artifact store)"
    rate = ""
    if computed and seconds > 0:
        timings["examples_per_s"] = computed / seconds
        rate = f" ({timings['examples_per_s']:.1f} examples/s, decoding + gradients)"
    return (f"features: {done} in {seconds:.1f}s{rate}; kernels: K {ks.train.shape} in "
            f"{timings.get('kernels_s', 0.0):.1f}s; {where}")


def describe_preprocessing(cfg: Config) -> str:
    """One line for the report: how images became model inputs, and where the values come from."""
    from entk_ray.models import preprocessing

    prep = preprocessing(cfg.model.name)
    norm = f"mean {list(prep.mean)}, std {list(prep.std)}"
    if cfg.data.benchmark == "digits":
        return (f"8×8 optdigits-style counts, bilinear upsampling to {cfg.data.image_size} px; normalization "
                f"{norm} ({prep.source})")
    resize = int(round(cfg.data.crop_size / prep.crop_fraction))
    return (f"{prep.interpolation} resize to {resize}, center crop {cfg.data.crop_size}, {norm} ({prep.source})")


def chosen_predictions(problem: KernelProblem, choices: list[Choice], solver_cfg) -> list[dict]:
    """Per-example predictions (evaluation set → labels) at each chosen (β, step), recomputed on
    the driver: from the sweep's spectrum (or one eigh) for the spectral path, NAG reruns otherwise;
    on the solver's device (the driver's GPU when the plan put the solver on one) in its dtype."""
    from entk_ray.arrays import namespace_for
    from entk_ray.solvers import SpectralSolver

    settings = SolverSettings.from_config(solver_cfg)
    xp = namespace_for("cpu" if settings.device == "cpu" else "auto")
    solver = None
    if settings.method == "spectral":
        swept = getattr(problem, "spectrum", None)  # the spectrum the sweep used: no second eigh
        solver = SpectralSolver(swept, namespace=xp) if swept is not None and swept.eigh_dtype == settings.dtype \
            else SpectralSolver.from_problem(problem, xp, settings.dtype, vectors=False)
    return [predictions_at(problem, c.r, c.step, settings, solver=solver) for c in choices]


def span_analysis(cfg: Config, problem: KernelProblem, ks: KernelSet, early: Choice,
                  log: Callable[[str], None] = print) -> dict | None:
    """The out-of-span analysis and the kernel spectrum (``span.json``, ``span.png``,
    ``spectrum.png``) for the early-stopping model, when the backend gave ‖φ(x)‖² of the
    evaluation sets (``entk_ray.span``)."""
    from entk_ray.span import format_span_line, write_span_analysis

    if not ks.eval_diagonals:
        log("span analysis skipped: the kernels came without the evaluation features' norms")
        return None
    if getattr(problem, "spectrum", None) is None:
        # No spectrum left by the solver (the NAG path): one eigh on the solver's device, without
        # eigenvectors; float32 on a GPU, where a float64 eigh of a large K may not fit (docs/scaling.md).
        from entk_ray.arrays import namespace_for
        from entk_ray.solvers import Spectrum

        xp = namespace_for("cpu" if cfg.solver.device == "cpu" else "auto")
        Spectrum.of(problem, xp, "float64" if xp.is_numpy else "float32", vectors=False)
    summary = write_span_analysis(cfg.store.out_dir, problem, ks.eval_diagonals, early.r, early.step,
                                  momentum=cfg.solver.momentum)
    log(format_span_line(summary))
    return summary


def run_linear_probe(cfg: Config, benchmark: Benchmark, ks: KernelSet, problem: KernelProblem,
                     progress: bool = False) -> ProbeResult:
    """The linear probe on the same splits (and the same selection set) as the eNTK."""
    train_x, train_y = ks.embeddings["train"], benchmark.train.labels
    evals = {name: (ks.embeddings[name], ds.labels) for name, ds in benchmark.eval_sets().items()}
    if problem.select_on == "holdout":
        from entk_ray.solvers import holdout_split

        fit, hold = holdout_split(train_y, cfg.solver.holdout_fraction, cfg.solver.seed)
        evals["holdout"] = (train_x[hold], train_y[hold])
        train_x, train_y = train_x[fit], train_y[fit]
    return linear_probe(train_x, train_y, evals, problem.select_on, cfg.probe.c_grid, cfg.probe.max_iter,
                        progress=progress)
