"""Feature maps: each map's Φ is the map applied to a per-example autograd gradient; fingerprints
key maps and seeds apart; nested (restricted) maps are column selections of the larger map."""
import numpy as np
import pytest
import torch

from entk_ray.config import Config, ConfigError, FeatureConfig
from entk_ray.distributed.testing import tiny_model
from entk_ray.feature_maps import (JLMap, SubsetMap, build_feature_map, parameter_blocks, parse_map_spec)
from entk_ray.features import select_parameters
from entk_ray.featurizer import Featurizer

SPECS = ["uniform", "head", "stratified", "last_blocks:2", "norm", "jl", "jl:gaussian"]


def per_example_gradients(model, names, x):
    """{name: (B, *shape)} from one autograd call per example (the definition of g(x))."""
    params = dict(model.named_parameters())
    rows = [torch.autograd.grad(model(x[i:i + 1]).sum(), [params[n] for n in names]) for i in range(x.shape[0])]
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


@pytest.mark.parametrize("spec", SPECS)
def test_phi_equals_map_of_autograd_gradient(spec):
    model = tiny_model(width=4)
    x = torch.randn(5, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    fmap = build_feature_map(model, spec, p=120, seed=3)
    grads = per_example_gradients(model, fmap.names, x)
    expected = fmap.from_gradients(grads)
    phi = fmap.computer(model)(x)
    assert phi.shape == (5, fmap.p)
    scale = expected.abs().max().item()
    # float32 sums in a different order: round-off only
    np.testing.assert_allclose(phi.detach().numpy(), expected.numpy(), rtol=1e-4, atol=1e-5 * scale)
    if isinstance(fmap, SubsetMap):  # independently of from_gradients: the selected coordinates of g
        local = fmap.per_parameter()
        direct = torch.cat([grads[n].reshape(5, -1)[:, local[n]] for n in fmap.names if n in local], 1)
        np.testing.assert_allclose(phi.detach().numpy(), direct.numpy(), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_jl_is_an_explicit_random_matrix_and_preserves_the_kernel(distribution):
    model = tiny_model(width=4)
    x = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    fmap = build_feature_map(model, f"jl:{distribution}", p=4000, seed=0)
    g = per_example_gradients(model, fmap.names, x)
    flat = torch.cat([g[n].reshape(6, -1) for n in fmap.names], 1).double()
    # R assembled from its chunks, as a dense matrix: Φ = g Rᵀ/√p
    blocks = []
    for name, shape in zip(fmap.names, fmap.shapes):
        size, c = int(np.prod(shape)), fmap.rows_per_chunk
        blocks += [fmap.chunk(name, i, min(c, size - s)) for i, s in enumerate(range(0, size, c))]
    dense = torch.cat(blocks, 0).double()
    values = set(np.unique(dense.numpy()).tolist())
    if distribution == "rademacher":
        assert values == {-1.0, 1.0}
    else:
        assert len(values) > 1000 and abs(dense.mean().item()) < 0.01 and abs(dense.std().item() - 1) < 0.01
    phi = fmap.computer(model)(x).double()
    np.testing.assert_allclose(phi.numpy(), (flat @ dense / np.sqrt(4000)).numpy(), rtol=1e-4,
                               atol=1e-5 * phi.abs().max().item())  # float32 products vs float64
    # E[ΦΦᵀ] = ggᵀ; with p = 4000 the relative error is O(√(2/p)) ≈ 2 %: allow 10 %
    k_exact, k_jl = flat @ flat.T, phi @ phi.T
    assert torch.linalg.matrix_norm(k_jl - k_exact) / torch.linalg.matrix_norm(k_exact) < 0.1


def test_uniform_is_todays_subset_with_its_fingerprint():
    model = tiny_model(width=4)
    for include_head in (False, True):
        before = select_parameters(model, 100, seed=5, include_head=include_head)
        fmap = build_feature_map(model, "uniform", 100, 5, include_head=include_head)
        assert fmap.fingerprint() == before.fingerprint()
        np.testing.assert_array_equal(fmap.flat_indices, before.flat_indices)
    featurizer = Featurizer.from_model(tiny_model(width=4), FeatureConfig(p=100, param_seed=5))
    assert featurizer.subset.fingerprint() == select_parameters(model, 100, seed=5).fingerprint()


def test_fingerprints_differ_across_maps_and_seeds():
    model = tiny_model(width=8)
    prints = {(spec, seed): build_feature_map(model, spec, 30, seed).fingerprint()  # 30 < every pool
              for spec in SPECS for seed in (0, 1)}
    assert len(set(prints.values())) == len(prints), prints
    assert build_feature_map(model, "jl", 30, 0).fingerprint() == prints[("jl", 0)]  # and stable


def test_subset_kinds_select_what_they_say():
    model = tiny_model(width=8)
    total = {n: p.numel() for n, p in model.named_parameters()}
    strat = build_feature_map(model, "stratified", 300, 0)
    backbone_total = sum(v for n, v in total.items() if n.startswith("backbone."))
    for name, idx in strat.per_parameter().items():  # the same fraction of every tensor, ± rounding
        assert abs(idx.numel() - 300 * total[name] / backbone_total) < 1.0, name
    assert strat.p == 300
    head = build_feature_map(model, "head", 10**6, 0)
    assert "head.weight" in head.per_parameter() and head.p == sum(total.values())
    norm = build_feature_map(model, "norm", 10**6, 0)
    assert set(norm.names) == {"backbone.1.weight", "backbone.1.bias", "backbone.4.weight", "backbone.4.bias"}
    last = build_feature_map(model, "last_blocks:2", 10**6, 0)
    assert set(last.names) == {"backbone.3.weight", "backbone.3.bias", "backbone.4.weight", "backbone.4.bias"}


def test_parameter_blocks_of_real_layouts():
    lite0 = ["backbone.conv_stem.weight", "backbone.bn1.weight", "backbone.blocks.0.0.conv_dw.weight",
             "backbone.blocks.5.1.conv_pw.weight", "backbone.blocks.5.1.se.conv_reduce.bias",
             "backbone.blocks.6.0.bn3.bias", "backbone.conv_head.weight", "backbone.bn2.bias"]
    assert parameter_blocks(lite0) == [lite0[:2], lite0[2:3], lite0[3:5], lite0[5:]]
    resnet = ["conv1.weight", "layer4.2.conv1.weight", "layer4.2.downsample.0.weight", "fc.weight"]
    assert parameter_blocks(resnet) == [resnet[:1], resnet[1:]]


@pytest.mark.parametrize("spec", ["uniform", "stratified", "norm", "jl"])
def test_restricted_map_is_a_column_selection(spec):
    model = tiny_model(width=4)
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    parent = build_feature_map(model, spec, 150 if spec != "norm" else 20, seed=2)
    small = 60 if spec != "norm" else 8
    child, columns, scale = parent.restrict(small, seed=7)
    assert child.p == small and len(columns) == small
    assert child.fingerprint() != parent.fingerprint()
    phi_parent = parent.computer(model)(x)
    phi_child = child.computer(model)(x)
    np.testing.assert_allclose(phi_child.detach().numpy(), scale * phi_parent[:, columns].detach().numpy(),
                               rtol=1e-5, atol=1e-6 * phi_parent.abs().max().item())  # round-off only
    if spec == "stratified":  # the child keeps the per-tensor fractions
        for name, idx in child.per_parameter().items():
            assert abs(idx.numel() - small * parent.per_parameter()[name].numel() / parent.p) < 1.0
    if isinstance(child, JLMap):
        assert child.draw_p == 150


def test_bad_specs_are_named():
    for bad, words in [("random", "unknown feature map"), ("last_blocks", "positive block count"),
                       ("jl:cauchy", "distribution"), ("norm:2", "takes no argument")]:
        with pytest.raises(ValueError, match=words):
            parse_map_spec(bad)
    with pytest.raises(ConfigError, match="features.map"):
        Config.from_dict({"features": {"map": "last_blocks:0"}}).validate(check_paths=False)
    Config.from_dict({"features": {"map": "jl:gaussian"}}).validate(check_paths=False)
