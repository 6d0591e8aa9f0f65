"""One validated config: bad values fail before any work, naming the field and the value."""
import pytest

from entk_ray.cli import config_from_args, build_parser, demo_config
from entk_ray.config import Config, ConfigError


@pytest.mark.parametrize("override,message", [
    ("features.p=0", "features.p must be a positive integer, got 0"),
    ("features.p=-3", "features.p must be a positive integer, got -3"),
    ("solver.r_grid=[1e-3, 0]", "solver.r_grid[1] must be a positive number, got 0"),
    ("solver.r_grid=[-1]", "solver.r_grid[0] must be a positive number, got -1"),
    ("solver.eval_every=0", "solver.eval_every must be a positive integer, got 0"),
    ("model.name=vgg16", "model.name must be one of efficientnet_lite0, resnet18, resnet50; got 'vgg16'"),
    ("model.weights=/nonexistent/weights.pth", "model.weights = '/nonexistent/weights.pth' does not exist"),
    ("data.n_train=0", "data.n_train must be a positive integer or null, got 0"),
    ("solver.selection=test", "solver.selection must be one of id, holdout; got 'test'"),
    ("features.storage_dtype=int8", "features.storage_dtype must be one of float32, float16, bfloat16"),
    ("data.benchmark=living17", "data.imagenet_root is required"),
])
def test_bad_values_name_the_field_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        Config().with_overrides([override]).validate()
    assert message in str(info.value)


def test_unknown_fields_are_rejected():
    with pytest.raises(ConfigError, match="unknown config field 'solver.nope'"):
        Config().with_overrides(["solver.nope=1"])
    with pytest.raises(ConfigError, match="unknown config field 'model.depth'"):
        Config.from_dict({"model": {"depth": 3}})


def test_yaml_and_cli_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("features:\n  p: 1234\nsolver:\n  r_grid: [0.1, 1.0]\n")
    parser = build_parser("test")
    args = parser.parse_args(["--config", str(path), "--n-train", "77", "--set", "solver.tol=1e-8"])
    cfg = config_from_args(args, demo_config()).validate()
    assert cfg.features.p == 1234 and cfg.solver.r_grid == [0.1, 1.0]
    assert cfg.data.n_train == 77 and cfg.solver.tol == 1e-8
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_oversized_digits_request_fails_before_work():
    from entk_ray.pipeline import build_benchmark

    with pytest.raises(ConfigError, match="n_train"):
        build_benchmark(Config().with_overrides(["data.n_train=6000"]).validate())


def test_demo_cli_rejects_bad_values_before_work(capsys):
    from entk_ray.cli import demo_main

    with pytest.raises(SystemExit) as info:
        demo_main(["--p", "0", "--no-ray"])
    assert info.value.code == 2
    assert "features.p must be a positive integer, got 0" in capsys.readouterr().err
