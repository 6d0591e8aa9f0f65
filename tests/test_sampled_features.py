"""The sampled-coordinate computer (the default) equals torch.func and a per-example autograd loop.

Agreement is checked to 1e-5 relative (‖Φ − Φ_ref‖_F / ‖Φ_ref‖_F; float32 round-off is ~1e-7
here) on a CNN with every conv variant the computer handles, on Lite0 and on ResNet-18 (random
weights, 32 px). Also: S (its draw and fingerprint) is unchanged from before this computer, the
Triton kernel's logic (in Triton's CPU interpreter), memory that does not grow with layer sizes,
the fallback for unsupported layers, and the pieces of the feature pipeline (loader reuse,
double-buffered staging, reduced-precision error).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from references import autograd_loop
from torch import nn

from entk_ray.data.base import TensorLabeledDataset
from entk_ray.features import (HookFeatureComputer, SampledFeatureComputer, _HostStager,
                               _LOADERS, compute_features, make_feature_computer, peak_memory_bytes,
                               select_parameters, storage_kernel_error, tf32_mode)
from entk_ray.models import ScalarHeadModel, create_lite0_backbone, create_resnet_backbone

REL_TOL = 1e-5  # the agreement bar; observed ~1e-7 (float32 round-off)


def relative_error(phi: torch.Tensor, reference: torch.Tensor) -> float:
    return ((phi.double() - reference.double()).norm() / reference.double().norm()).item()


def randomize_batchnorm(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so x̂ ≠ x."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * 0.2 + 1.0)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


class EveryConv(nn.Module):
    """timm Conv2dSame (asymmetric padding at even sizes, bias), a grouped dilated conv, a
    depthwise strided conv, padding='same' with an even kernel and dilation, reflect padding, a
    pointwise conv with bias, BatchNorm2d with an in-place residual on its output, a Linear over
    tokens (B, L, C), BatchNorm1d on (B, C), a dead branch and a final Linear."""

    def __init__(self, c: int = 8):
        super().__init__()
        from timm.layers import Conv2dSame

        self.stem = Conv2dSame(3, c, 3, stride=2, bias=True)
        self.bn0 = nn.BatchNorm2d(c)
        self.grouped = nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 5, stride=2, padding=2, groups=c)
        self.same = nn.Conv2d(c, 2 * c, (3, 2), padding="same", dilation=(1, 2))
        self.reflect = nn.Conv2d(2 * c, c, 3, padding=1, padding_mode="reflect", bias=False)
        self.pw = nn.Conv2d(c, c, 1)
        self.bn2 = nn.BatchNorm2d(c)
        self.dead = nn.Conv2d(c, c, 1)  # runs, but its output never reaches f
        self.relu = nn.ReLU(inplace=True)
        self.tokens = nn.Linear(c, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        y = self.bn1(self.grouped(x))
        y += x  # in place on a BatchNorm output, as ResNet's `out += identity`
        y = self.relu(y)
        self.dead(y)
        z = self.reflect(self.same(self.dw(y)))
        z = self.relu(self.bn2(self.pw(z)))
        t = self.tokens(z.flatten(2).transpose(1, 2))  # (B, L, 6)
        return self.fc(self.relu(self.bn1d(t.mean(1))))


def every_conv_model(seed: int = 0) -> ScalarHeadModel:
    torch.manual_seed(seed)
    return randomize_batchnorm(ScalarHeadModel(EveryConv(), feature_dim=5)).eval()


@pytest.mark.parametrize("p", [300, 10**9])
def test_sampled_equals_func_and_autograd_loop_on_every_conv_variant(p):
    model = every_conv_model()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    subset = select_parameters(model, p, seed=3)
    expected = autograd_loop(model, subset, x)
    computer = make_feature_computer(model, subset)  # auto → sampled
    assert isinstance(computer, SampledFeatureComputer)
    phi = computer(x)
    assert phi.shape == (4, subset.p) and phi.dtype == torch.float32
    assert relative_error(phi, expected) < REL_TOL
    assert relative_error(phi, make_feature_computer(model, subset, "func", chunk_size=2)(x)) < REL_TOL
    # the dead branch's columns are exactly zero, as its gradient is
    cols = [n for n in subset.per_parameter() if n.startswith("backbone.dead.")]
    assert cols, "the subset should sample the dead layer"
    # hooks handles the same layers (reflect padding and 'same' included)
    assert relative_error(make_feature_computer(model, subset, "hooks")(x), expected) < REL_TOL


def test_dead_layer_columns_are_zero():
    model = every_conv_model()
    subset = select_parameters(model, 10**9, seed=0)
    phi = make_feature_computer(model, subset, "sampled")(torch.randn(3, 3, 12, 12))
    start = 0
    for name, idx in subset.per_parameter().items():
        if name.startswith("backbone.dead."):
            assert torch.count_nonzero(phi[:, start:start + idx.numel()]) == 0
        start += idx.numel()


def test_chunking_and_output_buffer_do_not_change_phi():
    model = every_conv_model()
    subset = select_parameters(model, 10**9, seed=1)
    x = torch.randn(5, 3, 12, 12)
    whole = SampledFeatureComputer(model, subset)(x)
    tiny_chunks = SampledFeatureComputer(model, subset, chunk_elements=7)(x)  # chunks of one coordinate
    torch.testing.assert_close(tiny_chunks, whole, rtol=1e-6, atol=1e-7, msg="same sums, chunked")
    big = torch.full((9, subset.p + 3), float("nan"))
    view = big[2:7, 1:1 + subset.p]  # rows not contiguous with each other, each row contiguous
    returned = SampledFeatureComputer(model, subset)(x, out=view)
    assert returned.data_ptr() == view.data_ptr()
    torch.testing.assert_close(view, whole, rtol=1e-6, atol=1e-7)
    assert torch.isnan(big[:2]).all() and torch.isnan(big[:, 0]).all()
    with pytest.raises(ValueError, match="out must be a float32 tensor of shape"):
        SampledFeatureComputer(model, subset)(x, out=torch.empty(5, subset.p, dtype=torch.float64))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_sampled_on_lite0_and_resnet18(name):
    """Real backbones, random weights, 32 px: timm Conv2dSame/BatchNormAct2d and ResNet's in-place residuals."""
    if name == "efficientnet_lite0":
        backbone, dim = create_lite0_backbone(), 1280
    else:
        backbone, dim = create_resnet_backbone(name), 512
    model = randomize_batchnorm(ScalarHeadModel(backbone, dim)).eval()
    subset = select_parameters(model, 300, seed=0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    phi = make_feature_computer(model, subset)(x)
    assert relative_error(phi, autograd_loop(model, subset, x)) < REL_TOL
    assert relative_error(phi, make_feature_computer(model, subset, "func", chunk_size=2)(x)) < REL_TOL


def test_subset_draw_and_fingerprint_are_unchanged():
    """S predates this computer: cached Φ, K and sweep artifacts keyed by its fingerprint stay valid.
    The values were printed by the code on main before the sampled computer existed."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_features import make_model

    assert select_parameters(make_model(), 300, 3).fingerprint() == "7f9eb4b94d5e620a"
    lite0 = ScalarHeadModel(create_lite0_backbone(), 1280)
    assert select_parameters(lite0, 500_000, 0).fingerprint() == "efacc7522bd980ec"
    resnet50 = ScalarHeadModel(create_resnet_backbone("resnet50"), 2048)
    assert select_parameters(resnet50, 500_000, 0).fingerprint() == "a1444e7f9c51e558"


TRITON_SCRIPT = """
import sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from timm.layers import Conv2dSame
from test_sampled_features import every_conv_model, relative_error
from entk_ray.features import SampledFeatureComputer, select_parameters, _conv2d_weight_grads, _ConvPlan, _Block
g = torch.Generator().manual_seed(2)
worst = 0.0
# The kernel alone against the hooks formula, every coordinate of each layer: several blocks of
# coordinates and of positions (L > 128), padding, stride, dilation, groups, asymmetric 'same'.
for conv, size in [(nn.Conv2d(6, 8, 3, padding=1, groups=2), 13), (nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=3), 17),
                   (Conv2dSame(4, 6, 3, stride=2), 24), (nn.Conv2d(5, 7, 1), 12)]:
    x = torch.randn(2, conv.in_channels, size, size, generator=g)
    delta = torch.randn(conv(x).shape, generator=g)
    index = torch.arange(conv.weight.numel())
    plan = _ConvPlan(conv, dict(weight=_Block(3, index)))
    out = torch.full((2, index.numel() + 5), float("nan"))
    top, left = plan.padding(size, size)
    from entk_ray.features import _conv_weight_triton
    _conv_weight_triton(x, delta, plan.on(torch.device("cpu"))["coords32"], conv, top, left, out, 3)
    expected = _conv2d_weight_grads(conv, x, delta).reshape(2, -1)
    assert torch.isnan(out[:, :3]).all() and torch.isnan(out[:, -2:]).all()
    worst = max(worst, relative_error(out[:, 3:3 + index.numel()], expected))
# The whole computer on a model, fused against eager.
model = every_conv_model()
subset = select_parameters(model, 200, seed=5)
x = torch.randn(2, 3, 10, 10, generator=g)
fused = SampledFeatureComputer(model, subset, conv_backend="triton")(x)
eager = SampledFeatureComputer(model, subset, conv_backend="torch")(x)
print(max(worst, relative_error(fused, eager)))
"""


def test_triton_kernel_logic_matches_the_torch_path(tmp_path):
    """The CUDA kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1): same indexing,
    masks for padding/stride/dilation/groups, column placement. Speed is not tested here."""
    pytest.importorskip("triton", reason="the Triton kernel's logic needs the triton package (installed with torch on Linux x86-64); the torch path is tested without it")
    script = tmp_path / "triton_check.py"
    script.write_text(TRITON_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) < REL_TOL


class WideLayers(nn.Module):
    def __init__(self, width: int = 2048):
        super().__init__()
        self.conv = nn.Conv2d(64, 256, 3, padding=1)
        self.fc = nn.Linear(256, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        return self.out(self.fc(self.conv(x).mean((2, 3))))


def test_memory_does_not_grow_with_layer_size():
    """Peak memory of a call stays far below B × (size of the layers owning S): the sampled
    computer never forms a layer's per-example gradient; hooks does (the check can fail)."""
    torch.manual_seed(0)
    model = WideLayers().eval()
    subset = select_parameters(model, 2000, seed=0)
    batch = 32
    x = torch.randn(batch, 64, 6, 6)
    layer_bytes = 4 * batch * sum(p.numel() for n, p in model.named_parameters() if n in subset.per_parameter())
    sampled = make_feature_computer(model, subset, "sampled")
    hooks = make_feature_computer(model, subset, "hooks")
    sampled(x), hooks(x)  # warm-up: workspace, allocator
    peak_sampled = peak_memory_bytes(lambda: sampled(x))
    if peak_sampled is None:
        pytest.skip("peak RSS cannot be reset on this OS (/proc/self/clear_refs)")
    peak_hooks = peak_memory_bytes(lambda: hooks(x))
    assert peak_hooks > 0.5 * layer_bytes, (peak_hooks, layer_bytes)
    assert peak_sampled < 0.1 * layer_bytes, (peak_sampled, layer_bytes)


def test_hooks_is_a_hook_computer_on_every_supported_conv():
    # the LayerNorm fallback (auto → func, with its logged reason) is tested in test_features.py
    assert isinstance(make_feature_computer(every_conv_model(), select_parameters(every_conv_model(), 50, 0),
                                            "hooks"), HookFeatureComputer)


def test_tf32_mode_sets_and_restores_cuda_math():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with tf32_mode(True):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert (matmul.fp32_precision, conv.fp32_precision) == before
    with tf32_mode(False):
        assert (matmul.fp32_precision, conv.fp32_precision) == before
    model = every_conv_model()
    subset = select_parameters(model, 200, 0)
    x = torch.randn(2, 3, 12, 12)
    # CPU: the switch changes nothing
    torch.testing.assert_close(SampledFeatureComputer(model, subset, tf32=True)(x),
                               SampledFeatureComputer(model, subset)(x), rtol=0, atol=0)


def test_double_buffered_staging_keeps_rows_in_order():
    """The staging logic the CUDA path uses (two buffers, drained when they come round and at the
    end), run on the CPU: batches of uneven size land in their rows, in the storage dtype."""
    batches = [torch.randn(n, 7) for n in (4, 4, 3, 4, 1)]
    out = torch.full((16, 7), float("nan"), dtype=torch.bfloat16)
    stager = _HostStager(out, torch.device("cpu"), batch_size=4, staged=True)
    row = 0
    for phi in batches:
        stager.put(phi, row)
        row += phi.shape[0]
    stager.finish()
    torch.testing.assert_close(out, torch.cat(batches).to(torch.bfloat16), rtol=0, atol=0)


def test_storage_kernel_error():
    phi = torch.randn(16, 5000, generator=torch.Generator().manual_seed(0))
    assert storage_kernel_error(phi, "float32") == 0.0
    errors = {d: storage_kernel_error(phi, d) for d in ("float16", "bfloat16")}
    rounded = phi.to(torch.bfloat16).double()
    direct = ((rounded @ rounded.T - phi.double() @ phi.double().T).norm() / (phi.double() @ phi.double().T).norm())
    assert errors["bfloat16"] == pytest.approx(direct.item(), rel=1e-9)
    # bf16 keeps 8 mantissa bits, float16 11: errors ~2^-9 and ~2^-12 per entry, less after averaging
    assert 0 < errors["float16"] < errors["bfloat16"] < 1e-2
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        storage_kernel_error(phi, "int8")


def test_compute_features_with_persistent_workers_and_stats():
    model = every_conv_model()
    subset = select_parameters(model, 300, 0)
    computer = make_feature_computer(model, subset)
    images = torch.randn(9, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    ds = TensorLabeledDataset(images, np.arange(9) % 2)
    direct = computer(images)
    stats: dict = {}
    first = compute_features(computer, ds, indices=[8, 0, 3, 4, 5], batch_size=2, num_workers=1, stats=stats)
    torch.testing.assert_close(first, direct[[8, 0, 3, 4, 5]], rtol=1e-5, atol=1e-7)
    assert stats["examples"] == 5 and stats["examples_per_s"] > 0 and stats["storage_kernel_rel_error"] == 0.0
    loaders = [v[1] for k, v in _LOADERS.items() if k[0] == id(ds)]
    assert len(loaders) == 1
    second = compute_features(computer, ds, indices=range(6, 9), batch_size=2, num_workers=1,
                              storage_dtype="bfloat16", stats=stats)
    assert [v[1] for k, v in _LOADERS.items() if k[0] == id(ds)] == loaders  # the workers were kept
    torch.testing.assert_close(second.float(), direct[6:], rtol=1e-2, atol=1e-4)
    assert stats["storage_kernel_rel_error"] == pytest.approx(storage_kernel_error(direct[6:8], "bfloat16"), rel=1e-3)
    assert 0 < stats["storage_kernel_rel_error"] < 1e-2


def test_config_accepts_the_new_method_and_validates_tf32():
    from entk_ray.config import Config, ConfigError

    cfg = Config().with_overrides(["features.method=sampled", "features.tf32=true"]).validate(check_paths=False)
    assert cfg.features.method == "sampled" and cfg.features.tf32 is True
    assert Config().features.tf32 is False and Config().features.method == "auto"
    with pytest.raises(ConfigError, match="features.tf32 must be true or false, got 'maybe'"):
        Config().with_overrides(["features.tf32=maybe"]).validate(check_paths=False)
    with pytest.raises(ConfigError, match="features.method must be one of auto, sampled, hooks, func"):
        Config().with_overrides(["features.method=fast"]).validate(check_paths=False)


def test_two_passes_at_once_over_one_dataset_use_separate_loaders():
    from entk_ray.features import iterate_batches

    images = torch.arange(6.0).view(6, 1, 1, 1)
    ds = TensorLabeledDataset(images, np.zeros(6, dtype=np.int64))
    outer = iterate_batches(ds, [0, 1, 2, 3], batch_size=2, num_workers=1)
    first = next(outer)
    inner = torch.cat(list(iterate_batches(ds, [5, 4], batch_size=2, num_workers=1)))  # while outer is open
    rest = torch.cat([first, *outer])
    assert rest.flatten().tolist() == [0.0, 1.0, 2.0, 3.0] and inner.flatten().tolist() == [5.0, 4.0]
