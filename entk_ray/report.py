"""Results: the write-up's table (Markdown/CSV/JSON) and its two figures.

Rows are methods (linear probing, eNTK early stopping, eNTK converged, plus any reference rows);
columns are ID accuracy and one OOD accuracy per OOD set, with the chosen hyper-parameters.
Accuracies are stored as fractions and printed as percentages.
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
from entk_ray.solvers import SolverRun

# Living-17 rows as reported in the research write-up (ID %, OOD %); Kumar et al. for the first three.
LIVING17_REFERENCE = [
    {"method": "Scratch", "id_acc": 0.924, "ood_acc": 0.582, "source": "Kumar et al. 2022 (reported)"},
    {"method": "Linear probing", "id_acc": 0.965, "ood_acc": 0.822, "source": "Kumar et al. 2022 (reported)"},
    {"method": "Fine-tuning", "id_acc": 0.971, "ood_acc": 0.777, "source": "Kumar et al. 2022 (reported)"},
    {"method": "eNTK (early stopping)", "id_acc": 0.974, "ood_acc": 0.812, "source": "write-up (reported)"},
    {"method": "eNTK (converged)", "id_acc": 0.971, "ood_acc": 0.813, "source": "write-up (reported)"},
]


def ood_names(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for name in row.get("ood", {}):
            if name not in names:
                names.append(name)
    return names


def _pct(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table_columns(rows: Sequence[dict]) -> list[str]:
    oods = ood_names(rows)
    ood_cols = ["OOD"] if len(oods) <= 1 else [f"OOD {n}" for n in oods]
    return ["Method", "ID", *ood_cols, "r", "β", "step", "C", "source"]


def table_cells(row: dict, oods: list[str]) -> list[str]:
    ood_cells = [_pct(row.get("ood", {}).get(n, row.get("ood_acc") if len(oods) <= 1 else None)) for n in oods] \
        if oods else [_pct(row.get("ood_acc"))]
    return [row["method"], _pct(row.get("id_acc")), *ood_cells, _num(row.get("r")), _num(row.get("beta")),
            _num(row.get("step")), _num(row.get("C")), row.get("source", "measured")]


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table; reference rows are marked by their ``source``."""
    oods = ood_names(rows)
    header = table_columns(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(table_cells(row, oods)) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, rows: Sequence[dict], runs: Sequence[SolverRun], select_on: str,
                  id_name: str, extra: dict | None = None) -> dict[str, Path]:
    """Write results.json, results.csv, results.md, the sweep points and both figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "results.csv", "results.md", "sweep.csv",
                                            "accuracy_vs_step.png", "accuracy_vs_beta.png")}
    points = [p for run in runs for p in run.to_records()]
    # The run config may carry storage credentials: never written (entk_ray.redaction).
    payload = redact({"rows": list(rows), "select_on": select_on, "sweep_points": points, **(extra or {})})
    paths["results.json"].write_text(json.dumps(payload, indent=2, default=_json_default))
    with open(paths["results.csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        oods = ood_names(rows)
        ood_header = [f"ood_acc:{n}" for n in oods] or ["ood_acc"]
        writer.writerow(["method", "id_acc", *ood_header, "r", "beta", "step", "C", "converged", "source"])
        for row in rows:
            ood_vals = [row.get("ood", {}).get(n, "") for n in oods] or [row.get("ood_acc", "")]
            writer.writerow([row["method"], row.get("id_acc", ""), *ood_vals, row.get("r", ""), row.get("beta", ""),
                             row.get("step", ""), row.get("C", ""), row.get("converged", ""),
                             row.get("source", "measured")])
    paths["results.md"].write_text(format_table(rows) + "\n")
    if points:
        with open(paths["sweep.csv"], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(points[0]))
            writer.writeheader()
            writer.writerows(points)
    chosen = next((row for row in rows if row["method"] == "eNTK (early stopping)"
                   and row.get("source", "measured") == "measured"), None)
    if runs and chosen is not None:
        plot_accuracy_vs_step(runs, chosen["r"], paths["accuracy_vs_step.png"])
        plot_accuracy_vs_beta(runs, select_on, paths["accuracy_vs_beta.png"])
    return paths


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _label(name: str) -> str:
    return {"id_val": "ID"}.get(name, name.replace("ood:", "OOD "))


def plot_accuracy_vs_step(runs: Sequence[SolverRun], r: float, path: Path) -> None:
    """Accuracy of every evaluation set along the solver path at the chosen β."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = min(runs, key=lambda run: abs(math.log(run.r / r)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, acc in run.accuracy.items():
        ax.plot(run.steps, 100 * acc, label=_label(name))
    ax.set_xlabel("solver step (NAG)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy during training at β = {run.beta:.3g} (r = {run.r:.3g})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_beta(runs: Sequence[SolverRun], select_on: str, path: Path) -> None:
    """Early-stopped and converged accuracy of every evaluation set across regularization strengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(runs, key=lambda run: run.beta)
    betas = [run.beta for run in ordered]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ordered[0].accuracy:
        early = [100 * run.accuracy[name][run.best_index(select_on)] for run in ordered]
        final = [100 * run.accuracy[name][-1] for run in ordered]
        line, = ax.plot(betas, early, marker="o", ms=3, label=f"{_label(name)} (early stopping)")
        ax.plot(betas, final, ls="--", color=line.get_color(), label=f"{_label(name)} (converged)")
    ax.set_xscale("log")
    ax.set_xlabel("L2 regularization strength β")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy across regularization strengths")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
