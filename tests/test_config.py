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


def test_any_key_of_the_storage_options_mapping_can_be_set():
    cfg = Config().with_overrides(["storage_options.key=abc", "storage_options.client_kwargs.endpoint_url=http://h:9",
                                   "storage_options.anon=false"]).validate()
    assert cfg.storage_options == {"key": "abc", "client_kwargs": {"endpoint_url": "http://h:9"}, "anon": False}
    with pytest.raises(ConfigError, match=r"unknown config field 'storage_option\.key'"):
        Config().with_overrides(["storage_option.key=abc"])
    with pytest.raises(ConfigError, match=r"unknown config field 'model\.name\.x'"):
        Config().with_overrides(["model.name.x=1"])


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


# --------------------------------------------------------------------------------------------
# issue 9: every number finite and of its type, every list a list (one generic pass)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("solver.r_grid=[.inf]", "solver.r_grid[0] must be a finite number, got inf"),
    ("solver.r_grid=[1e-3, .nan]", "solver.r_grid[1] must be a finite number, got nan"),
    ("solver.tol=true", "solver.tol must be a finite number, got True"),
    ("solver.tol=.inf", "solver.tol must be a finite number, got inf"),
    ("solver.holdout_fraction=abc", "solver.holdout_fraction must be a finite number, got 'abc'"),
    ("features.device=3", "features.device must be a string, got 3"),
    ("solver.r_grid=1e-3", "solver.r_grid must be a list of finite numbers, got '1e-3'"),
    ("probe.c_grid=1.0", "probe.c_grid must be a list of finite numbers, got 1.0"),
    ("data.ood_dirs=foo", "data.ood_dirs must be a list of strings, got 'foo'"),
    ("data.n_train=1.5", "data.n_train must be an integer or null, got 1.5"),
    ("ray.num_workers=two", "ray.num_workers must be an integer or null, got 'two'"),
    ("ray.gpus_per_worker=.nan", "ray.gpus_per_worker must be a finite number, got nan"),
    ("features.include_head=2", "features.include_head must be true or false, got 2"),
    ("model.weights=[a, b]", "model.weights must be a string or null, got ['a', 'b']"),
    ("storage_options=3", "storage_options must be a mapping, got 3"),
])
def test_mistyped_and_non_finite_values_are_rejected(override, message):
    with pytest.raises(ConfigError) as info:
        Config().with_overrides([override]).validate(check_paths=False)
    assert message in str(info.value)


def test_fields_added_later_are_type_checked(monkeypatch):
    """The check reads the dataclass annotations: a new field needs no validation code of its own."""
    import dataclasses

    from entk_ray import config as config_module

    @dataclasses.dataclass
    class Extra:
        rate: float = 1.0
        names: list[str] = dataclasses.field(default_factory=list)

    cfg = Config()
    assert config_module._type_mismatch("x.rate", float("inf"), float) == ("x.rate", "a finite number", float("inf"))
    config_module._check_types(Extra(), "x.")
    with pytest.raises(ConfigError, match=r"x.names\[1\] must be a string, got 2"):
        config_module._check_types(Extra(names=["a", 2]), "x.")
    cfg.validate(check_paths=False)


def test_malformed_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"solver.r_grid=\[1e-3,.*not a valid YAML value"):
        Config().with_overrides(["solver.r_grid=[1e-3,"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver:\n  r_grid: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        Config.from_yaml(bad)


def test_credentials_never_appear_in_config_errors():
    with pytest.raises(ConfigError) as info:
        Config().with_overrides(["storage_options=[{key: AKIAFAKEKEY, secret: s3cr3tvalue}]"]).validate()
    assert "AKIAFAKEKEY" not in str(info.value) and "s3cr3tvalue" not in str(info.value)


def help_text(main, capsys, args=("--help",)):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_shows_each_commands_real_defaults_and_a_glossary(capsys):
    import re

    from entk_ray.cli import COMMON_OPTIONS, demo_main, living17_main
    from entk_ray.models import BACKBONES

    demo = help_text(demo_main, capsys)
    flat = " ".join(demo.split())  # argparse wraps lines
    assert "Trains on 1,000 MNIST digits" in flat
    assert "[features.p; default: 500000]" in flat and "[data.n_train; default: 1000]" in flat
    assert "[solver.max_extensions; default: 3]" in flat and "[store.out_dir; default: results/demo]" in flat
    assert f"backbone: {', '.join(BACKBONES)}" in flat
    assert "None" not in demo
    assert len(re.findall(r"; default: ", flat)) == len(COMMON_OPTIONS)
    assert "--ray run features, kernels and the sweep on Ray (the default)" in flat
    assert "--no-ray run everything in this process, without Ray --set" in flat  # no "(default: True)"
    for term in ("r, β", "C ", "NAG", "telescopic search", "spectral path", "S, fingerprint", "ID ", "OOD",
                 "BREEDS", "MoCo"):
        assert f"\n  {term}" in demo, term

    living = " ".join(help_text(living17_main, capsys).split())
    assert living.count("entk_ray on BREEDS Living-17") == 1  # the description, printed by the real parser
    assert "pass --weights PATH" in living
    for expected in ("[model.name; default: resnet50]", "[data.n_train; default: all]",
                     "[store.out_dir; default: results/living17]", "[data.benchmark; default: living17]",
                     "[features.batch_size; default: 64]"):
        assert expected in living, expected


def test_missing_default_weights_say_what_to_do_before_any_work(tmp_path, monkeypatch, capsys):
    from entk_ray.cli import living17_main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # no torchvision file cached here
    for split in ("train", "val", "ood"):
        (tmp_path / split).mkdir()
    with pytest.raises(SystemExit) as info:
        living17_main(["--benchmark", "image_folder", "--id-train-dir", str(tmp_path / "train"), "--id-val-dir",
                       str(tmp_path / "val"), "--ood-dir", str(tmp_path / "ood"), "--no-ray", "--quiet",
                       "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.weights is not set and the default resnet50 weights are not available here" in err
    assert "--weights PATH" in err and "--model efficientnet_lite0" in err
    assert not (tmp_path / "out").exists()  # nothing ran
    Config().validate()  # the bundled Lite0 needs no --weights
