"""Report files for the trained baselines: per-epoch histories and accuracy against training progress.

``training.csv`` has one line per (method, learning rate, epoch) with every evaluation set's
accuracy, so any learning rate's curve can be redrawn. ``accuracy_vs_progress.png`` has one panel
per evaluation set (ID, then each OOD set) and one curve per method: the eNTK at its chosen β along
the solver path (progress = step / last recorded step), each trained baseline at its chosen learning
rate along its epochs (progress = epoch / epochs, 0 = initialization), and the linear probe as a
flat line (it has no training path here). A dot marks each method's selected point (early stopping).
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from entk_ray.solvers import SolverRun



def _label(name: str) -> str:
    return {"id_val": "ID"}.get(name, name.replace("ood:", "OOD "))


def write_training_csv(path: str | Path, baselines: dict) -> Path:
    """Every trial's history: method, lr, epoch, step, learning rate now, loss, accuracies."""
    path = Path(path)
    sets = []
    for result in baselines.values():
        for trial in result.trials:
            for name in trial.history[0]["accuracy"]:
                if name not in sets:
                    sets.append(name)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["method", "lr", "epoch", "step", "lr_now", "train_loss", *sets, "seconds", "examples_per_s",
                         "chosen"])
        for result in baselines.values():
            chosen = result.chosen
            best = chosen.best(result.select_on)["epoch"]
            for trial in result.trials:
                for rec in trial.history:
                    writer.writerow([result.method, trial.lr, rec["epoch"], rec["step"], rec["lr"], rec["train_loss"],
                                     *(rec["accuracy"].get(n, "") for n in sets), rec["seconds"],
                                     rec["examples_per_s"], trial is chosen and rec["epoch"] == best])
    return path


def plot_accuracy_vs_progress(path: str | Path, baselines: dict, runs: Sequence[SolverRun] = (),
                              entk_r: float | None = None, entk_step: int | None = None,
                              probe_accuracy: dict[str, float] | None = None) -> Path:
    """The figure described in the module docstring; ``entk_r``/``entk_step`` are the chosen β's r and
    early-stopping step, ``probe_accuracy`` the probe's accuracy per evaluation set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from entk_ray.finetune import METHOD_NAMES

    sets = list(next(iter(baselines.values())).trials[0].history[0]["accuracy"]) if baselines else []
    sets = [name for name in sets if name != "holdout"]
    run = min(runs, key=lambda run: abs(math.log(run.r / entk_r))) if runs and entk_r else None
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes[0], sets):
        color = iter(colors)
        if run is not None and name in run.accuracy:
            c = next(color)
            steps = np.asarray(run.steps, dtype=float)
            x = steps / steps[-1]
            ax.plot(x, 100 * np.asarray(run.accuracy[name]), color=c, label=f"eNTK (r = {run.r:.3g})")
            if entk_step is not None and entk_step in list(run.steps):
                i = list(run.steps).index(entk_step)
                ax.plot([x[i]], [100 * run.accuracy[name][i]], "o", color=c)
        if probe_accuracy and name in probe_accuracy:
            ax.axhline(100 * probe_accuracy[name], color=next(color), ls=":", label="Linear probing")
        for method, result in baselines.items():
            c = next(color)
            trial = result.chosen
            epochs = trial.history[-1]["epoch"] or 1
            x = [rec["epoch"] / epochs for rec in trial.history]
            y = [100 * rec["accuracy"][name] for rec in trial.history]
            ax.plot(x, y, marker=".", color=c, label=f"{METHOD_NAMES[method]} (lr = {trial.lr:g})")
            best = trial.best(result.select_on)
            ax.plot([best["epoch"] / epochs], [100 * best["accuracy"][name]], "o", color=c)
        ax.set_xlabel("training progress (eNTK: step / last step; trained: epoch / epochs)", fontsize=8)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{_label(name)} accuracy during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_training(out_dir: str | Path, baselines: dict, runs: Sequence[SolverRun] = (), rows: Sequence[dict] = (),
                   probe_accuracy: dict[str, float] | None = None) -> dict[str, Path]:
    """Both files into ``out_dir``; the eNTK's chosen r and step come from its measured early-stopping row."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    early = next((row for row in rows if row["method"] == "eNTK (early stopping)"
                  and row.get("source", "measured") == "measured"), None)
    paths = {"training.csv": write_training_csv(out / "training.csv", baselines)}
    paths["accuracy_vs_progress.png"] = plot_accuracy_vs_progress(
        out / "accuracy_vs_progress.png", baselines, runs, early["r"] if early else None,
        early["step"] if early else None, probe_accuracy)
    return paths
