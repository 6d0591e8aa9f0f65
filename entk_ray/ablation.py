"""The ablation runner: feature maps × p × seeds on one benchmark, sharing the feature passes.

A grid (YAML, :class:`AblationGrid`) names a base config, feature maps (``entk_ray.feature_maps``
specs), values of p and seeds (each seed sets the parameter-subset seed and/or the head seed).
A *cell* is one (map, p, seed); a *group* is one (map, seed), i.e. one model and one map drawn
at the group's largest p. The work:

1. **One feature pass per group.** The map is drawn at p_max; every smaller p of the grid is its
   nested restriction (:meth:`~entk_ray.feature_maps.FeatureMap.restrict`), whose Φ is a column
   selection of Φ_max (times a constant for JL). So train Φ_max is computed once, each cell's K is
   built from its columns, and the evaluation rows are streamed batch by batch into every cell's
   K_e and ‖φ(x)‖². Φ_max is never recomputed, and only the train rows are held (n × p_max).
2. **Artifacts per cell**, in the run's artifact store under the cell's run fingerprint (weights,
   head seed, the map's fingerprint, data): ``kernels/train``, ``kernels/<set>``,
   ``diagonals/<set>``, and the cell's result ``ablation/cell-<solver digest>``. A rerun loads
   what exists and computes only what is missing; the uniform map at the default p and seed 0
   has the quick-start's fingerprint.
3. **Per cell**: the telescopic β sweep (spectral), early-stopping and converged choices, the
   chosen models' per-example correctness, and the span analysis (``entk_ray.span``).
4. **Summary**: per (map, p), ID and OOD accuracy as mean ± sample standard deviation over seeds
   and a paired bootstrap interval over evaluation examples of the seed-mean; the linear probe as
   reference; figures of accuracy against p, one line per map.

With ``use_ray`` the groups and cells run as Ray tasks (``entk_ray.distributed.ablation``);
otherwise one after another in this process. ``scripts/ablate.py`` is the command line.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from entk_ray.config import Config, ConfigError
from entk_ray.fingerprints import digest
from entk_ray.storage import deep_merged

log = logging.getLogger(__name__)

SEED_VARIES = ("both", "subset", "head")


@dataclass
class AblationGrid:
    """What to run. ``p`` applies to every map unless ``p_by_map`` gives a map its own list."""

    maps: list[str] = field(default_factory=lambda: ["uniform", "stratified", "jl"])
    p: list[int] = field(default_factory=lambda: [5_000, 20_000, 100_000, 500_000])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_varies: str = "both"  # both: param_seed = head_seed = seed; subset: param_seed only; head: head_seed only
    p_by_map: dict[str, list[int]] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)  # a Config as a mapping (like a --config file)
    base_config: str | None = None  # or a config YAML file, with ``base`` applied on top
    out_dir: str = "results/ablation"
    use_ray: bool = True
    bootstrap: int = 1000
    confidence: float = 0.95

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AblationGrid":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"grid file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"grid file {str(path)!r} must hold a mapping")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown grid field(s) {unknown} (known: {', '.join(sorted(known))})")
        grid = cls(**data)
        if grid.base_config and not Path(grid.base_config).is_absolute():
            grid.base_config = str((path.parent / grid.base_config).resolve())
        return grid

    def config(self) -> Config:
        """The base Config (validated), out_dir included."""
        cfg = Config.from_yaml(self.base_config) if self.base_config else Config()
        merged = deep_merged(cfg.to_dict(), self.base or {})
        cfg = Config.from_dict(merged)
        cfg.store.out_dir = self.out_dir
        return cfg.validate()

    def p_values(self, spec: str) -> list[int]:
        return sorted(set(self.p_by_map.get(spec, self.p)))

    def validate(self) -> "AblationGrid":
        from entk_ray.feature_maps import parse_map_spec

        if not self.maps:
            raise ConfigError("grid.maps must list at least one feature map")
        for i, spec in enumerate(self.maps):
            try:
                parse_map_spec(spec)
            except ValueError as exc:
                raise ConfigError(f"grid.maps[{i}]: {exc}") from None
        if len(set(self.maps)) != len(self.maps):
            raise ConfigError(f"grid.maps has duplicates: {self.maps}")
        for spec, values in [("p", self.p), *((f"p_by_map[{k}]", v) for k, v in self.p_by_map.items())]:
            if not isinstance(values, list) or not values or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ConfigError(f"grid.{spec} must be a non-empty list of positive integers, got {values!r}")
        for k in self.p_by_map:
            if k not in self.maps:
                raise ConfigError(f"grid.p_by_map names {k!r}, which is not in grid.maps")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"grid.seeds must be a non-empty list of integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"grid.seeds has duplicates: {self.seeds}")
        if self.seed_varies not in SEED_VARIES:
            raise ConfigError(f"grid.seed_varies must be one of {', '.join(SEED_VARIES)}; got {self.seed_varies!r}")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ConfigError(f"grid.bootstrap must be a non-negative integer, got {self.bootstrap!r}")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"grid.confidence must be in (0, 1), got {self.confidence!r}")
        if not isinstance(self.base, dict):
            raise ConfigError(f"grid.base must be a mapping of config sections, got {self.base!r}")
        self.config()
        return self


class ConfigSetup:
    """Where the runner gets its benchmark, model and weights fingerprint: from the config (the
    default). Tests pass a setup with a tiny model (``entk_ray.distributed.testing``); it must be
    picklable for Ray."""

    def benchmark(self, cfg: Config):
        from entk_ray.pipeline import build_benchmark

        return build_benchmark(cfg)

    def model(self, cfg: Config):
        from entk_ray.models import build_model

        return build_model(cfg.model, cfg.storage_options).eval()

    def weights_fingerprint(self, cfg: Config) -> str:
        from entk_ray.models import weights_fingerprint

        return weights_fingerprint(cfg.model, cfg.storage_options)


def seeded_config(cfg: Config, spec: str, seed: int, varies: str, p: int) -> Config:
    """The cell's Config: features.map/p and the seeds the grid varies."""
    cell = Config.from_dict(cfg.to_dict())
    cell.features.map = spec
    cell.features.p = int(p)
    if varies in ("both", "subset"):
        cell.features.param_seed = int(seed)
    if varies in ("both", "head"):
        cell.model.head_seed = int(seed)
    return cell


# --------------------------------------------------------------------------------------------
# Groups: one feature pass at p_max, every cell's kernels from its columns
# --------------------------------------------------------------------------------------------
@dataclass
class Group:
    spec: str
    seed: int
    p_values: list[int]

    @property
    def name(self) -> str:
        return f"{self.spec}/seed{self.seed}"


@dataclass
class CellKey:
    spec: str
    seed: int
    p: int  # requested
    p_actual: int = 0  # columns of the map (≤ p when fewer coordinates are eligible)
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return f"{self.spec}/p{self.p}/seed{self.seed}"


def _namespace(cfg: Config, fingerprint: str):
    from entk_ray.store import ArtifactStore

    return ArtifactStore.from_config(cfg).namespace(fingerprint)


def _kernel_keys(eval_names) -> list[str]:
    from entk_ray.store import safe_name

    return ["kernels/train", *(f"kernels/{safe_name(e)}" for e in eval_names),
            *(f"diagonals/{safe_name(e)}" for e in eval_names)]


def group_cells(cfg: Config, group: Group, varies: str, benchmark, setup: ConfigSetup) -> tuple[list, Any, Any]:
    """([(cell, map, columns of Φ_max, scale) for every p of the group], the map at p_max, the
    model), the cells' run fingerprints filled in."""
    from entk_ray.backends import run_fingerprint
    from entk_ray.feature_maps import build_feature_map

    top = seeded_config(cfg, group.spec, group.seed, varies, max(group.p_values))
    model = setup.model(top)
    parent = build_feature_map(model, group.spec, top.features.p, top.features.param_seed,
                               include_head=top.features.include_head)
    weights_fp = setup.weights_fingerprint(top)
    out = []
    for p in group.p_values:
        fmap, columns, scale = parent.restrict(p, top.features.param_seed) if p < parent.p else (
            parent, np.arange(parent.p), 1.0)
        cell_cfg = seeded_config(cfg, group.spec, group.seed, varies, p)
        cell = CellKey(group.spec, group.seed, p, fmap.p,
                       run_fingerprint(cell_cfg, benchmark, fmap.fingerprint(), weights_fp))
        out.append((cell, fmap, columns, scale))
    return out, parent, model


def compute_group(cfg: Config, group: Group, varies: str, setup: ConfigSetup | None = None,
                  progress: bool = False) -> dict:
    """Every missing cell's K, K_e and ‖φ‖² for one group, from one feature pass at p_max.

    Returns {"group", "cells": [CellKey as dict], "computed": bool, "seconds"}."""
    import torch

    from entk_ray import kernels as kern
    from entk_ray.features import STORAGE_DTYPES, compute_features, iterate_batches
    from entk_ray.store import safe_name

    start = time.perf_counter()
    setup = setup or ConfigSetup()
    benchmark = setup.benchmark(cfg)
    evals = benchmark.eval_sets()
    cells, parent, model = group_cells(cfg, group, varies, benchmark, setup)
    missing = [(c, m, cols, s) for c, m, cols, s in cells
               if not all(_namespace(cfg, c.fingerprint).has(k) for k in _kernel_keys(evals))]
    info = {"group": group.name, "cells": [dataclasses.asdict(c) for c, *_ in cells], "computed": bool(missing)}
    if not missing:
        info["seconds"] = time.perf_counter() - start
        return info
    f = cfg.features
    computer = parent.computer(model, f.method, f.chunk_size)
    phi = compute_features(computer, benchmark.train, batch_size=f.batch_size, storage_dtype=f.storage_dtype,
                           num_workers=f.num_workers, progress=progress, desc=f"features {group.name} train")
    dtype = STORAGE_DTYPES[f.storage_dtype]

    def columns(rows: torch.Tensor, cols: np.ndarray, scale: float) -> torch.Tensor:
        picked = rows if len(cols) == rows.shape[1] else rows.index_select(1, torch.from_numpy(cols))
        return picked if scale == 1.0 else picked * scale

    train_cols = {}
    for cell, _, cols, scale in missing:
        train_cols[cell.name] = columns(phi, cols, scale)
        ns = _namespace(cfg, cell.fingerprint)
        ns.save_array("kernels/train", kern.train_kernel([train_cols[cell.name]]), meta={"split": "train"})
    del phi
    for name, dataset in evals.items():
        blocks = {cell.name: [] for cell, *_ in missing}
        norms = {cell.name: [] for cell, *_ in missing}
        for images in iterate_batches(dataset, None, max(f.batch_size, 64), f.num_workers):
            rows = computer(images).to(dtype)
            for cell, _, cols, scale in missing:
                picked = columns(rows, cols, scale)
                blocks[cell.name].append(kern.cross_kernel([picked], [train_cols[cell.name]]))
                norms[cell.name].append(kern.row_sq_norms(picked))
        for cell, *_ in missing:
            ns = _namespace(cfg, cell.fingerprint)
            ns.save_array(f"diagonals/{safe_name(name)}", np.concatenate(norms[cell.name]), meta={"split": name})
            ns.save_array(f"kernels/{safe_name(name)}", np.concatenate(blocks[cell.name]), meta={"split": name})
    info["seconds"] = time.perf_counter() - start
    info["feature_examples"] = len(benchmark.train) + sum(len(d) for d in evals.values())
    return info


# --------------------------------------------------------------------------------------------
# Cells: sweep, choices, correctness, span analysis
# --------------------------------------------------------------------------------------------
def solver_digest(cfg: Config) -> str:
    return digest({"solver": dataclasses.asdict(cfg.solver), "version": 1})


def solve_cell(cfg: Config, cell: dict, setup: ConfigSetup | None = None) -> dict:
    """The β sweep and the span analysis of one cell, from its stored kernels (cached)."""
    from entk_ray.solvers import SolverSettings, choose_converged, choose_early_stopping, make_problem, solve_sweep
    from entk_ray.span import predictions, run_span_analysis
    from entk_ray.store import safe_name

    ns = _namespace(cfg, cell["fingerprint"])
    key = f"ablation/cell-{solver_digest(cfg)}"
    if ns.has(key):
        return ns.load_json(key)
    start = time.perf_counter()
    benchmark = (setup or ConfigSetup()).benchmark(cfg)
    evals = benchmark.eval_sets()
    s = cfg.solver
    problem = make_problem(ns.load_array("kernels/train"), benchmark.train.labels,
                           {n: ns.load_array(f"kernels/{safe_name(n)}") for n in evals},
                           {n: ds.labels for n, ds in evals.items()}, benchmark.num_classes, targets=s.targets,
                           selection=s.selection, holdout_fraction=s.holdout_fraction, seed=s.seed)
    settings = SolverSettings.from_config(s)
    if settings.method != "spectral":
        settings = dataclasses.replace(settings, method="spectral")  # the span analysis needs the spectrum
    runs = solve_sweep(problem, settings)
    early, converged = choose_early_stopping(runs, problem.select_on), choose_converged(runs, problem.select_on)
    diagonals = {n: ns.load_array(f"diagonals/{safe_name(n)}") for n in evals}
    span, _ = run_span_analysis(problem, diagonals, early.r, early.step, momentum=s.momentum)
    correct = {}
    for label, choice in (("early", early), ("converged", converged)):
        preds = predictions(problem.spectrum, choice.r, choice.step, momentum=s.momentum)
        correct[label] = {n: (preds[n] == problem.eval_labels[n]).astype(int).tolist() for n in evals}
    result = {**cell, "early": dataclasses.asdict(early), "converged": dataclasses.asdict(converged),
              "correct": correct, "span": span, "seconds": time.perf_counter() - start}
    ns.save_json(key, result)
    return result


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------
def summarize(results: list[dict], eval_names: list[str], bootstrap: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> list[dict]:
    """One row per (map, p): per evaluation set and for early stopping / converged, the seed mean,
    the sample standard deviation over seeds, and a bootstrap interval of the seed mean
    (evaluation examples resampled with replacement, the same draw for every seed)."""
    rows = []
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["spec"], r["p"]), []).append(r)
    rng = np.random.default_rng(seed)
    for (spec, p), cells in groups.items():
        row = {"map": spec, "p": p, "p_actual": cells[0]["p_actual"], "seeds": len(cells)}
        for label in ("early", "converged"):
            for name in eval_names:
                acc = np.array([float(np.mean(c["correct"][label][name])) for c in cells])
                correct = np.array([c["correct"][label][name] for c in cells], dtype=np.float64)  # (seeds, m)
                lo = hi = None
                if bootstrap:
                    draws = rng.integers(0, correct.shape[1], size=(bootstrap, correct.shape[1]))
                    means = correct[:, draws].mean(axis=2).mean(axis=0)  # (bootstrap,)
                    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
                row[f"{label}:{name}"] = {"mean": float(acc.mean()),
                                          "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                                          "ci": [float(lo), float(hi)] if lo is not None else None,
                                          "per_seed": acc.tolist()}
        for name in eval_names:
            row[f"span:{name}"] = float(np.mean([c["span"]["analysis"]["sets"][name]["quantiles"]["median"]
                                                 for c in cells]))
            row[f"span_corr:{name}"] = _mean_or_none([c["span"]["analysis"]["sets"][name]["pearson"] for c in cells])
        row["effective_rank"] = float(np.mean([c["span"]["spectrum"]["participation_ratio"] for c in cells]))
        rows.append(row)
    order = {}
    rows.sort(key=lambda r: (order.setdefault(r["map"], len(order)), r["p"]))
    return rows


def _mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _label(name: str) -> str:
    return "ID" if name == "id_val" else "OOD " + name.removeprefix("ood:")


def format_table(rows: list[dict], eval_names: list[str], probe: dict | None) -> str:
    """Markdown: per (map, p) each set's ES and converged accuracy, mean ± std (bootstrap CI)."""
    def cell(v):
        text = f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}"
        if v["ci"]:
            text += f" [{100 * v['ci'][0]:.1f}, {100 * v['ci'][1]:.1f}]"
        return text

    head = ["map", "p", "seeds"]
    for name in eval_names:
        head += [f"{_label(name)} ES", f"{_label(name)} conv."]
    head += [f"median s {_label(n)}" for n in eval_names] + ["eff. rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if probe:
        cells = ["linear probe", "", ""]
        for name in eval_names:
            cells += [f"{100 * probe[name]:.1f}", ""]
        lines.append("| " + " | ".join(cells + [""] * (len(eval_names) + 1)) + " |")
    for r in rows:
        p = f"{r['p']:,}" + (f" ({r['p_actual']:,})" if r["p_actual"] != r["p"] else "")
        cells = [r["map"], p, str(r["seeds"])]
        for name in eval_names:
            cells += [cell(r[f"early:{name}"]), cell(r[f"converged:{name}"])]
        cells += [f"{r[f'span:{n}']:.3f}" for n in eval_names] + [f"{r['effective_rank']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy_vs_p(rows: list[dict], eval_names: list[str], probe: dict | None, path: Path) -> None:
    """One panel per evaluation set: accuracy (seed mean, ±std bars) against p, a line per map;
    solid early stopping, dashed converged, grey the linear probe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(eval_names), figsize=(6 * len(eval_names), 4.2), squeeze=False)
    maps = list(dict.fromkeys(r["map"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], eval_names):
        for i, spec in enumerate(maps):
            mine = [r for r in rows if r["map"] == spec]
            ps = [r["p_actual"] for r in mine]
            for label, style in (("early", "-o"), ("converged", "--s")):
                ax.errorbar(ps, [100 * r[f"{label}:{name}"]["mean"] for r in mine],
                            yerr=[100 * r[f"{label}:{name}"]["std"] for r in mine], fmt=style, capsize=3,
                            color=colors[i % len(colors)], alpha=1.0 if label == "early" else 0.6,
                            label=f"{spec} ({'ES' if label == 'early' else 'conv.'})")
        if probe:
            ax.axhline(100 * probe[name], color="grey", ls=":", label="linear probe")
        ax.set(xscale="log", xlabel="p (feature dimension)", ylabel="accuracy (%)", title=_label(name))
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def linear_probe_reference(cfg: Config, setup: ConfigSetup | None = None) -> dict:
    """The linear probe on the run's splits (cached with the embeddings' fingerprint)."""
    from entk_ray.baselines import linear_probe
    from entk_ray.features import compute_embeddings

    setup = setup or ConfigSetup()
    benchmark = setup.benchmark(cfg)
    fingerprint = digest({"probe": 1, "weights": setup.weights_fingerprint(cfg),
                          "model": cfg.model.name, "data": benchmark.manifest_hash(),
                          "probe_cfg": dataclasses.asdict(cfg.probe)})
    ns = _namespace(cfg, fingerprint)
    if ns.has("ablation/probe"):
        return ns.load_json("ablation/probe")
    model = setup.model(cfg)
    evals = benchmark.eval_sets()
    emb = {name: compute_embeddings(model, ds, batch_size=64).numpy()
           for name, ds in {"train": benchmark.train, **evals}.items()}
    probe = linear_probe(emb["train"], benchmark.train.labels, {n: (emb[n], ds.labels) for n, ds in evals.items()},
                         "id_val", cfg.probe.c_grid, cfg.probe.max_iter)
    result = {"C": probe.c, **probe.accuracy}
    ns.save_json("ablation/probe", result)
    return result


@dataclass
class AblationResult:
    rows: list[dict]
    cells: list[dict]
    groups: list[dict]
    probe: dict
    eval_names: list[str]
    wall_s: float
    paths: dict[str, Path]


def plan_groups(grid: AblationGrid) -> list[Group]:
    return [Group(spec, seed, grid.p_values(spec)) for spec in grid.maps for seed in grid.seeds]


def run_local(cfg: Config, groups: list[Group], varies: str, logger: Callable[[str], None],
              setup: ConfigSetup | None = None) -> tuple[list, list]:
    group_infos, cells = [], []
    for group in groups:
        info = compute_group(cfg, group, varies, setup)
        logger(f"{group.name}: kernels {'computed' if info['computed'] else 'reused'} in {info['seconds']:.1f}s")
        group_infos.append(info)
        for cell in info["cells"]:
            result = solve_cell(cfg, cell, setup)
            cells.append(result)
            logger(f"  {cell['spec']} p={cell['p']} seed={cell['seed']}: ID {100 * result['early']['accuracy']['id_val']:.1f}%")
    return group_infos, cells


def run_ablation(grid: AblationGrid, logger: Callable[[str], None] = print,
                 setup: ConfigSetup | None = None) -> AblationResult:
    """Run (or reload) every cell of the grid and write the table, JSON, CSV and figures."""
    grid.validate()
    start = time.perf_counter()
    cfg = grid.config()
    setup = setup or ConfigSetup()
    eval_names = list(setup.benchmark(cfg).eval_sets())
    groups = plan_groups(grid)
    logger(f"ablation: {len(groups)} feature passes (map × seed), "
           f"{sum(len(g.p_values) for g in groups)} cells, into {grid.out_dir}")
    if grid.use_ray:
        from entk_ray.distributed.ablation import run_on_ray

        group_infos, cells, probe = run_on_ray(cfg, groups, grid.seed_varies, logger, setup)
    else:
        probe = linear_probe_reference(cfg, setup)
        group_infos, cells = run_local(cfg, groups, grid.seed_varies, logger, setup)
    cells.sort(key=lambda c: (grid.maps.index(c["spec"]), c["p"], grid.seeds.index(c["seed"])))
    rows = summarize(cells, eval_names, grid.bootstrap, grid.confidence)
    wall = time.perf_counter() - start
    out = Path(grid.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, eval_names, probe)
    paths = {"table": out / "ablation.md", "json": out / "ablation.json", "csv": out / "ablation.csv",
             "figure": out / "acc_vs_p.png"}
    paths["table"].write_text(table + "\n")
    slim_cells = [{k: v for k, v in c.items() if k != "correct"} for c in cells]
    paths["json"].write_text(json.dumps({"grid": dataclasses.asdict(grid), "rows": rows, "probe": probe,
                                         "groups": group_infos, "cells": slim_cells, "wall_s": wall,
                                         "eval_sets": eval_names}, indent=2, default=float))
    _write_csv(paths["csv"], rows, eval_names)
    plot_accuracy_vs_p(rows, eval_names, probe, paths["figure"])
    logger(table)
    logger(f"wall time {wall:.1f}s; {sum(1 for g in group_infos if g['computed'])} of {len(group_infos)} "
           f"feature passes computed, the rest reused")
    return AblationResult(rows, cells, group_infos, probe, eval_names, wall, paths)


def _write_csv(path: Path, rows: list[dict], eval_names: list[str]) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["map", "p", "p_actual", "seeds"]
        for label in ("early", "converged"):
            for name in eval_names:
                header += [f"{label}_{name}_mean", f"{label}_{name}_std", f"{label}_{name}_ci_lo", f"{label}_{name}_ci_hi"]
        header += [f"median_span_{n}" for n in eval_names] + ["effective_rank"]
        writer.writerow(header)
        for r in rows:
            line = [r["map"], r["p"], r["p_actual"], r["seeds"]]
            for label in ("early", "converged"):
                for name in eval_names:
                    v = r[f"{label}:{name}"]
                    line += [v["mean"], v["std"], *(v["ci"] or [None, None])]
            line += [r[f"span:{n}"] for n in eval_names] + [r["effective_rank"]]
            writer.writerow(line)


# --------------------------------------------------------------------------------------------
# Command line (scripts/ablate.py)
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    """``python scripts/ablate.py --grid grids/digits.yaml [--out DIR] [--no-ray] [--address ADDR]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Feature maps × p × seeds on one benchmark (entk_ray.ablation).")
    parser.add_argument("--grid", required=True, help="grid YAML (maps, p, seeds, base config; see grids/)")
    parser.add_argument("--out", help="output folder (default: the grid's out_dir)")
    parser.add_argument("--no-ray", action="store_true", help="run every cell in this process, one after another")
    parser.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
    parser.add_argument("--maps", help="comma-separated feature maps, replacing the grid's")
    parser.add_argument("--p", help="comma-separated p values, replacing the grid's")
    parser.add_argument("--seeds", help="comma-separated seeds, replacing the grid's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        grid = AblationGrid.from_yaml(args.grid)
        if args.out:
            grid.out_dir = args.out
        if args.no_ray:
            grid.use_ray = False
        if args.address:
            grid.base = deep_merged(grid.base or {}, {"ray": {"address": args.address}})
        if args.maps:
            grid.maps = [m.strip() for m in args.maps.split(",") if m.strip()]
            grid.p_by_map = {k: v for k, v in grid.p_by_map.items() if k in grid.maps}
        if args.p:
            grid.p = [int(v) for v in args.p.split(",")]
        if args.seeds:
            grid.seeds = [int(v) for v in args.seeds.split(",")]
        grid.validate()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    run_ablation(grid)
    return 0
