"""The full-size benchmark's code at a small scale: seeded synthetic Living-17 images and
``benchmarks/living17_scale.py`` end to end through a local Ray (issue 13, item 5)."""
import importlib.util
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from entk_ray.data.synthetic import SyntheticImages, synthetic_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "living17_scale.py"


def load_script():
    spec = importlib.util.spec_from_file_location("living17_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_images_are_made_from_their_index_alone():
    a = SyntheticImages(40, 17, 24, seed=3, split="train")
    b = pickle.loads(pickle.dumps(SyntheticImages(40, 17, 24, seed=3, split="train")))
    x, label = a[21]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and label == 21 % 17
    assert torch.equal(x, b[21][0])  # another process (a Ray actor) makes the same image
    assert not torch.equal(x, a[22][0]) and not torch.equal(x, SyntheticImages(40, 17, 24, 4, "train")[21][0])
    assert len(pickle.dumps(a)) < 2000  # a dataset travels as a few numbers, not as images
    with pytest.raises(IndexError):
        a[40]
    with pytest.raises(ValueError, match="image_size"):
        SyntheticImages(4, 2, 0, 0, "train")
    bench = synthetic_benchmark(34, 17, 17, 17, 8, seed=1)
    assert len(bench.train) == 34 and set(bench.eval_sets()) == {"id_val", "ood:shifted"}
    # every class in every prefix of 17; the OOD split shifts the colours (a different mean)
    assert sorted(bench.train.labels[:17].tolist()) == list(range(17))
    ood = bench.eval_sets()["ood:shifted"]
    assert ood[0][0].mean() > bench.eval_sets()["id_val"][0][0].mean()


def test_plan_only_prints_the_full_size_plan_and_projections(capsys):
    assert load_script().main(["--plan-only", "--hardware", "h100"]) == 0
    out = capsys.readouterr().out
    assert "n = 44,200 train + 3,400 eval, 17 classes" in out and "Fits." in out
    assert "full size on one node, 8 × " in out


def test_deadline_interrupts_the_main_thread():
    script = load_script()
    with pytest.raises(KeyboardInterrupt):
        with script.Deadline(0.2) as deadline:
            time.sleep(5)
    assert deadline.hit
    with script.Deadline(None) as idle:
        pass
    assert not idle.hit


def test_scale_benchmark_end_to_end_through_local_ray(tmp_path):
    """--scale 0.005 of Living-17 (221 + 8 + 8 examples, 17 classes, ResNet-50), at 16 px and
    p = 4,000 so that it runs on 2 CPU cores: a subprocess with its own local Ray."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "0.005", "--image-size", "16", "--p", "4000",
                           "--quiet", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    ratio = float(lines[-1].removeprefix("ratio: "))
    assert lines[-1].startswith("ratio: ") and ratio > 0
    text = proc.stdout
    assert "Plan: living17-synthetic × 0.005 · resnet50 at 16 px · p = 4,000 · Ray" in text and "Fits." in text
    for stage in ("features", "kernels", "sweep", "total"):
        assert any(line.startswith(stage) for line in lines), stage
    assert "peak memory: GPU" in text and "projected full size on one node, 8 × " in text
    payload = json.loads((out / "results.json").read_text())
    assert payload["split_sizes"] == {"train": 221, "id_val": 8, "ood:shifted": 8}
    assert payload["backend"] == "ray" and payload["plan"]["fits"]
    config = payload["config"]
    assert config["model"]["name"] == "resnet50" and config["features"]["p"] == 4000
    assert config["plan"]["tile_rows"] == payload["plan"]["tile_rows"]  # the run's config carries the plan's tiles
    total = float(next(line.split()[1] for line in lines if line.startswith("total")))
    assert ratio == pytest.approx(total / 600, abs=1e-3)
