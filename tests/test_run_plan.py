"""The plan wired into the run: ``--plan`` on both scripts, the plan applied to the run's config,
and a run that cannot fit refused before any data is read or feature computed (issue 13)."""
import json

import pytest

from entk_ray import pipeline
from entk_ray.cli import demo_main, living17_main
from entk_ray.config import Config
from entk_ray.plan import LIVING17_FULL, PlanError, RunSizes, make_plan, local_resources

A10G_64GB = ["--hardware", "custom", "--set", "plan.gpus=1", "--set", "plan.gpu_type=A10G", "--set",
             "plan.gpu_memory_gb=24", "--set", "plan.ram_gb=64", "--set", "plan.disk_gb=64"]


def no_data(*_args, **_kwargs):
    raise AssertionError("the data was read")


def test_living17_plan_for_one_h100_node_fits_without_the_data(monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "build_benchmark", no_data)
    assert living17_main(["--plan", "--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan: living17 · resnet50 at 224 px · p = 500,000 · Ray")
    assert "n = 44,200 train" in out and "Fits." in out and "solver:" in out


def test_living17_plan_refuses_float32_phi_on_a_24gb_gpu_with_64gb_ram(capsys):
    assert living17_main(["--plan", "--storage-dtype", "float32", "--set", "plan.storage_dtype=float32"]
                         + A10G_64GB) == 2
    captured = capsys.readouterr()
    assert "Does not fit: Φ needs 95.2 GB in float32" in captured.out
    assert "plan refused" in captured.err and "Settings that would fit" in captured.err


def test_demo_plan_is_for_this_machine_and_the_configured_sizes(capsys):
    assert demo_main(["--plan", "--n-train", "300", "--n-id-val", "50", "--n-ood", "50"]) == 0
    out = capsys.readouterr().out
    assert "hardware: this machine" in out and "n = 300 train + e = 100 eval" in out and "Fits." in out


def test_a_run_that_cannot_fit_is_refused_before_the_data_is_read(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(pipeline, "build_benchmark", no_data)
    cfg = Config().with_overrides([f"store.out_dir={tmp_path}", "use_ray=false", "data.n_train=2000000",
                                   "plan.hardware=custom", "plan.ram_gb=8", "plan.disk_gb=20"])
    with pytest.raises(PlanError, match="plan refused"):
        pipeline.run(cfg, progress=False, log=lambda _line: None)
    # The script's exit: 2, with the plan printed and the shortfall named; nothing was written.
    with pytest.raises(SystemExit) as info:
        demo_main(["--no-ray", "--out", str(tmp_path), "--n-train", "2000000", "--hardware", "custom",
                   "--set", "plan.ram_gb=8", "--set", "plan.disk_gb=20"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "Does not fit" in captured.out and "plan refused" in captured.err
    assert not (tmp_path / "results.json").exists()


def test_the_plan_is_applied_and_recorded(small_local_run):
    cfg, result = small_local_run
    payload = json.loads(result.paths["results.json"].read_text())
    plan = payload["plan"]
    assert plan["fits"] and plan["hardware"] == "this machine"
    # The run's config is the plan's: the same plan made again for it gives the same choices.
    applied = Config.from_dict(payload["config"])
    assert applied.features.storage_dtype == plan["storage_dtype"] and applied.plan.tile_rows == plan["tile_rows"]
    assert applied.solver.device == plan["solver_device"] == "cpu"
    sizes = RunSizes(result.split_sizes["train"], {k: v for k, v in result.split_sizes.items() if k != "train"}, 10)
    again = make_plan(applied, sizes, local_resources())
    assert (again.storage_dtype, again.tile_rows, again.solver) == (plan["storage_dtype"], plan["tile_rows"],
                                                                   plan["solver"])


@pytest.fixture(scope="module")
def small_local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("planned")
    cfg = Config().with_overrides(["data.n_train=60", "data.n_id_val=30", "data.n_ood=30", "features.p=2000",
                                   "solver.max_steps=60", "solver.rounds=1", "use_ray=false",
                                   f"store.out_dir={out}"])
    return cfg, pipeline.run(cfg, progress=False, log=lambda _line: None)


def test_living17_full_sizes_are_the_plans_nominal_ones():
    assert (LIVING17_FULL.n_train, LIVING17_FULL.n_eval, LIVING17_FULL.num_classes) == (44200, 3400, 17)


@pytest.mark.parametrize("overrides,message", [
    (["solver.device=tpu"], "solver.device must be one of cpu, cuda, auto"),
    (["solver.dtype=float16"], "solver.dtype must be one of float64, float32"),
    (["solver.method=nag", "solver.dtype=float32"], "solver.dtype=float32 needs solver.method=spectral"),
])
def test_solver_device_and_dtype_are_validated(overrides, message):
    from entk_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        Config().with_overrides(overrides).validate(check_paths=False)
