"""The results table and files: what a reader sees, from rows and solver paths."""
import csv
import json

import numpy as np
import pytest

from entk_ray.report import (LIVING17_REFERENCE, add_intervals, bootstrap_interval, format_table, ood_names,
                             write_results)
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


def test_bootstrap_interval_is_seeded_and_about_the_normal_width():
    correct = np.arange(500) % 10 != 0  # accuracy 0.9 on 500 examples
    low, high = bootstrap_interval(correct, 1000, seed=0)
    assert low < 0.9 < high
    normal = 2 * 1.96 * np.sqrt(0.9 * 0.1 / 500)  # ≈ 0.053: the binomial width
    assert high - low == pytest.approx(normal, rel=0.25)
    assert bootstrap_interval(correct, 1000, seed=0) == (low, high)
    assert bootstrap_interval(np.ones(17, dtype=bool), 1000, seed=0) == (1.0, 1.0)
    small = bootstrap_interval(correct[:50], 1000, seed=0)
    assert small[1] - small[0] > 2 * (high - low)  # a tenth of the examples: about √10 wider
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_interval(correct, 0, seed=0)


def test_intervals_go_into_every_table_format(tmp_path):
    labels = np.arange(40) % 4
    row = dict(ROWS[1], id_acc=0.75, ood_acc=0.5, ood={"optdigits": 0.5})
    correct = {"id_val": np.arange(40) % 4 != 0, "ood:optdigits": np.arange(40) % 2 == 0}
    add_intervals(row, correct, "id_val", 200, seed=1)
    assert row["id_ci"][0] < 0.75 < row["id_ci"][1] and row["ood_ci"]["optdigits"][0] < 0.5 < row["ood_ci"]["optdigits"][1]
    assert row["ood_acc_ci"] == row["ood_ci"]["optdigits"]
    lines = format_table([LIVING17_REFERENCE[0], row]).splitlines()
    assert lines[0] == "| Method | ID | ID 95% CI | OOD | OOD 95% CI | r | β | step | C | source |"
    lo, hi = (100 * v for v in row["id_ci"])
    assert f"| 75.0% | {lo:.1f}–{hi:.1f}% | 50.0% |" in lines[3]
    assert "| Scratch | 92.4% |  | 58.2% |  |" in lines[2]  # reported rows have no interval
    paths = write_results(tmp_path, [row], [], "id_val", "id_val")
    with open(paths["results.csv"]) as fh:
        table = list(csv.DictReader(fh))
    assert float(table[0]["id_ci_low"]) == row["id_ci"][0] and float(table[0]["ood_ci_high:optdigits"]) > 0.5
    assert json.loads(paths["results.json"].read_text())["rows"][0]["id_ci"] == row["id_ci"]
    wrong = {"id_val": labels == 0}  # accuracy 0.25, not the row's 0.75
    with pytest.raises(ValueError, match="accuracy 0.250000, the table says 0.750000"):
        add_intervals(dict(row), wrong, "id_val", 200, seed=1)
    one_off = {"id_val": np.arange(40) % 4 != 0}
    one_off["id_val"][0] = True  # 31 of 40 right, the table says 30: within one example of slack only
    with pytest.raises(ValueError, match="the table says"):
        add_intervals(dict(row), one_off, "id_val", 200, seed=1)
    assert add_intervals(dict(row), one_off, "id_val", 200, seed=1, tolerance_examples=1)["id_ci"]


def test_results_md_opens_with_a_title_and_the_run_context(tmp_path):
    runs = [run(1e-3, 0.01, {"id_val": [0.5, 0.8, 0.7], "ood:optdigits": [0.4, 0.6, 0.65]})]
    rows = [dict(ROWS[0], tied=3), dict(ROWS[1], r=1e-3, beta=0.01, step=20, tied=1)]
    extra = {"benchmark": "digits", "backend": "local", "split_sizes": {"train": 1000, "id_val": 500},
             "context": {"timestamp": "2030-01-01T00:00:00+00:00", "command": "python scripts/run_demo.py",
                         "git": {"commit": "0123456789abcdef", "dirty": False},
                         "versions": {"torch": "2.0"}, "hardware": {"cpu_model": "CPU X", "cpu_count": 4,
                                                                    "cpus_usable": 2, "gpus": []}},
             "search": {"message": "9 values of r in [1e-06, 100]"}, "bootstrap": {"resamples": 1000, "seed": 0},
             "timings": {"features_s": 12.0, "examples_per_s": 3.0}}
    text = write_results(tmp_path, rows, runs, "id_val", "id_val", extra=extra)["results.md"].read_text()
    lines = text.splitlines()
    assert lines[0] == "# eNTK vs linear probing on digits shift (ID: MNIST, OOD: UCI optdigits)"
    for expected in ("`python scripts/run_demo.py`", "commit 0123456789ab", "torch 2.0", "CPU X, 2 of 4 CPUs; no GPU",
                     "train 1,000, id_val 500", "**Selection set**: ID val:", "9 values of r in [1e-06, 100]",
                     "features 12.0s", "1000 resamples, seed 0",
                     "Linear probing: 3 values of C tied on selection accuracy"):
        assert expected in text, expected
    assert "examples_per" not in text and "eNTK (early stopping): 1" not in text
    assert text.index("| Method |") > text.index("**Command**")
