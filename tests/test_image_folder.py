"""Image-folder benchmark, ImageFileDataset, corrupt-image policies, subsampling and transforms."""
from __future__ import annotations

import io
import json
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from entk_ray.config import ConfigError, DataConfig
from entk_ray.data import images as image_files
from entk_ray.data.base import subsample_indices
from entk_ray.data.image_folder import build_image_folder_benchmark
from entk_ray.data.images import CorruptImagesError, ImageFileDataset, ImageReadError, scan_images
from entk_ray.data.transforms import KUMAR_MEAN, KUMAR_STD, EvalTransform, eval_transform, eval_transform_for_crop

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import MotoS3Server  # noqa: E402

CLASSES = ["cat", "dog", "fish"]
TINY = eval_transform(resize=10, crop=8)


def image_bytes(mode: str, fmt: str, size=(12, 12), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write_split(folder: Path, per_class: int, classes=CLASSES) -> None:
    """Mixed formats and modes (RGB JPEG, grayscale PNG, RGBA PNG) plus files that are not images."""
    kinds = [("RGB", "JPEG", ".jpg"), ("L", "PNG", ".png"), ("RGBA", "PNG", ".PNG")]
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            mode, fmt, ext = kinds[i % len(kinds)]
            (folder / c / f"{c}_{i}{ext}").write_bytes(image_bytes(mode, fmt, seed=i))
        (folder / c / "notes.txt").write_text("not an image")
        (folder / c / ".hidden.jpg").write_bytes(b"ignored")
    (folder / "README.jpg").write_bytes(image_bytes("RGB", "JPEG"))  # no class folder: ignored


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("folders")
    write_split(base / "train", 4)
    (base / "train" / "fish" / "deeper").mkdir()
    (base / "train" / "fish" / "deeper" / "nested.jpg").write_bytes(image_bytes("RGB", "JPEG", seed=9))
    write_split(base / "val", 2)
    write_split(base / "sketch", 2)
    write_split(base / "photos", 3, classes=["cat", "dog"])
    return {"base": base, **{n: base / n for n in ("train", "val", "sketch", "photos")}}


def folder_config(folders, **overrides) -> DataConfig:
    values = dict(benchmark="image_folder", id_train_dir=str(folders["train"]), id_val_dir=str(folders["val"]),
                  ood_dirs=[str(folders["sketch"]), str(folders["photos"])], n_train=None, n_id_val=None, n_ood=None)
    values.update(overrides)
    return DataConfig(**values)


def build_quietly(cfg, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_image_folder_benchmark(cfg, TINY, verbose=False, **kwargs)


# --------------------------------------------------------------------------- the benchmark
def test_image_folder_benchmark_splits_labels_and_ood_keys(folders):
    with pytest.warns(UserWarning, match=r"no images for classes \['fish'\]"):
        benchmark = build_image_folder_benchmark(folder_config(folders), TINY, verbose=False)
    assert benchmark.class_names == CLASSES
    assert list(benchmark.ood) == ["sketch", "photos"]
    sizes = {"train": len(benchmark.train), "id_val": len(benchmark.id_val),
             **{k: len(v) for k, v in benchmark.ood.items()}}
    assert sizes == {"train": 13, "id_val": 6, "sketch": 6, "photos": 6}
    roots = {"train": folders["train"], "id_val": folders["val"], "sketch": folders["sketch"],
             "photos": folders["photos"]}
    splits = {"train": benchmark.train, "id_val": benchmark.id_val, **benchmark.ood}
    for key, ds in splits.items():
        folder_class = [Path(p).relative_to(roots[key]).parts[0] for p in ds.paths]
        assert [CLASSES[y] for y in ds.labels] == folder_class
        assert not any(p.endswith((".txt", ".hidden.jpg", "README.jpg")) for p in ds.paths)
    assert benchmark.manifest["sizes"] == sizes and benchmark.manifest["class_names"] == CLASSES


def test_unknown_class_in_an_eval_folder_is_an_error(folders, tmp_path):
    write_split(tmp_path / "odd", 1, classes=["cat", "zebra"])
    with pytest.raises(ConfigError, match=r"ood_dirs\[0\].*\['zebra'\]"):
        build_quietly(folder_config(folders, ood_dirs=[str(tmp_path / "odd")]))


def test_ood_folders_with_the_same_name_are_rejected(folders, tmp_path):
    write_split(tmp_path / "a" / "sketch", 1)
    with pytest.raises(ConfigError, match="sketch"):
        build_quietly(folder_config(folders, ood_dirs=[str(folders["sketch"]), str(tmp_path / "a" / "sketch")]))


def test_required_fields_and_sizes_are_checked(folders):
    with pytest.raises(ConfigError, match="data.id_val_dir"):
        build_quietly(folder_config(folders, id_val_dir=None))
    with pytest.raises(ConfigError, match="data.ood_dirs"):
        build_quietly(folder_config(folders, ood_dirs=[]))
    with pytest.raises(ConfigError, match=r"data\.n_ood = 7 exceeds the 6"):
        build_quietly(folder_config(folders, n_ood=7))
    small = build_quietly(folder_config(folders, n_train=6, n_ood=3))
    assert len(small.train) == 6 and np.bincount(small.train.labels).tolist() == [2, 2, 2]
    assert [len(v) for v in small.ood.values()] == [3, 3]


# --------------------------------------------------------------------------- the dataset
def test_dataset_decodes_any_mode_to_rgb_and_pickles(folders):
    paths = sorted(str(p) for p in folders["train"].glob("*/*_[0-2].*"))
    dataset = ImageFileDataset(paths, [0] * len(paths), transform=None)
    modes = {Image.open(p).mode for p in paths}
    assert modes == {"RGB", "L", "RGBA"}
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and label == 0
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[1][0], dataset[1][0])
    assert clone.subset([2, 0]).paths == [paths[2], paths[0]]
    with pytest.raises(ValueError, match="2 paths but 1 labels"):
        ImageFileDataset(paths[:2], [0])


def test_unreadable_image_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(ImageReadError, match="bad.jpg"):
        ImageFileDataset([str(bad)], [0])[0]


# --------------------------------------------------------------------------- corrupt images
def png_with_bad_checksum() -> bytes:
    """A PNG whose header parses but whose IDAT chunk fails its CRC (only ``verify()`` sees it)."""
    data = bytearray(image_bytes("RGB", "PNG"))
    data[data.index(b"IDAT") + 8] ^= 0xFF
    return bytes(data)


@pytest.fixture()
def damaged(tmp_path) -> dict[str, Path]:
    """A copy of a small tree with one garbage file and one truncated JPEG."""
    root = tmp_path / "train"
    write_split(root, 3)
    garbage = root / "dog" / "dog_1.png"
    garbage.write_bytes(b"\x89PNG not really")
    truncated = root / "cat" / "cat_big.jpg"
    whole = image_bytes("RGB", "JPEG", size=(64, 64))
    truncated.write_bytes(whole[: len(whole) // 2])
    return {"root": root, "garbage": garbage, "truncated": truncated}


def test_header_check_finds_garbage_and_decode_check_also_truncation(damaged):
    paths = sorted(str(p) for p in damaged["root"].glob("*/*") if image_files.has_image_extension(str(p)))
    header = scan_images(paths, check="header")
    decode = scan_images(paths, check="decode")
    assert [p for p, _ in header] == [str(damaged["garbage"])]
    assert sorted(p for p, _ in decode) == sorted([str(damaged["garbage"]), str(damaged["truncated"])])
    assert scan_images(paths, check="none") == []


def test_header_check_verifies_png_checksums(tmp_path):
    bad = tmp_path / "bad_crc.png"
    bad.write_bytes(png_with_bad_checksum())
    assert Image.open(bad).size == (12, 12)  # the header alone looks fine
    [(path, reason)] = scan_images([str(bad)], check="header")
    assert path == str(bad) and "checksum" in reason


def test_corrupt_policy_fail_names_files_and_skip_drops_them(damaged, tmp_path):
    cfg = DataConfig(benchmark="image_folder", id_train_dir=str(damaged["root"]), id_val_dir=str(damaged["root"]),
                     ood_dirs=[str(damaged["root"])], n_train=None, n_id_val=None, n_ood=None)
    with pytest.raises(CorruptImagesError) as info:
        build_quietly(cfg, corrupt_check="decode")
    assert {p for p, _ in info.value.corrupt} == {str(damaged["garbage"]), str(damaged["truncated"])}
    assert str(damaged["garbage"]) in str(info.value) and "2 of 10" in str(info.value)

    cfg.corrupt_policy = "skip"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        benchmark = build_image_folder_benchmark(cfg, TINY, corrupt_check="header", verbose=False)
    assert len(benchmark.train) == 9 and str(damaged["garbage"]) not in benchmark.train.paths
    assert any("train: skipped 1 unreadable images of 10" in str(w.message) for w in caught)
    assert len(build_quietly(cfg, corrupt_check="none").train) == 10


def test_scan_results_are_cached(damaged, tmp_path, monkeypatch):
    paths = sorted(str(p) for p in damaged["root"].glob("*/*") if image_files.has_image_extension(str(p)))
    cache = str(tmp_path / "scan.parquet")
    first = scan_images(paths, check="header", cache_file=cache)
    monkeypatch.setattr(image_files, "check_image", lambda *a: pytest.fail("re-read an image"))
    assert scan_images(paths, check="header", cache_file=cache) == first
    assert [p for p, _ in first] == [str(damaged["garbage"])]


# --------------------------------------------------------------------------- subsampling
def test_subsample_is_stratified_exact_and_seeded():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = subsample_indices(labels, 10, seed=1, field="n_train", split_name="train")
    assert len(idx) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert np.array_equal(idx, subsample_indices(labels, 10, seed=1, field="n_train", split_name="train"))
    assert not np.array_equal(idx, subsample_indices(labels, 10, seed=2, field="n_train", split_name="train"))
    assert len(subsample_indices(labels, 7, 0, "n_train", "train")) == 7  # remainders still add up
    assert np.array_equal(subsample_indices(labels, None, 0, "n_train", "train"), np.arange(100))
    with pytest.raises(ConfigError, match=r"data\.n_id_val = 101 exceeds the 100 examples available in id_val"):
        subsample_indices(labels, 101, 0, "n_id_val", "id_val")


# --------------------------------------------------------------------------- transforms
def test_eval_transform_matches_kumar_et_al():
    transform = eval_transform()
    assert (transform.resize, transform.crop, transform.mean, transform.std) == (256, 224, KUMAR_MEAN, KUMAR_STD)
    gray = Image.new("RGB", (400, 300), (128, 128, 128))
    out = transform(gray)
    assert out.shape == (3, 224, 224)
    expected = (128 / 255 - torch.tensor(KUMAR_MEAN)) / torch.tensor(KUMAR_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    description = transform.describe()
    assert json.loads(json.dumps(description)) == description
    assert description["steps"][3] == {"op": "normalize", "mean": list(KUMAR_MEAN), "std": list(KUMAR_STD)}
    clone: EvalTransform = pickle.loads(pickle.dumps(transform))
    assert clone == transform and torch.equal(clone(gray), out)


def test_eval_transform_parameters_are_validated():
    assert eval_transform_for_crop(32).resize == 37
    assert eval_transform(resize=40, crop=32).describe() != eval_transform(resize=36, crop=32).describe()
    with pytest.raises(ValueError, match="crop"):
        eval_transform(resize=100, crop=224)
    with pytest.raises(ValueError, match="std"):
        eval_transform(std=(0.2, 0.2))
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(interpolation="lanczos9")


# --------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3():
    with MotoS3Server() as server:
        yield server


def test_image_folder_benchmark_on_s3(folders, s3, tmp_path):
    bucket = s3.make_bucket("image-folders")
    fs = s3.filesystem()
    for path in folders["base"].rglob("*"):
        if path.is_file():
            fs.pipe_file(f"image-folders/data/{path.relative_to(folders['base']).as_posix()}", path.read_bytes())
    root = f"{bucket}/data"
    cfg = DataConfig(benchmark="image_folder", id_train_dir=f"{root}/train", id_val_dir=f"{root}/val",
                     ood_dirs=[f"{root}/sketch/"], n_train=None, n_id_val=None, n_ood=None,
                     index_cache=str(tmp_path))
    benchmark = build_quietly(cfg, storage_options=s3.storage_options)
    assert (len(benchmark.train), len(benchmark.id_val), list(benchmark.ood)) == (13, 6, ["sketch"])
    assert all(p.startswith("s3://image-folders/data/train/") for p in benchmark.train.paths)
    local = build_quietly(folder_config(folders, ood_dirs=[str(folders["sketch"])]))
    assert benchmark.train.labels.tolist() == local.train.labels.tolist()
    image, label = pickle.loads(pickle.dumps(benchmark.train))[3]
    assert torch.equal(image, local.train[3][0]) and label == local.train.labels[3]
    assert list(tmp_path.glob("image-scan-*-header.parquet"))


# --------------------------------------------------------------------------- issue 9: late failures, stale caches
def test_scan_cache_rescans_a_file_changed_after_a_clean_scan(tmp_path):
    """The cache is keyed by path plus size and modification time: a file damaged after a clean
    scan is read again (a truncation changes the size; a same-size overwrite the mtime)."""
    import os

    root = tmp_path / "train"
    write_split(root, 3)
    paths = sorted(str(p) for p in root.glob("*/*") if image_files.has_image_extension(str(p)))
    cache = str(tmp_path / "scan.parquet")
    assert scan_images(paths, check="decode", cache_file=cache) == []
    truncated, overwritten = root / "cat" / "cat_0.jpg", root / "dog" / "dog_1.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    size, mtime = overwritten.stat().st_size, overwritten.stat().st_mtime
    overwritten.write_bytes(b"\x89PNG not really".ljust(size, b"\0"))
    os.utime(overwritten, (mtime + 5, mtime + 5))
    assert overwritten.stat().st_size == size
    assert sorted(p for p, _ in scan_images(paths, check="decode", cache_file=cache)) == \
        sorted([str(truncated), str(overwritten)])


def test_empty_class_folder_is_warned_about(folders, tmp_path):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(folders["train"], train)
    (train / "zebra").mkdir()  # an empty class folder
    (train / "yak").mkdir()
    (train / "yak" / "notes.txt").write_text("no images here")
    cfg = folder_config(folders, id_train_dir=str(train))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        benchmark = build_image_folder_benchmark(cfg, TINY, verbose=False)
    messages = [str(w.message) for w in caught]
    assert any("zebra" in m and "yak" in m and "hold no images" in m and "id_train_dir" in m for m in messages), messages
    assert benchmark.class_names == ["cat", "dog", "fish"]


def test_truncated_jpeg_fails_in_the_feature_actor_once_not_retried(ray_local, tmp_path, damaged):
    """A JPEG cut after its header passes the header check, then fails to decode inside a feature
    actor: a CorruptImagesError naming the file and the options, after one attempt."""
    from entk_ray.config import Config
    from entk_ray.distributed import RayBackend
    from entk_ray.distributed.testing import TinyFeaturizerFactory

    damaged["garbage"].unlink()  # only the late failure is left: the header check passes
    root = damaged["root"]
    data = folder_config({"train": root, "val": root, "sketch": root, "photos": root}, ood_dirs=[str(root)])
    benchmark = build_quietly(data, corrupt_check="header")
    assert str(damaged["truncated"]) in benchmark.train.paths
    cfg = Config()
    cfg.features.p, cfg.features.batch_size, cfg.ray.shard_size = 100, 4, 4
    cfg.store.out_dir = str(tmp_path / "out")
    backend = RayBackend(cfg, featurizer_factory=TinyFeaturizerFactory(cfg.features), store=None)
    with pytest.raises(CorruptImagesError) as info:
        backend.kernels(cfg, benchmark, progress=False)
    message = str(info.value)
    assert message.startswith(f"cannot read image {damaged['truncated']}")  # its own line, not Ray's traceback
    assert "--corrupt-check decode" in message and "--corrupt-policy skip" in message
    assert backend.stats["shard_failures"] == 1  # the failed shard was not requeued
