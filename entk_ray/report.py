"""Results: the write-up's table (Markdown/CSV/JSON), its two figures, and the run's context.

Rows are methods (linear probing, eNTK early stopping, eNTK converged, plus any reference rows);
columns are ID accuracy and one OOD accuracy per OOD set, each with a 95 % bootstrap interval
(:func:`bootstrap_interval`: resample the evaluation examples), and the chosen hyper-parameters.
Accuracies are stored as fractions and printed as percentages. ``results.md`` opens with a title
and the run's context (command, commit, versions, hardware, data, selection, search, timings).
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from entk_ray.redaction import redact
from entk_ray.solvers import TIE_BREAK, SolverRun

# Living-17 rows as reported in the research write-up (ID %, OOD %); Kumar et al. for the first three.
LIVING17_REFERENCE = [
    {"method": "Scratch", "id_acc": 0.924, "ood_acc": 0.582, "source": "Kumar et al. 2022 (reported)"},
    {"method": "Linear probing", "id_acc": 0.965, "ood_acc": 0.822, "source": "Kumar et al. 2022 (reported)"},
    {"method": "Fine-tuning", "id_acc": 0.971, "ood_acc": 0.777, "source": "Kumar et al. 2022 (reported)"},
    {"method": "eNTK (early stopping)", "id_acc": 0.974, "ood_acc": 0.812, "source": "write-up (reported)"},
    {"method": "eNTK (converged)", "id_acc": 0.971, "ood_acc": 0.813, "source": "write-up (reported)"},
]

CONFIDENCE = 0.95

BENCHMARK_TITLES = {
    "digits": "digits shift (ID: MNIST, OOD: UCI optdigits)",
    "living17": "BREEDS Living-17 (ImageNet)",
    "entity13": "BREEDS Entity-13 (ImageNet)",
    "entity30": "BREEDS Entity-30 (ImageNet)",
    "nonliving26": "BREEDS Nonliving-26 (ImageNet)",
    "image_folder": "image folders",
}


# --------------------------------------------------------------------------------------------
# Bootstrap intervals
# --------------------------------------------------------------------------------------------
def bootstrap_interval(correct: np.ndarray, resamples: int, seed: int,
                       level: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy: resample the evaluation examples (with
    replacement, ``resamples`` times, generator seeded by ``seed``) and take the (1 ± level)/2
    quantiles of the resampled accuracies. The same seed draws the same resamples for every
    method on a set of the same size, so intervals of different rows are paired."""
    from scipy.stats import bootstrap

    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 1 or correct.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array of 0/1, got shape {correct.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples}")
    result = bootstrap((correct,), np.mean, n_resamples=int(resamples), confidence_level=level,
                       method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def add_intervals(row: dict, correct: dict[str, np.ndarray], id_name: str, resamples: int, seed: int,
                  tolerance_examples: int = 0) -> dict:
    """Put ``id_ci`` and ``ood_ci`` (per OOD set) into a table row from per-example correctness
    (evaluation-set name → bool array). Checks that the row's accuracies are those means, up to
    ``tolerance_examples`` examples (predictions recomputed in another process may flip a near-tie
    by round-off)."""
    for name, values in correct.items():
        recorded = row["id_acc"] if name == id_name else row.get("ood", {}).get(name.removeprefix("ood:"))
        slack = tolerance_examples / len(values) + 1e-12
        if recorded is not None and not math.isclose(float(np.mean(values)), recorded, abs_tol=slack):
            raise ValueError(f"{row['method']}: per-example predictions on {name} give accuracy "
                             f"{np.mean(values):.6f}, the table says {recorded:.6f}")
    if id_name in correct:
        row["id_ci"] = list(bootstrap_interval(correct[id_name], resamples, seed))
    oods = {name.removeprefix("ood:"): values for name, values in correct.items() if name.startswith("ood:")}
    if oods:
        row["ood_ci"] = {name: list(bootstrap_interval(values, resamples, seed)) for name, values in oods.items()}
        row["ood_acc_ci"] = next(iter(row["ood_ci"].values()))
    return row


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
def ood_names(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row.get("ood", {}):
            if name not in names:
                names.append(name)
    return names


def _pct(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _interval(value: Any) -> str:
    return "" if not value else f"{100 * value[0]:.1f}–{100 * value[1]:.1f}%"


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


#: Hyper-parameter columns of trained baselines (entk_ray.finetune), shown only when a row has them.
TRAINING_COLUMNS = {"lr": "lr", "epoch": "epoch"}


def training_keys(rows: Sequence[dict]) -> list[str]:
    return [key for key in TRAINING_COLUMNS if any(key in row for row in rows)]


def _has_intervals(rows: Sequence[dict]) -> bool:
    return any(row.get("id_ci") or row.get("ood_ci") for row in rows)


def _ood_value(row: dict, name: str, single: bool) -> Any:
    return row.get("ood", {}).get(name, row.get("ood_acc") if single else None)


def _ood_interval(row: dict, name: str, single: bool) -> Any:
    return row.get("ood_ci", {}).get(name, row.get("ood_acc_ci") if single else None)


def table_columns(rows: Sequence[dict]) -> list[str]:
    oods = ood_names(rows)
    ci = f" {100 * CONFIDENCE:.0f}% CI"
    ood_cols = ["OOD"] if len(oods) <= 1 else [f"OOD {n}" for n in oods]
    training = [TRAINING_COLUMNS[k] for k in training_keys(rows)]
    if _has_intervals(rows):
        return ["Method", "ID", f"ID{ci}", *[c for col in ood_cols for c in (col, col + ci)],
                "r", "β", "step", "C", *training, "source"]
    return ["Method", "ID", *ood_cols, "r", "β", "step", "C", *training, "source"]


def table_cells(row: dict, oods: list[str], intervals: bool = False, training: Sequence[str] = ()) -> list[str]:
    single = len(oods) <= 1
    names = oods or [None]
    ood_cells = []
    for name in names:
        ood_cells.append(_pct(_ood_value(row, name, single) if name else row.get("ood_acc")))
        if intervals:
            ood_cells.append(_interval(_ood_interval(row, name, single) if name else row.get("ood_acc_ci")))
    id_cells = [_pct(row.get("id_acc"))] + ([_interval(row.get("id_ci"))] if intervals else [])
    return [row["method"], *id_cells, *ood_cells, _num(row.get("r")), _num(row.get("beta")),
            _num(row.get("step")), _num(row.get("C")), *(_num(row.get(k)) for k in training),
            row.get("source", "measured")]


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table; reference rows are marked by their ``source``."""
    oods = ood_names(rows)
    header = table_columns(rows)
    intervals = _has_intervals(rows)
    training = training_keys(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(table_cells(row, oods, intervals, training)) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# results.md: title, context, table, notes
# --------------------------------------------------------------------------------------------
def format_markdown(rows: Sequence[dict], payload: dict) -> str:
    """``results.md``: a title, the run's context (whatever of it ``payload`` holds), the table and
    the notes on selection, ties and intervals."""
    benchmark = payload.get("benchmark")
    title = BENCHMARK_TITLES.get(str(benchmark), str(benchmark)) if benchmark else "a run"
    lines = [f"# eNTK vs linear probing on {title}", ""]
    context = payload.get("context") or {}
    cfg = payload.get("config") or {}
    model, features = cfg.get("model", {}), cfg.get("features", {})
    facts = []
    if context.get("timestamp"):
        facts.append(("Run", f"{context['timestamp']} (UTC), backend {payload.get('backend', '?')}"))
    if context.get("command"):
        facts.append(("Command", f"`{context['command']}`"))
    git = context.get("git")
    if context:
        facts.append(("Code", f"commit {git['commit'][:12]}{' (uncommitted changes)' if git['dirty'] else ''}"
                      if git else "not a git checkout"))
    if model:
        weights = model.get("weights") or "default weights"
        facts.append(("Model", f"{model.get('name')} ({weights}, sha256 {payload.get('weights_fingerprint', '?')}), "
                      f"scalar head seed {model.get('head_seed')}"))
    if features:
        facts.append(("Features", f"φ(x) = ∂f(x)/∂θ_S over p = {payload.get('p', features.get('p')):,} parameters, "
                      f"S seed {features.get('param_seed')}, fingerprint {payload.get('subset_fingerprint', '?')}"))
    if payload.get("split_sizes"):
        sizes = ", ".join(f"{k} {v:,}" for k, v in payload["split_sizes"].items())
        facts.append(("Data", f"{sizes}; preprocessing {payload.get('preprocessing', '?')}"))
    select_on = payload.get("select_on")
    if select_on:
        facts.append(("Selection set", f"{_set_label(select_on)}: β, the step and C are chosen on it; "
                      f"ties go to the {TIE_BREAK}"))
    search = payload.get("search")
    if search:
        facts.append(("β search", search["message"]))
    if payload.get("fingerprint"):
        facts.append(("Run fingerprint", f"{payload['fingerprint']} (weights, S, data, transform, dtype)"))
    versions = context.get("versions")
    if versions:
        facts.append(("Versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)))
    hw = context.get("hardware")
    if hw:
        gpus = ", ".join(g["name"] for g in hw.get("gpus", [])) or "no GPU"
        facts.append(("Driver hardware", f"{hw.get('cpu_model')}, {hw.get('cpus_usable')} of {hw.get('cpu_count')} "
                      f"CPUs; {gpus}"))
    timings = payload.get("timings")
    if timings:
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in timings.items()
                           if k.endswith("_s") and k != "examples_per_s")
        rate = timings.get("examples_per_s")
        facts.append(("Timings", stages + (f" ({rate:.1f} examples/s in features)" if rate else "")))
    lines += [f"- **{key}**: {value}" for key, value in facts]
    lines += ["", format_table(rows), ""]
    notes = []
    bootstrap = payload.get("bootstrap")
    if bootstrap and bootstrap.get("resamples"):
        notes.append(f"CI: {100 * CONFIDENCE:.0f}% percentile bootstrap interval over the evaluation examples "
                     f"({bootstrap['resamples']} resamples, seed {bootstrap['seed']}; the same resamples for "
                     "every method).")
    for row in rows:
        if row.get("source", "measured") == "measured" and row.get("tied", 1) > 1:
            what = "values of C" if "C" in row else "(β, step) points" if "early" in row["method"] else "values of β"
            notes.append(f"{row['method']}: {row['tied']} {what} tied on selection accuracy; the {TIE_BREAK} "
                         "chose the one shown.")
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def write_results(out_dir: str | Path, rows: Sequence[dict], runs: Sequence[SolverRun], select_on: str,
                  id_name: str, extra: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.csv, results.md, the sweep points and both figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "results.csv", "results.md", "sweep.csv",
                                            "accuracy_vs_step.png", "accuracy_vs_beta.png")}
    points = [p for run in runs for p in run.to_records()]
    # The run config may carry storage credentials: never written (entk_ray.redaction).
    payload = redact({"rows": list(rows), "select_on": select_on, **(extra or {}), "sweep_points": points})
    paths["results.json"].write_text(json.dumps(payload, indent=2, default=_json_default))
    _write_csv(paths["results.csv"], rows)
    paths["results.md"].write_text(format_markdown(rows, payload))
    if points:
        fields = list(dict.fromkeys(key for p in points for key in p))
        with open(paths["sweep.csv"], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(points)
    measured = [row for row in rows if row.get("source", "measured") == "measured"]
    early = next((row for row in measured if row["method"] == "eNTK (early stopping)"), None)
    converged = next((row for row in measured if row["method"] == "eNTK (converged)"), None)
    probe = next((row for row in measured if row["method"] == "Linear probing"), None)
    if runs and early is not None:
        plot_accuracy_vs_step(runs, early, paths["accuracy_vs_step.png"], select_on=select_on, id_name=id_name,
                              probe=probe)
        plot_accuracy_vs_beta(runs, select_on, paths["accuracy_vs_beta.png"], id_name=id_name, early=early,
                              converged=converged, probe=probe)
    return paths


def _write_csv(path: Path, rows: Sequence[dict]) -> None:
    oods = ood_names(rows)
    single = len(oods) <= 1
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        ood_header = [h for n in oods for h in (f"ood_acc:{n}", f"ood_ci_low:{n}", f"ood_ci_high:{n}")] \
            or ["ood_acc", "ood_ci_low", "ood_ci_high"]
        training = training_keys(rows)
        writer.writerow(["method", "id_acc", "id_ci_low", "id_ci_high", *ood_header, "r", "beta", "step", "C",
                         "converged", "tied", *training, "source"])
        for row in rows:
            id_ci = row.get("id_ci") or ("", "")
            ood_vals = []
            for name in oods or [None]:
                value = _ood_value(row, name, single) if name else row.get("ood_acc")
                ci = (_ood_interval(row, name, single) if name else row.get("ood_acc_ci")) or ("", "")
                ood_vals += ["" if value is None else value, *ci]
            writer.writerow([row["method"], row.get("id_acc", ""), *id_ci, *ood_vals, row.get("r", ""),
                             row.get("beta", ""), row.get("step", ""), row.get("C", ""), row.get("converged", ""),
                             row.get("tied", ""), *(row.get(k, "") for k in training), row.get("source", "measured")])


def _json_default(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def _set_label(name: str, select_on: str | None = None) -> str:
    """``id_val`` → "ID val", ``ood:x`` → "OOD x"; the selection set says so."""
    label = {"id_val": "ID val", "holdout": "train holdout"}.get(name) or name.replace("ood:", "OOD ")
    return f"{label} (selection set)" if name == select_on else label


def _probe_accuracy(probe: dict | None, name: str, id_name: str) -> float | None:
    if probe is None:
        return None
    if name == id_name:
        return probe.get("id_acc")
    return probe.get("ood", {}).get(name.removeprefix("ood:")) if name.startswith("ood:") else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _probe_lines(ax, names: Sequence[str], colors: dict, probe: dict | None, id_name: str) -> None:
    """The linear probe's accuracy on each set as a dotted horizontal reference line."""
    for name in names:
        value = _probe_accuracy(probe, name, id_name)
        if value is not None:
            ax.axhline(100 * value, color=colors[name], ls=":", lw=1.2,
                       label=f"linear probe, {_set_label(name)} (C = {probe.get('C', float('nan')):.3g})")


def plot_accuracy_vs_step(runs: Sequence[SolverRun], chosen: dict, path: Path, *, select_on: str = "id_val",
                          id_name: str = "id_val", probe: dict | None = None) -> None:
    """Accuracy of every evaluation set along the solver path at the chosen β, the chosen step
    marked, the linear probe as reference lines."""
    plt = _pyplot()
    run = min(runs, key=lambda run: abs(math.log(run.r / chosen["r"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for name, acc in run.accuracy.items():
        line, = ax.plot(run.steps, 100 * acc, lw=1.6, label=f"eNTK, {_set_label(name, select_on)}")
        colors[name] = line.get_color()
    _probe_lines(ax, list(run.accuracy), colors, probe, id_name)
    ax.axvline(chosen["step"], color="black", ls="--", lw=1, label=f"chosen step {chosen['step']} (early stopping)")
    for name, acc in run.accuracy.items():
        index = int(np.searchsorted(run.steps, chosen["step"]))
        if index < len(run.steps) and run.steps[index] == chosen["step"]:
            ax.plot([chosen["step"]], [100 * acc[index]], "o", color=colors[name], ms=5)
    ax.set_xlabel("solver step (NAG)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy during training at the chosen β = {run.beta:.3g} (r = {run.r:.3g})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_beta(runs: Sequence[SolverRun], select_on: str, path: Path, *, id_name: str = "id_val",
                          early: dict | None = None, converged: dict | None = None,
                          probe: dict | None = None) -> None:
    """Accuracy of every evaluation set across regularization strengths, in two panels so that
    neither hides the other: early-stopped (each β at its best selection step) and converged
    (each β's final iterate); the chosen β of each marked, the linear probe as reference lines,
    r = β·n/tr(K) on the top axis."""
    plt = _pyplot()
    ordered = sorted(runs, key=lambda run: run.beta)
    betas = np.array([run.beta for run in ordered])
    names = list(ordered[0].accuracy)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panels = [(axes[0], "early stopping: best selection step per β", lambda run: run.best_index(select_on), early),
              (axes[1], "converged: final iterate per β", lambda run: len(run.steps) - 1, converged)]
    ratio = ordered[0].beta / ordered[0].r  # β / r = tr(K)/n, the same for every run
    for ax, title, index_of, chosen in panels:
        colors = {}
        for name in names:
            values = [100 * run.accuracy[name][index_of(run)] for run in ordered]
            line, = ax.plot(betas, values, marker="o", ms=3, lw=1.4, label=f"eNTK, {_set_label(name, select_on)}")
            colors[name] = line.get_color()
        _probe_lines(ax, names, colors, probe, id_name)
        if chosen is not None:
            ax.axvline(chosen["beta"], color="black", ls="--", lw=1,
                       label=f"chosen β = {chosen['beta']:.3g}" + (f", step {chosen['step']}" if chosen is early else ""))
        ax.set_xscale("log")
        ax.set_xlabel("L2 regularization strength β")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda b: b / ratio, lambda r: r * ratio))
        top.set_xlabel("r = β·n/tr(K)", fontsize=8)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
