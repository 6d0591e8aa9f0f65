"""The ablation runner: nested-subset kernels equal direct kernels, artifacts are reused, the
table and figures come out, and on Ray the grid runs as tasks with the same numbers."""
import json

import numpy as np
import pytest

from entk_ray import kernels as kern
from entk_ray.ablation import AblationGrid, Group, compute_group, group_cells, run_ablation, summarize
from entk_ray.config import ConfigError
from entk_ray.distributed.testing import TinyAblationSetup
from entk_ray.features import compute_features
from entk_ray.store import safe_name

BASE = {"data": {"n_train": 24, "n_id_val": 12, "n_ood": 12}, "features": {"batch_size": 8},
        "solver": {"r_grid": [1e-4, 1e-2, 1.0], "rounds": 2, "points_per_round": 3, "max_steps": 60}}


def grid(tmp_path, **kw):
    return AblationGrid(**{"maps": ["uniform"], "p": [40, 120], "seeds": [0, 1], "base": BASE,
                           "out_dir": str(tmp_path / "out"), "use_ray": False, "bootstrap": 50, **kw}).validate()


@pytest.mark.parametrize("spec", ["uniform", "jl"])  # stratified nesting: tests/test_feature_maps.py
def test_nested_kernels_equal_direct_kernels_and_are_reused(tmp_path, spec):
    g = grid(tmp_path)
    cfg, setup = g.config(), TinyAblationSetup()
    group = Group(spec, 1, [30, 250])
    info = compute_group(cfg, group, "both", setup)
    assert info["computed"] and len(info["cells"]) == 2
    benchmark = setup.benchmark(cfg)
    cells, _, model = group_cells(cfg, group, "both", benchmark, setup)
    for cell, fmap, _, _ in cells:  # each cell's map computed on its own, from scratch
        from entk_ray.ablation import _namespace
        ns = _namespace(cfg, cell.fingerprint)
        computer = fmap.computer(model)
        phi = compute_features(computer, benchmark.train, batch_size=8)
        np.testing.assert_allclose(ns.load_array("kernels/train"), kern.train_kernel([phi]), rtol=1e-5,
                                   atol=1e-6 * np.abs(kern.train_kernel([phi])).max())  # float32 Φ round-off
        for name, ds in benchmark.eval_sets().items():
            phi_e = compute_features(computer, ds, batch_size=8)
            direct = kern.cross_kernel([phi_e], [phi])
            np.testing.assert_allclose(ns.load_array(f"kernels/{safe_name(name)}"), direct, rtol=1e-5,
                                       atol=1e-6 * np.abs(direct).max())
            np.testing.assert_allclose(ns.load_array(f"diagonals/{safe_name(name)}"),
                                       (phi_e.double() ** 2).sum(1).numpy(), rtol=1e-5)
    assert len({c.fingerprint for c, *_ in cells}) == 2
    again = compute_group(cfg, group, "both", setup)
    assert not again["computed"] and again["cells"] == info["cells"]


def test_local_run_writes_table_and_reuses_everything(tmp_path):
    g = grid(tmp_path, maps=["uniform", "stratified"])
    setup = TinyAblationSetup()
    result = run_ablation(g, logger=lambda *_: None, setup=setup)
    assert [(r["map"], r["p"], r["seeds"]) for r in result.rows] == [
        ("uniform", 40, 2), ("uniform", 120, 2), ("stratified", 40, 2), ("stratified", 120, 2)]
    row = result.rows[0]
    for key in ("early:id_val", "converged:ood:shifted"):
        v = row[key]
        assert v["mean"] == pytest.approx(np.mean(v["per_seed"])) and v["ci"][0] <= v["mean"] <= v["ci"][1]
    # the cell's ES accuracy is the one its sweep chose
    cell = result.cells[0]
    assert np.mean(cell["correct"]["early"]["id_val"]) == pytest.approx(cell["early"]["accuracy"]["id_val"])
    for path in result.paths.values():
        assert path.stat().st_size > 0
    table = result.paths["table"].read_text()
    assert "linear probe" in table and "stratified" in table
    doc = json.loads(result.paths["json"].read_text())
    assert doc["probe"]["id_val"] > 0 and len(doc["cells"]) == 8
    rerun = run_ablation(g, logger=lambda *_: None, setup=setup)
    assert not any(info["computed"] for info in rerun.groups)
    assert [r["early:id_val"]["mean"] for r in rerun.rows] == [r["early:id_val"]["mean"] for r in result.rows]


def test_summary_statistics():
    cells = [{"spec": "u", "p": 10, "p_actual": 10, "correct": {"early": {"a": c}, "converged": {"a": c}},
              "span": {"analysis": {"sets": {"a": {"quantiles": {"median": 0.5}, "pearson": -0.1}}},
                       "spectrum": {"participation_ratio": 3.0}}}
             for c in ([1, 1, 0, 0], [1, 0, 0, 0])]
    row = summarize(cells, ["a"], bootstrap=200)[0]
    assert row["early:a"]["mean"] == pytest.approx(0.375)
    assert row["early:a"]["std"] == pytest.approx(np.std([0.5, 0.25], ddof=1))
    lo, hi = row["early:a"]["ci"]
    assert 0.0 <= lo < 0.375 < hi <= 1.0


def test_grid_errors_are_named(tmp_path):
    for kw, words in [({"maps": ["nope"]}, "grid.maps"), ({"p": [0]}, "grid.p"), ({"seeds": [1, 1]}, "duplicates"),
                      ({"p_by_map": {"jl": [5]}}, "not in grid.maps"), ({"seed_varies": "x"}, "seed_varies"),
                      ({"base": {"features": {"pp": 1}}}, "features.pp")]:
        with pytest.raises(ConfigError, match=words):
            grid(tmp_path, **kw)
    (tmp_path / "g.yaml").write_text("maps: [uniform]\ncolour: red\n")
    with pytest.raises(ConfigError, match="colour"):
        AblationGrid.from_yaml(tmp_path / "g.yaml")


@pytest.mark.ray
def test_ray_grid_runs_as_tasks_with_the_local_numbers(tmp_path):
    setup = TinyAblationSetup()
    local = run_ablation(grid(tmp_path / "a", p=[40], seeds=[0, 1]), logger=lambda *_: None, setup=setup)
    ray_run = run_ablation(grid(tmp_path / "b", p=[40], seeds=[0, 1], use_ray=True), logger=lambda *_: None,
                           setup=setup)
    assert any(info["computed"] for info in ray_run.groups)
    for a, b in zip(local.rows, ray_run.rows):
        assert a["early:id_val"]["per_seed"] == b["early:id_val"]["per_seed"]
        assert a["converged:ood:shifted"]["per_seed"] == b["converged:ood:shifted"]["per_seed"]
