"""The results table and files: what a reader sees, from rows and solver paths."""
import csv
import json

import numpy as np

from entk_ray.report import LIVING17_REFERENCE, format_table, ood_names, write_results
from entk_ray.solvers import SolverRun


def run(r, beta, accs, round_=0, converged=False):
    steps = np.arange(1, len(accs["id_val"]) + 1) * 10
    return SolverRun(r=r, beta=beta, steps=steps, accuracy={k: np.asarray(v) for k, v in accs.items()},
                     grad_norm=np.linspace(1.0, 0.1, len(steps)), converged=converged, final_step=int(steps[-1]),
                     round=round_)


ROWS = [
    {"method": "Linear probing", "id_acc": 0.838, "ood_acc": 0.608, "ood": {"optdigits": 0.608}, "C": 10.0,
     "source": "measured"},
    {"method": "eNTK (early stopping)", "id_acc": 0.904, "ood_acc": 0.7, "ood": {"optdigits": 0.7}, "r": 1e-6,
     "beta": 0.00287, "step": 220, "converged": None, "source": "measured"},
]


def test_table_prints_percentages_hyperparameters_and_sources():
    table = format_table(LIVING17_REFERENCE[:1] + ROWS)
    lines = table.splitlines()
    assert lines[0] == "| Method | ID | OOD | r | β | step | C | source |"
    assert len(lines) == 2 + 3
    assert "| Scratch | 92.4% | 58.2% |" in lines[2] and lines[2].endswith("| Kumar et al. 2022 (reported) |")
    assert lines[3].startswith("| Linear probing | 83.8% | 60.8% |") and "| 10 |" in lines[3]
    assert "| eNTK (early stopping) | 90.4% | 70.0% | 1e-06 | 0.00287 | 220 |" in lines[4]


def test_one_column_per_ood_set_when_there_are_several():
    rows = [{"method": "eNTK", "id_acc": 0.9, "ood": {"sketch": 0.5, "photo": 0.25}, "source": "measured"}]
    assert ood_names(rows) == ["sketch", "photo"]
    header, _, line = format_table(rows).splitlines()
    assert header.startswith("| Method | ID | OOD sketch | OOD photo |")
    assert line.startswith("| eNTK | 90.0% | 50.0% | 25.0% |")


def test_write_results_writes_every_point_and_both_figures(tmp_path):
    runs = [run(1e-3, 0.01, {"id_val": [0.5, 0.8, 0.7], "ood:optdigits": [0.4, 0.6, 0.65]}),
            run(1e-1, 1.0, {"id_val": [0.6, 0.7], "ood:optdigits": [0.5, 0.55]}, round_=1, converged=True)]
    rows = [dict(ROWS[1], r=1e-3, beta=0.01, step=20)]
    paths = write_results(tmp_path, rows, runs, "id_val", "id_val", extra={"benchmark": "digits"})

    payload = json.loads(paths["results.json"].read_text())
    assert payload["rows"] == rows and payload["benchmark"] == "digits" and payload["select_on"] == "id_val"
    assert len(payload["sweep_points"]) == 3 + 2
    with open(paths["sweep.csv"]) as fh:
        points = list(csv.DictReader(fh))
    assert [(float(p["r"]), int(p["step"]), float(p["id_val"])) for p in points][:3] == \
        [(1e-3, 10, 0.5), (1e-3, 20, 0.8), (1e-3, 30, 0.7)]
    assert {p["round"] for p in points} == {"0", "1"}
    with open(paths["results.csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert table[0]["method"] == "eNTK (early stopping)" and float(table[0]["ood_acc:optdigits"]) == 0.7
    assert "| eNTK (early stopping) |" in paths["results.md"].read_text()
    for name in ("accuracy_vs_step.png", "accuracy_vs_beta.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
