"""Every expected error ends cleanly: one ``error: …`` line naming the input and what to do, exit
status 2, no traceback (``--debug`` shows it). A bug keeps its traceback."""
from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
import torch
from PIL import Image

from entk_ray import pipeline
from entk_ray.cli import demo_main, living17_main
from entk_ray.config import ConfigError
from entk_ray.data.images import CorruptImagesError
from entk_ray.errors import StorageError
from entk_ray.models import CheckpointError
from entk_ray.store import ArtifactError

TINY_DIGITS = ["--no-ray", "--quiet", "--n-train", "20", "--n-id-val", "10", "--n-ood", "10", "--image-size", "8",
               "--p", "100"]


def fails_cleanly(main, args, capsys) -> str:
    """Run a command line that must fail: returns its one error line (and checks the rest)."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------
# Bad option and YAML values: before any work
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,named", [
    ("solver.r_grid=[1e-3,", "solver.r_grid"),  # yaml ScannerError/ParserError
    ("solver.r_grid=1e-3", "solver.r_grid"),  # a scalar for a list (was a TypeError)
    ("data.ood_dirs=foo", "data.ood_dirs"),
    ("features.device=3", "features.device"),  # was an AttributeError
    ("solver.r_grid=[.inf]", "solver.r_grid[0]"),  # was accepted: β = inf
    ("solver.tol=true", "solver.tol"),
    ("features.p=.nan", "features.p"),
])
def test_bad_values_end_in_one_line(override, named, tmp_path, capsys):
    line = fails_cleanly(demo_main, ["--no-ray", "--out", str(tmp_path), "--set", override], capsys)
    assert line.startswith("error: invalid configuration:") and named in line


def test_malformed_config_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("solver:\n  r_grid: [1, 2\nfeatures: {p: 3\n")
    line = fails_cleanly(demo_main, ["--config", str(bad), "--out", str(tmp_path)], capsys)
    assert str(bad) in line and "YAML" in line
    line = fails_cleanly(living17_main, ["--config", str(bad), "--out", str(tmp_path)], capsys)
    assert str(bad) in line


# --------------------------------------------------------------------------------------------
# Checkpoints: told apart (empty / truncated / not a checkpoint / pickles objects)
# --------------------------------------------------------------------------------------------
def checkpoint(kind: str, path) -> str:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(64, 64)}, buffer)
    whole = buffer.getvalue()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(1, 127, 4096, dtype=np.uint8).tobytes())
    elif kind == "objects":
        torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": {"w": torch.ones(2)}}, path)
    return str(path)


@pytest.mark.parametrize("kind,says", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is truncated or damaged"),
    ("garbage", "is not a PyTorch checkpoint"),
    ("objects", "pickles objects"),
])
def test_broken_checkpoints_are_told_apart(kind, says, tmp_path, capsys):
    path = checkpoint(kind, tmp_path / f"{kind}.pth")
    line = fails_cleanly(demo_main, TINY_DIGITS + ["--out", str(tmp_path / "out"), "--weights", path], capsys)
    assert path in line and says in line
    if kind != "objects":
        assert "pickles objects" not in line  # the old misreport


def test_missing_default_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    line = fails_cleanly(demo_main, TINY_DIGITS + ["--out", str(tmp_path / "out"), "--model", "resnet18"], capsys)
    assert "resnet18" in line and "model.weights" in line


# --------------------------------------------------------------------------------------------
# Image folders: errors raised after validation
# --------------------------------------------------------------------------------------------
def jpeg(size: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def image_folders(tmp_path, damage: str | None = None, val_classes=("a", "b")) -> list[str]:
    for split, classes in (("train", ("a", "b")), ("val", val_classes), ("ood", ("a", "b"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / c / f"{i}.jpg").write_bytes(jpeg(seed=i))
    bad = tmp_path / "train" / "a" / "0.jpg"
    if damage == "garbage":
        bad.write_bytes(b"\xff\xd8 not a jpeg")
    elif damage == "truncated":  # passes the default header check, fails to decode
        whole = jpeg(64)
        bad.write_bytes(whole[: len(whole) // 2])
    return ["--benchmark", "image_folder", "--id-train-dir", str(tmp_path / "train"), "--id-val-dir",
            str(tmp_path / "val"), "--ood-dir", str(tmp_path / "ood"), "--model", "efficientnet_lite0",
            "--crop-size", "32", "--p", "100", "--batch-size", "4", "--no-ray", "--quiet",
            "--out", str(tmp_path / "out")]


def test_corrupt_image_found_by_the_scan(tmp_path, capsys):
    line = fails_cleanly(living17_main, image_folders(tmp_path, "garbage"), capsys)
    assert str(tmp_path / "train" / "a" / "0.jpg") in line and "--corrupt-policy skip" in line


def test_image_that_fails_to_decode_during_features(tmp_path, capsys):
    line = fails_cleanly(living17_main, image_folders(tmp_path, "truncated"), capsys)
    assert str(tmp_path / "train" / "a" / "0.jpg") in line
    assert "--corrupt-check decode" in line and "--corrupt-policy skip" in line


def test_config_error_found_while_reading_the_data(tmp_path, capsys):
    line = fails_cleanly(living17_main, image_folders(tmp_path, val_classes=("a", "zebra")), capsys)
    assert "data.id_val_dir" in line and "zebra" in line


# --------------------------------------------------------------------------------------------
# Wherever they are raised (also inside Ray workers, wrapped), and --debug
# --------------------------------------------------------------------------------------------
def raising(exc: BaseException):
    def run(*args, **kwargs):
        try:
            raise exc
        except BaseException as inner:  # as a Ray driver sees a worker's error: wrapped
            raise RuntimeError(f"kernel block train[0:16, 0:16] failed: {inner}") from inner
    return run


@pytest.mark.parametrize("exc", [
    ArtifactError("artifact 'kernels/train' in /x cannot be written: read-only file system"),
    StorageError("cannot read s3://bucket/runs/k.npy (endpoint http://127.0.0.1:9): the storage endpoint did not answer"),
    CorruptImagesError("cannot read image /d/a.jpg: truncated"),
    CheckpointError("/w.pth: the checkpoint file is empty"),
])
def test_expected_errors_from_anywhere_end_cleanly(exc, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "run", raising(exc))
    line = fails_cleanly(demo_main, ["--no-ray", "--out", str(tmp_path)], capsys)
    assert line == f"error: {exc}"


def test_an_error_wrapped_by_ray_ends_in_its_own_message(tmp_path, capsys, monkeypatch):
    """Ray's wrapper of a worker's error is an instance of the error's class too
    (``RayTaskError(ImageReadError)``), but its message is the worker's traceback (with colour
    codes): the line printed is the original's message."""
    import ray

    from entk_ray.data.images import ImageReadError
    from entk_ray.errors import find_user_error

    original = ImageReadError("cannot read image /d/a.jpg: truncated; use --corrupt-check decode", [("/d/a.jpg", "x")])
    wrapped = ray.exceptions.RayTaskError("features train[0:8]", "Traceback (most recent call last):\n  ...",
                                          original).as_instanceof_cause()
    assert isinstance(wrapped, ImageReadError) and find_user_error(wrapped) is original
    monkeypatch.setattr(pipeline, "run", raising(wrapped))
    line = fails_cleanly(demo_main, ["--no-ray", "--out", str(tmp_path)], capsys)
    assert line == f"error: {original}"


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run", raising(CheckpointError("/w.pth: empty")))
    with pytest.raises(RuntimeError, match="kernel block"):
        demo_main(["--no-ray", "--out", str(tmp_path), "--debug"])
    with pytest.raises(ConfigError, match="solver.tol"):
        demo_main(["--no-ray", "--out", str(tmp_path), "--debug", "--set", "solver.tol=true"])
    monkeypatch.setattr(pipeline, "run", raising(ZeroDivisionError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        demo_main(["--no-ray", "--out", str(tmp_path)])
