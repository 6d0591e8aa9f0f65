"""Per-example gradient features: every computer equals a per-example autograd loop; S is stable.

More on the default (sampled) computer in tests/test_sampled_features.py."""
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from references import autograd_loop
from torch import nn

from entk_ray.features import (FuncFeatureComputer, HookFeatureComputer, SampledFeatureComputer, compute_features,
                               make_feature_computer, select_parameters, unsupported_modules)
from entk_ray.data.base import TensorLabeledDataset


class SmallCNN(nn.Module):
    """Conv (incl. grouped and strided), BatchNorm, residual `+=`, Linear: every supported layer kind."""

    def __init__(self, width: int = 8, dim: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, stride=2, padding=1, groups=width)
        self.bn2 = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, width, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(width, dim)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.dw(x))
        y += nn.functional.avg_pool2d(x, 2)  # in place on a BatchNorm output, as ResNet's `out += identity`
        return self.fc(self.pw(self.relu(y)).mean((2, 3)))


class ScalarModel(nn.Module):
    def __init__(self, backbone, dim):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(dim, 1, bias=False)

    def forward(self, x):
        return self.head(self.backbone(x)).reshape(-1)


def make_model(seed=0):
    torch.manual_seed(seed)
    model = ScalarModel(SmallCNN(), 6)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


COMPUTERS = {"sampled": SampledFeatureComputer, "hooks": HookFeatureComputer, "func": FuncFeatureComputer}


@pytest.mark.parametrize("method", list(COMPUTERS))
@pytest.mark.parametrize("p", [300, 10**9])
def test_features_match_per_example_autograd(method, p):
    model = make_model()
    x = torch.randn(5, 3, 12, 12)
    subset = select_parameters(model, p, seed=3)
    expected = autograd_loop(model, subset, x)
    computer = make_feature_computer(model, subset, method, chunk_size=2)
    assert type(computer) is COMPUTERS[method]
    phi = computer(x)
    assert phi.shape == (5, subset.p) and phi.dtype == torch.float32
    rel = (phi - expected).norm() / expected.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("method", ["sampled", "hooks"])
def test_features_of_an_example_do_not_depend_on_its_batch(method):
    model = make_model()
    x = torch.randn(6, 3, 12, 12)
    computer = make_feature_computer(model, select_parameters(model, 400, 0), method)
    together = computer(x)
    apart = torch.cat([computer(x[:2]), computer(x[2:])])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-6)


def test_subset_covers_all_when_p_exceeds_total_and_rejects_nonpositive_p():
    model = make_model()
    total = sum(p.numel() for n, p in model.named_parameters() if n.startswith("backbone."))
    subset = select_parameters(model, total + 10, 0)
    assert subset.p == total and subset.total == total
    assert np.array_equal(subset.flat_indices, np.arange(total))
    for bad in (0, -5):
        with pytest.raises(ValueError, match="p must be a positive integer"):
            select_parameters(model, bad, 0)


def test_subset_excludes_head_unless_asked():
    model = make_model()
    backbone_only = select_parameters(model, 10**9, 0)
    with_head = select_parameters(model, 10**9, 0, include_head=True)
    assert all(n.startswith("backbone.") for n in backbone_only.names)
    assert "head.weight" in with_head.names and with_head.p == backbone_only.p + 6


SUBSET_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_features import make_model
from entk_ray.features import select_parameters
torch.manual_seed(int(sys.argv[1]))  # the global RNG must not matter
s = select_parameters(make_model(), 200, seed=int(sys.argv[2]))
print(s.fingerprint(), int(s.flat_indices.sum()))
"""


def test_subset_is_identical_across_processes_and_changes_with_seed(tmp_path):
    import os

    script = tmp_path / "subset.py"
    script.write_text(SUBSET_SCRIPT.format(tests=os.path.dirname(__file__)))

    def run(global_seed, seed):
        out = subprocess.run([sys.executable, str(script), str(global_seed), str(seed)], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    first, second, other = run(1, 7), run(2, 7), run(1, 8)
    assert first == second
    assert first.split()[0] != other.split()[0]
    assert select_parameters(make_model(), 200, seed=7).fingerprint() == first.split()[0]


def test_train_mode_is_rejected():
    model = make_model().train()
    with pytest.raises(ValueError, match="eval mode"):
        make_feature_computer(model, select_parameters(model, 100, 0), "hooks")


def test_unsupported_layers_fall_back_to_func_with_a_logged_reason(caplog):
    class WithLayerNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4))
            self.head = nn.Linear(4, 1, bias=False)

        def forward(self, x):
            return self.head(self.backbone(x)).reshape(-1)

    model = WithLayerNorm().eval()
    subset = select_parameters(model, 10**6, 0)
    assert any("LayerNorm" in s for s in unsupported_modules(model))
    with caplog.at_level(logging.WARNING, logger="entk_ray.features"):
        assert isinstance(make_feature_computer(model, subset, "auto"), FuncFeatureComputer)
    assert "LayerNorm" in caplog.text and "using func" in caplog.text
    for method in ("sampled", "hooks"):
        with pytest.raises(ValueError, match=f"{method} features do not support these layers: .*LayerNorm"):
            make_feature_computer(model, subset, method)
    with pytest.raises(ValueError, match="feature method must be one of auto, sampled, hooks, func"):
        make_feature_computer(model, subset, "fast")
    x = torch.randn(3, 3, 2, 2)
    phi = make_feature_computer(model, subset, "auto")(x)
    torch.testing.assert_close(phi, autograd_loop(model, subset, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compute_features_over_a_dataset_and_reduced_storage(dtype):
    model = make_model()
    images = torch.randn(7, 3, 12, 12)
    ds = TensorLabeledDataset(images, np.arange(7) % 2)
    computer = make_feature_computer(model, select_parameters(model, 400, 0))
    full = compute_features(computer, ds, batch_size=3)
    torch.testing.assert_close(full, computer(images), rtol=1e-5, atol=1e-6)
    shard = compute_features(computer, ds, indices=[4, 5, 6], batch_size=2)
    torch.testing.assert_close(shard, full[4:], rtol=1e-5, atol=1e-6)
    reduced = compute_features(computer, ds, batch_size=4, storage_dtype=dtype)
    assert reduced.dtype == getattr(torch, dtype)
    rel = ((reduced.double() - full.double()).norm() / full.double().norm()).item()
    assert 0 < rel < (1e-3 if dtype == "float16" else 1e-2)
