"""The quick-start end to end on a small slice: table rows, files, reproducibility."""
import json

import numpy as np
import pytest

from entk_ray.cli import demo_main
from entk_ray.config import Config
from entk_ray.backends import LocalBackend
from entk_ray.pipeline import build_benchmark, run

SMALL = ["data.n_train=80", "data.n_id_val=40", "data.n_ood=40", "features.p=3000", "solver.max_steps=120",
         "solver.eval_every=10", "solver.rounds=2", "solver.points_per_round=3", "probe.c_grid=[0.01, 1.0]"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = Config().with_overrides(SMALL + [f"store.out_dir={out}"])
    return cfg, run(cfg, progress=False, log=lambda _msg: None)


def test_quick_start_writes_the_table_and_figures(small_run):
    cfg, result = small_run
    out = result.paths["results.json"].parent
    payload = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in payload["rows"]]
    assert methods == ["Linear probing", "eNTK (early stopping)", "eNTK (converged)"]
    for row in payload["rows"]:
        assert 0.0 <= row["id_acc"] <= 1.0 and 0.0 <= row["ood_acc"] <= 1.0
    # better than chance (10 classes) on a tiny slice: the features carry signal
    assert payload["rows"][1]["id_acc"] > 0.3
    early = payload["rows"][1]
    points = [p for p in payload["sweep_points"] if p["r"] == early["r"] and p["step"] == early["step"]]
    assert points and points[0]["id_val"] == early["id_acc"]
    assert max(p["id_val"] for p in payload["sweep_points"]) == early["id_acc"]
    for name in ("results.csv", "results.md", "sweep.csv", "accuracy_vs_step.png", "accuracy_vs_beta.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "accuracy_vs_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eNTK (early stopping)" in (out / "results.md").read_text()
    assert payload["split_sizes"] == {"train": 80, "id_val": 40, "ood:optdigits": 40}


def test_results_describe_the_run(small_run):
    from entk_ray.fingerprints import digest

    cfg, result = small_run
    out = result.paths["results.json"].parent
    payload = json.loads((out / "results.json").read_text())
    context = payload["context"]
    assert set(context["versions"]) >= {"entk_ray", "torch", "torchvision", "ray", "timm", "numpy"}
    assert context["versions"]["torch"] and context["timestamp"].endswith("+00:00") and context["command"]
    assert context["hardware"]["cpu_count"] >= 1 and isinstance(context["hardware"]["gpus"], list)
    assert context["git"] is None or len(context["git"]["commit"]) == 40
    assert digest(payload["fingerprint_parts"]) == payload["fingerprint"] == result.fingerprint
    assert payload["fingerprint_parts"]["subset"] == payload["subset_fingerprint"]
    assert set(payload["timings"]) >= {"data_s", "features_s", "kernels_s", "sweep_s", "probe_s", "intervals_s",
                                       "total_s"}
    assert payload["search"]["values"] == len({p["r"] for p in payload["sweep_points"]})
    assert payload["bootstrap"] == {"resamples": 1000, "seed": 0, "method": "percentile", "level": 0.95}
    for row in payload["rows"]:  # every accuracy has its interval, around it
        assert row["id_ci"][0] <= row["id_acc"] <= row["id_ci"][1], row["method"]
        low, high = row["ood_ci"]["optdigits"]
        assert low <= row["ood_acc"] <= high and high - low < 0.5
        assert row["tied"] >= 1
    text = (out / "results.md").read_text()
    assert text.startswith("# eNTK vs linear probing on digits shift")
    assert "**Command**" in text and "95% percentile bootstrap" in text and "| ID 95% CI |" in text


def test_kernels_are_reproducible(small_run):
    cfg, _ = small_run
    bench = build_benchmark(cfg)
    a = LocalBackend().kernels(cfg, bench, progress=False)
    b = LocalBackend().kernels(cfg, bench, progress=False)
    # the same computation twice: equal up to round-off (the BLAS may pick other kernels per call)
    np.testing.assert_allclose(a.train, b.train, rtol=0, atol=1e-6 * np.abs(a.train).max())
    assert a.subset_fingerprint == b.subset_fingerprint
    np.testing.assert_allclose(a.train, a.train.T)
    assert np.linalg.eigvalsh(a.train).min() > -1e-8 * np.trace(a.train)


def test_demo_cli_prints_the_table(tmp_path, capsys):
    args = ["--no-ray", "--quiet", "--out", str(tmp_path)] + [a for s in SMALL for a in ("--set", s)]
    assert demo_main(args) == 0
    out = capsys.readouterr().out
    for method in ("Linear probing", "eNTK (early stopping)", "eNTK (converged)"):
        assert method in out
    assert "| Method | ID | ID 95% CI | OOD | OOD 95% CI |" in out
    assert (tmp_path / "results.json").exists()


def test_the_features_line_counts_only_examples_computed_here():
    from types import SimpleNamespace

    from entk_ray.pipeline import features_line

    ks = SimpleNamespace(train=np.zeros((6, 6)), p=500, subset_fingerprint="abc")
    fresh = {"features_s": 2.0, "kernels_s": 1.0, "examples_computed": 10.0}
    assert features_line(fresh, 10, ks).startswith("features: 10 examples in 2.0s (5.0 examples/s")
    assert fresh["examples_per_s"] == 5.0
    partial = {"features_s": 2.0, "kernels_s": 1.0, "examples_computed": 4.0}
    line = features_line(partial, 10, ks)
    assert "4 of 10 examples computed (6 loaded from the artifact store) in 2.0s (2.0 examples/s" in line
    loaded = {"features_s": 0.0, "kernels_s": 0.0, "store_load_s": 0.3}
    line = features_line(loaded, 10, ks)
    assert "loaded from the artifact store in 0.3s (nothing computed)" in line and "nan" not in line
    assert "examples_per_s" not in loaded
