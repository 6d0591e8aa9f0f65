"""The digits-shift benchmark: MNIST-5k (ID) → optdigits (OOD), entk_ray.data.digits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from entk_ray.config import ConfigError, DataConfig
from entk_ray.data import digits as D
from entk_ray.data.base import Benchmark, TensorLabeledDataset

LITE0_MEAN, LITE0_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
RESNET_MEAN, RESNET_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return D.build_digits_benchmark(DataConfig(n_train=1000, n_id_val=500, n_ood=500, image_size=32), LITE0_MEAN, LITE0_STD)


# --------------------------------------------------------------------------------------------
# raw sources


def test_mnist_5k_file_format_pixels_first_label_last():
    images, labels = D.load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    # Were the label the first column, every "label" would be a border pixel (0).
    assert (images[:, 0, 0] == 0).all()
    assert not images.flags.writeable


def test_optdigits_matches_sklearn_load_digits():
    from sklearn.datasets import load_digits

    images, labels = D.load_optdigits()
    reference = load_digits()
    assert images.shape == (1797, 8, 8)
    assert np.array_equal(images, reference.images.astype(np.uint8))
    assert np.array_equal(labels, reference.target)


# --------------------------------------------------------------------------------------------
# preprocessing


def test_rectangle_is_fit_by_its_longer_side_and_centered():
    """A 10×5 ink box: height fills 32 rows, width becomes 16 px centered → block columns 2..5."""
    image = np.zeros((1, 28, 28), dtype=np.uint8)
    image[0, 5:15, 9:14] = 255
    counts = D.mnist_to_optdigits(image)[0]
    assert counts.shape == (8, 8) and counts.dtype == np.uint8
    assert (counts[:, [0, 1, 6, 7]] == 0).all()
    assert (counts[1:7, 2:6] == 16).all()
    assert (counts[[0, 7]][:, 2:6] >= 15).all()  # corner pixels: bilinear weight 0.66² < 0.5


def test_position_and_size_do_not_matter():
    """Optdigits is size- and position-normalized: a shifted, shrunk copy gives the same counts.

    Only the rectangle's corner pixels may differ (bilinear upscaling rounds sharp corners more
    when the scale factor is larger), by at most one pixel per corner block.
    """
    big = np.zeros((1, 28, 28), dtype=np.uint8)
    big[0, 2:26, 8:20] = 255  # 24×12
    small = np.zeros((1, 28, 28), dtype=np.uint8)
    small[0, 14:22, 3:7] = 255  # 8×4, same aspect, elsewhere
    diff = D.mnist_to_optdigits(big)[0].astype(int) - D.mnist_to_optdigits(small)[0].astype(int)
    corners = np.zeros((8, 8), dtype=bool)
    corners[[0, 0, 7, 7], [2, 5, 2, 5]] = True
    assert (diff[~corners] == 0).all()
    assert (np.abs(diff[corners]) <= 1).all()


def test_preprocessed_mnist_is_on_the_optdigits_scale():
    mnist, _ = D.load_mnist_5k_as_optdigits()
    optdigits, _ = D.load_optdigits()
    assert mnist.shape == (5000, 8, 8) and mnist.dtype == np.uint8
    assert mnist.min() == 0 and mnist.max() == 16 == optdigits.max()
    # Similar ink statistics (on-pixel counts per block; share of empty blocks).
    assert abs(mnist.mean() - optdigits.mean()) < 1.5
    assert abs((mnist == 0).mean() - (optdigits == 0).mean()) < 0.1
    # Like optdigits, the digit's longer side spans the whole 8×8 grid.
    rows, cols = (mnist > 0).any(axis=2).sum(axis=1), (mnist > 0).any(axis=1).sum(axis=1)
    assert (np.maximum(rows, cols) == 8).mean() > 0.99


def test_to_model_input_scales_upsamples_and_normalizes():
    counts, _ = D.load_optdigits()
    counts = counts[:4]
    same_size = D.to_model_input(counts, 8, RESNET_MEAN, RESNET_STD)
    assert same_size.shape == (4, 3, 8, 8) and same_size.dtype == torch.float32
    for c in range(3):
        unnormalized = same_size[:, c] * RESNET_STD[c] + RESNET_MEAN[c]
        torch.testing.assert_close(unnormalized, torch.tensor(counts / 16.0, dtype=torch.float32))
    upsampled = D.to_model_input(counts, 40, LITE0_MEAN, LITE0_STD)
    assert upsampled.shape == (4, 3, 40, 40)
    assert upsampled.min() >= -1.0 and upsampled.max() <= 1.0
    assert torch.equal(upsampled[:, 0], upsampled[:, 2])
    # bilinear upsampling keeps the mean intensity (up to border effects)
    torch.testing.assert_close(upsampled.mean(dim=(1, 2, 3)), same_size.new_tensor(counts / 8.0 - 1).mean(dim=(1, 2)), atol=0.03, rtol=0)


# --------------------------------------------------------------------------------------------
# the benchmark


def test_benchmark_shapes_labels_and_metadata(bench):
    assert bench.name == "digits" and bench.class_names == [str(d) for d in range(10)]
    assert bench.num_classes == 10 and list(bench.ood) == ["optdigits"]
    for split, size in ((bench.train, 1000), (bench.id_val, 500), (bench.ood["optdigits"], 500)):
        assert isinstance(split, TensorLabeledDataset)
        assert len(split) == size and split.images.shape == (size, 3, 32, 32)
        assert split.labels.dtype == np.int64 and split.labels.min() >= 0 and split.labels.max() <= 9
        image, label = split[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
        assert split.images.min() >= -1.0 and split.images.max() <= 1.0
    assert set(bench.train.labels.tolist()) == set(range(10))
    assert list(bench.eval_sets()) == ["id_val", "ood:optdigits"]


def test_splits_are_disjoint_and_consistent_with_their_sources(bench):
    train, val, ood = bench.train.source_indices, bench.id_val.source_indices, bench.ood["optdigits"].source_indices
    assert len(np.unique(train)) == 1000 and len(np.unique(val)) == 500 and len(np.unique(ood)) == 500
    assert np.intersect1d(train, val).size == 0
    assert train.min() >= 0 and max(train.max(), val.max()) < 5000 and 0 <= ood.min() and ood.max() < 1797
    mnist_counts, mnist_labels = D.load_mnist_5k_as_optdigits()
    opt_counts, opt_labels = D.load_optdigits()
    assert np.array_equal(bench.train.labels, mnist_labels[train])
    assert np.array_equal(bench.id_val.labels, mnist_labels[val])
    assert np.array_equal(bench.ood["optdigits"].labels, opt_labels[ood])
    expected = D.to_model_input(mnist_counts[train[:5]], 32, LITE0_MEAN, LITE0_STD)
    assert torch.equal(bench.train.images[:5], expected)
    expected_ood = D.to_model_input(opt_counts[ood[:5]], 32, LITE0_MEAN, LITE0_STD)
    assert torch.equal(bench.ood["optdigits"].images[:5], expected_ood)


def test_null_sizes_take_the_rest():
    everything = D.digits_split_indices(DataConfig(n_train=1200, n_id_val=None, n_ood=None))
    assert len(everything["train"]) == 1200 and len(everything["id_val"]) == 3800
    assert np.array_equal(np.sort(np.concatenate([everything["train"], everything["id_val"]])), np.arange(5000))
    assert np.array_equal(np.sort(everything["ood"]), np.arange(1797))
    rest = D.digits_split_indices(DataConfig(n_train=None, n_id_val=700, n_ood=10))
    assert len(rest["train"]) == 4300 and len(rest["id_val"]) == 700 and len(rest["ood"]) == 10


def test_same_seed_same_benchmark_other_seed_other_split(bench):
    again = D.build_digits_benchmark(DataConfig(n_train=1000, n_id_val=500, n_ood=500, image_size=32), LITE0_MEAN, LITE0_STD)
    assert torch.equal(again.train.images, bench.train.images)
    assert torch.equal(again.ood["optdigits"].images, bench.ood["optdigits"].images)
    assert np.array_equal(again.id_val.source_indices, bench.id_val.source_indices)
    assert again.manifest_hash() == bench.manifest_hash()
    other = D.build_digits_benchmark(DataConfig(seed=1, n_train=1000, n_id_val=500, n_ood=500, image_size=32), LITE0_MEAN, LITE0_STD)
    assert not np.array_equal(other.train.source_indices, bench.train.source_indices)
    assert not np.array_equal(other.ood["optdigits"].source_indices, bench.ood["optdigits"].source_indices)
    assert other.manifest_hash() != bench.manifest_hash()


def test_manifest_describes_everything_that_determines_the_data(bench):
    manifest = json.loads(json.dumps(bench.manifest))
    assert manifest["sizes"] == {"train": 1000, "id_val": 500, "optdigits": 500}
    assert manifest["seed"] == 0 and manifest["image_size"] == 32
    assert manifest["mean"] == [0.5] * 3 and manifest["std"] == [0.5] * 3
    assert manifest["preprocessing_version"] == D.DIGITS_PREPROCESSING_VERSION
    assert set(manifest["sources"]) == {"id", "optdigits"}
    resnet = D.build_digits_benchmark(DataConfig(n_train=20, n_id_val=20, n_ood=20, image_size=40), RESNET_MEAN, RESNET_STD)
    assert resnet.train.images.shape == (20, 3, 40, 40)
    assert resnet.manifest["std"] == list(RESNET_STD)
    assert resnet.manifest_hash() != bench.manifest_hash()


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"n_train": 6000}, r"data\.n_train = 6000 exceeds the 5000"),
        ({"n_id_val": 5001}, r"data\.n_id_val = 5001 exceeds the 5000"),
        ({"n_train": 4000, "n_id_val": 1500}, r"data\.n_train \+ data\.n_id_val = 4000 \+ 1500 = 5500 exceeds the 5000"),
        ({"n_ood": 2000}, r"data\.n_ood = 2000 exceeds the 1797"),
        ({"n_train": 5000, "n_id_val": None}, r"data\.n_id_val resolves to 0"),
        ({"n_train": None, "n_id_val": None}, r"data\.n_train and data\.n_id_val cannot both be null"),
    ],
)
def test_oversize_requests_fail_before_loading_data(monkeypatch, overrides, pattern):
    def must_not_load():
        raise AssertionError("data was loaded before the sizes were checked")

    monkeypatch.setattr(D, "load_mnist_5k_as_optdigits", must_not_load)
    monkeypatch.setattr(D, "load_optdigits", must_not_load)
    cfg = DataConfig(**{"n_train": 100, "n_id_val": 100, "n_ood": 100, **overrides})
    with pytest.raises(ConfigError, match=pattern):
        D.build_digits_benchmark(cfg, LITE0_MEAN, LITE0_STD)


def test_build_is_fast():
    import time

    start = time.perf_counter()
    D.build_digits_benchmark(DataConfig(seed=3), LITE0_MEAN, LITE0_STD)
    assert time.perf_counter() - start < 3.0
