"""scripts/run_living17.py end to end on a synthetic ImageNet tree (local and S3) and on image folders."""
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import MotoS3Server  # noqa: E402
from test_imagenet_data import LIVING17, write_train, write_val_folders  # noqa: E402

from entk_ray.cli import living17_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "resnet18", "--p", "3000", "--crop-size", "32", "--no-ray", "--quiet",
        "--max-steps", "60", "--eval-every", "10", "--rounds", "2", "--set", "solver.points_per_round=3",
        "--set", "probe.c_grid=[0.01, 1.0]", "--batch-size", "34"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_train(root)
    write_val_folders(root)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A ResNet-18 with seeded random weights, saved as a torchvision state_dict and as MoCo-v2."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, folder / "resnet18.pth")
    moco = {"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}, "epoch": 800}
    torch.save(moco, folder / "moco.pth.tar")
    return folder


def run_script(args, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not the full ImageNet": expected for a synthetic tree
        assert living17_main(args) == 0
    return capsys.readouterr().out


def test_living17_end_to_end_on_a_local_tree(tree, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    printed = run_script(["--imagenet-root", str(tree), "--weights", str(checkpoints / "resnet18.pth"),
                          "--index-cache", str(tmp_path / "cache"), "--out", str(out), *FAST], capsys)
    payload = json.loads((out / "results.json").read_text())
    assert payload["split_sizes"] == {"train": 102, "id_val": 68, "ood:living17_target": 68}
    methods = [(row["method"], row["source"]) for row in payload["rows"]]
    assert methods[:5] == [("Scratch", "Kumar et al. 2022 (reported)"),
                           ("Linear probing", "Kumar et al. 2022 (reported)"),
                           ("Fine-tuning", "Kumar et al. 2022 (reported)"),
                           ("eNTK (early stopping)", "write-up (reported)"),
                           ("eNTK (converged)", "write-up (reported)")]
    assert methods[5:] == [("Linear probing", "measured"), ("eNTK (early stopping)", "measured"),
                           ("eNTK (converged)", "measured")]
    # each synthetic class is one flat colour: a sane pipeline separates the ID classes
    assert payload["rows"][6]["id_acc"] > 0.5
    assert payload["config"]["model"]["name"] == "resnet18"
    assert "97.4%" in printed and "measured" in printed and "reported" in printed
    for figure in ("accuracy_vs_step.png", "accuracy_vs_beta.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"


def test_living17_from_s3_with_a_moco_checkpoint(tree, checkpoints, tmp_path, capsys):
    with MotoS3Server() as s3:
        s3.make_bucket("living17-e2e")
        fs = s3.filesystem()
        needed = set(LIVING17.source_wnids()) | set(LIVING17.target_wnids())
        for path in sorted(tree.rglob("*.JPEG")):
            rel = path.relative_to(tree).as_posix()
            if rel.split("/")[1] in needed:
                fs.pipe_file(f"living17-e2e/imagenet/{rel}", path.read_bytes())
        fs.pipe_file("living17-e2e/ckpt/moco.pth.tar", (checkpoints / "moco.pth.tar").read_bytes())
        options = json.dumps(s3.storage_options)
        out = tmp_path / "out"
        run_script(["--imagenet-root", "s3://living17-e2e/imagenet", "--weights", "s3://living17-e2e/ckpt/moco.pth.tar",
                    "--checkpoint-format", "moco", "--set", f"storage_options={options}",
                    "--index-cache", str(tmp_path / "cache"), "--out", str(out), *FAST], capsys)
    payload = json.loads((out / "results.json").read_text())
    assert payload["split_sizes"] == {"train": 102, "id_val": 68, "ood:living17_target": 68}
    local = tmp_path / "local"
    # the same weights from a torchvision file give the same features, hence the same measured rows
    run_script(["--imagenet-root", str(tree), "--weights", str(checkpoints / "resnet18.pth"),
                "--index-cache", str(tmp_path / "cache2"), "--out", str(local), *FAST], capsys)
    measured = [row for row in payload["rows"] if row["source"] == "measured"]
    again = [row for row in json.loads((local / "results.json").read_text())["rows"] if row["source"] == "measured"]
    assert [r["id_acc"] for r in measured] == [r["id_acc"] for r in again]
    assert [r["ood_acc"] for r in measured] == [r["ood_acc"] for r in again]


def write_folder(root: Path, classes: list[str], per_class: int, shift: int) -> None:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = (40 * c + shift, 255 - 40 * c, (60 * i + shift) % 256)
            buffer = io.BytesIO()
            Image.new("RGB", (20, 16), colour).save(buffer, "PNG")
            (root / name / f"{i}.png").write_bytes(buffer.getvalue())


def test_image_folder_benchmark_end_to_end(checkpoints, tmp_path, capsys):
    classes = ["cat", "dog", "fox"]
    write_folder(tmp_path / "train", classes, 6, 0)
    write_folder(tmp_path / "val", classes, 3, 5)
    write_folder(tmp_path / "sketch", classes, 3, 30)
    write_folder(tmp_path / "photo", classes, 3, 60)
    out = tmp_path / "out"
    printed = run_script(["--benchmark", "image_folder", "--id-train-dir", str(tmp_path / "train"),
                          "--id-val-dir", str(tmp_path / "val"), "--ood-dir", str(tmp_path / "sketch"),
                          "--ood-dir", str(tmp_path / "photo"), "--weights", str(checkpoints / "resnet18.pth"),
                          "--index-cache", str(tmp_path / "cache"), "--out", str(out), *FAST], capsys)
    payload = json.loads((out / "results.json").read_text())
    assert [row["source"] for row in payload["rows"]] == ["measured"] * 3  # no Living-17 reference rows
    assert set(payload["rows"][1]["ood"]) == {"sketch", "photo"}
    assert "OOD sketch" in printed and "OOD photo" in printed


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_living17.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--imagenet-root", "--weights", "--checkpoint-format", "--address", "--p", "--ood-dir",
                 "--val-ground-truth", "--class-mapping", "--corrupt-policy", "--decode-workers", "--artifact-store"):
        assert flag in out
