"""BREEDS benchmarks over a synthetic ImageNet tree: layouts, labels, sizes, errors, caches, S3."""
from __future__ import annotations

import io
import pickle
import random
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from entk_ray.config import ConfigError, DataConfig
from entk_ray.data import imagenet
from entk_ray.data.base import Benchmark
from entk_ray.data.breeds import imagenet_class_info, load_living17
from entk_ray.data.images import CorruptImagesError, ImageFileDataset
from entk_ray.data.imagenet import MissingClassesError, build_breeds_benchmark, index_imagenet, split_sizes
from entk_ray.data.transforms import eval_transform

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import MotoS3Server  # noqa: E402

TRAIN_PER_CLASS = 3
VAL_PER_CLASS = 2
DISTRACTORS = ["n01440764", "n01443537", "n15075141"]  # tench, goldfish, toilet tissue
LIVING17 = load_living17()
TINY = eval_transform(resize=10, crop=8)


# --------------------------------------------------------------------------- synthetic trees
def jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def all_wnids() -> list[str]:
    return LIVING17.source_wnids() + LIVING17.target_wnids() + DISTRACTORS


def wnid_color(wnid: str) -> tuple[int, int, int]:
    value = int(wnid[1:]) % (256**3)
    return (value % 256, (value // 256) % 256, (value // 65536) % 256)


def write_train(root: Path) -> None:
    for wnid in all_wnids():
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        data = jpeg_bytes(wnid_color(wnid))
        for i in range(TRAIN_PER_CLASS):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(data)


def val_assignment() -> list[str]:
    """wnid of ILSVRC2012_val_<i> for i = 1.. (shuffled, so classes are interleaved)."""
    wnids = [w for w in all_wnids() for _ in range(VAL_PER_CLASS)]
    random.Random(0).shuffle(wnids)
    return wnids


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}"


def write_val_folders(root: Path) -> None:
    for i, wnid in enumerate(val_assignment(), start=1):
        folder = root / "val" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{val_name(i)}.JPEG").write_bytes(jpeg_bytes(wnid_color(wnid)))


def write_val_flat(root: Path) -> None:
    (root / "val").mkdir(parents=True)
    for i, wnid in enumerate(val_assignment(), start=1):
        (root / "val" / f"{val_name(i)}.JPEG").write_bytes(jpeg_bytes(wnid_color(wnid)))


def devkit_ids() -> dict[str, int]:
    """A devkit-like ILSVRC2012_ID for every class: a shuffled order, unlike the sorted index."""
    wnids = [w for _, w, _ in imagenet_class_info()]
    random.Random(1).shuffle(wnids)
    return {w: i for i, w in enumerate(wnids, start=1)}


def write_loc_csv(path: Path) -> None:
    lines = ["ImageId,PredictionString"]
    for i, wnid in enumerate(val_assignment(), start=1):
        lines.append(f"{val_name(i)},{wnid} 1 2 10 11 {wnid} 0 0 5 5")
    path.write_text("\n".join(lines) + "\n")


def write_devkit_ground_truth(path: Path) -> None:
    ids = devkit_ids()
    path.write_text("".join(f"{ids[w]}\n" for w in val_assignment()))


def write_clsloc_mapping(path: Path) -> None:
    ids = devkit_ids()
    path.write_text("".join(f"{w} {i} class_{i}\n" for w, i in sorted(ids.items(), key=lambda kv: kv[1])))


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """Three ImageNet trees sharing train/: per-class val folders, flat val + Kaggle csv, flat val + devkit."""
    base = tmp_path_factory.mktemp("imagenet")
    folders, kaggle, devkit = base / "folders", base / "kaggle", base / "devkit"
    write_train(folders)
    write_val_folders(folders)
    for root in (kaggle, devkit):
        shutil.copytree(folders / "train", root / "train")
        write_val_flat(root)
    write_loc_csv(kaggle / "LOC_val_solution.csv")
    (devkit / "ILSVRC2012_devkit_t12" / "data").mkdir(parents=True)
    write_devkit_ground_truth(devkit / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt")
    write_clsloc_mapping(base / "devkit_mapping.txt")  # outside the root: passed explicitly
    return {"folders": folders, "kaggle": kaggle, "devkit": devkit, "mapping": base / "devkit_mapping.txt"}


def config(root, cache, **overrides) -> DataConfig:
    values = dict(benchmark="living17", imagenet_root=str(root), n_train=None, n_id_val=None, n_ood=None,
                  index_cache=str(cache))
    values.update(overrides)
    return DataConfig(**values)


def build(cfg, **kwargs) -> Benchmark:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic tree is (rightly) "not the full ImageNet"
        return build_breeds_benchmark(cfg, TINY, verbose=False, **kwargs)


def wnid_of(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    if name.startswith("ILSVRC2012_val_"):
        return val_assignment()[int(name[15:23]) - 1]
    return name.split("_")[0]


def assert_labels_follow_breeds(benchmark: Benchmark) -> None:
    source, target = LIVING17.label_of("source"), LIVING17.label_of("target")
    ood = benchmark.ood["living17_target"]
    for ds, truth in ((benchmark.train, source), (benchmark.id_val, source), (ood, target)):
        assert isinstance(ds.labels, np.ndarray) and ds.labels.dtype == np.int64
        assert [truth[wnid_of(p)] for p in ds.paths] == ds.labels.tolist()


# --------------------------------------------------------------------------- tests
def test_folder_layout_gives_living17_splits_with_superclass_labels(trees, tmp_path):
    benchmark = build(config(trees["folders"], tmp_path))
    assert split_sizes(benchmark) == {"train": 34 * TRAIN_PER_CLASS, "id_val": 34 * VAL_PER_CLASS,
                                      "living17_target": 34 * VAL_PER_CLASS}
    assert benchmark.class_names == list(LIVING17.superclass_names) and benchmark.num_classes == 17
    assert_labels_follow_breeds(benchmark)
    assert not any(wnid_of(p) in DISTRACTORS for ds in benchmark.eval_sets().values() for p in ds.paths)
    assert np.bincount(benchmark.train.labels).tolist() == [2 * TRAIN_PER_CLASS] * 17
    image, label = benchmark.ood["living17_target"][5]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert label == benchmark.ood["living17_target"].labels[5]
    assert benchmark.manifest["val_layout"] == "folders" and benchmark.manifest["sizes"]["train"] == 102


def test_flat_val_with_kaggle_csv_matches_folder_layout(trees, tmp_path):
    folders = build(config(trees["folders"], tmp_path))
    kaggle = build(config(trees["kaggle"], tmp_path))
    assert kaggle.manifest["val_layout"] == "flat"
    for split in ("id_val", "ood"):
        a = folders.id_val if split == "id_val" else folders.ood["living17_target"]
        b = kaggle.id_val if split == "id_val" else kaggle.ood["living17_target"]
        pairs = lambda ds: sorted((p.rsplit("/", 1)[-1], int(y)) for p, y in zip(ds.paths, ds.labels))  # noqa: E731
        assert pairs(a) == pairs(b)
    assert_labels_follow_breeds(kaggle)


def test_flat_val_with_devkit_ground_truth_needs_and_uses_the_id_mapping(trees, tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.mat"):
        build(config(trees["devkit"], tmp_path / "a"))
    benchmark = build(config(trees["devkit"], tmp_path / "b"), val_class_mapping=str(trees["mapping"]))
    assert split_sizes(benchmark)["living17_target"] == 68
    assert_labels_follow_breeds(benchmark)


def test_devkit_meta_mat_is_read_for_leaf_synsets(tmp_path):
    from scipy.io import savemat

    ids = devkit_ids()
    rows = [(i, w, "name", "gloss", 0) for w, i in ids.items()] + [(1001, "n00001740", "entity", "", 5)]
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                    ("gloss", "O"), ("num_children", "O")])
    savemat(tmp_path / "meta.mat", {"synsets": synsets.reshape(-1, 1)})
    mapping = imagenet.read_ilsvrc_id_mapping(str(tmp_path / "meta.mat"))
    assert mapping == {i: w for w, i in ids.items()}  # the non-leaf synset 1001 is left out


def test_id_mapping_text_formats_agree():
    ids = devkit_ids()
    ordered = [w for w, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    plain = imagenet.parse_id_mapping_text("\n".join(ordered))
    clsloc = imagenet.parse_id_mapping_text("\n".join(f"{w} {i} x" for w, i in reversed(list(ids.items()))))
    assert plain == clsloc == {i: w for w, i in ids.items()}
    with pytest.raises(ValueError, match="line 2"):
        imagenet.parse_id_mapping_text("n01440764 1\nn01443537 1")


def test_missing_class_folders_are_all_listed_before_any_folder_is_listed(trees, tmp_path, monkeypatch):
    root = tmp_path / "broken"
    shutil.copytree(trees["folders"], root)
    gone_train = LIVING17.source_wnids()[:2]
    gone_val = LIVING17.target_wnids()[-1]
    for wnid in gone_train:
        shutil.rmtree(root / "train" / wnid)
    shutil.rmtree(root / "val" / gone_val)
    monkeypatch.setattr(imagenet, "_find_files", lambda fs, path: pytest.fail(f"listed {path} before the check"))
    with pytest.raises(MissingClassesError) as info:
        build(config(root, tmp_path / "cache"))
    assert info.value.missing == {"train": sorted(gone_train), "val": [gone_val]}
    message = str(info.value)
    assert all(w in message for w in [*gone_train, gone_val]) and "train: 2 classes" in message


def test_second_build_reads_the_parquet_index_without_listing(trees, tmp_path, monkeypatch):
    cfg = config(trees["folders"], tmp_path)
    first = build(cfg)
    assert list(tmp_path.glob("imagenet-index-*.parquet"))

    def no_listing(*args, **kwargs):
        raise AssertionError("the filesystem was listed although the index is cached")

    monkeypatch.setattr(imagenet, "_list_entries", no_listing)
    monkeypatch.setattr(imagenet, "_find_files", no_listing)
    second = build(cfg)
    assert second.manifest == first.manifest
    assert second.train.paths == first.train.paths

    with pytest.raises(AssertionError, match="listed"):
        build(cfg, refresh_index=True)


def test_cached_index_is_extended_for_new_classes(trees, tmp_path, monkeypatch):
    root = str(trees["folders"])
    index_imagenet(root, {"train": DISTRACTORS[:1]}, cache_dir=str(tmp_path))
    calls = []
    original = imagenet._find_files
    monkeypatch.setattr(imagenet, "_find_files", lambda fs, path: calls.append(path) or original(fs, path))
    index = index_imagenet(root, {"train": DISTRACTORS[:2]}, cache_dir=str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in calls] == [DISTRACTORS[1]]
    assert index.count("train", DISTRACTORS[0]) == index.count("train", DISTRACTORS[1]) == TRAIN_PER_CLASS


def test_subsampling_is_seeded_stratified_and_checked(trees, tmp_path):
    cfg = config(trees["folders"], tmp_path, n_train=34, n_id_val=17, n_ood=20, seed=3)
    a, b = build(cfg), build(cfg)
    assert split_sizes(a) == {"train": 34, "id_val": 17, "living17_target": 20}
    assert a.train.paths == b.train.paths
    assert np.bincount(a.train.labels, minlength=17).tolist() == [2] * 17
    assert np.bincount(a.id_val.labels, minlength=17).tolist() == [1] * 17
    other = build(config(trees["folders"], tmp_path, n_train=34, n_id_val=17, n_ood=20, seed=4))
    assert other.train.paths != a.train.paths and other.manifest_hash() != a.manifest_hash()
    with pytest.raises(ConfigError, match=r"data\.n_train = 1000 exceeds the 102"):
        build(config(trees["folders"], tmp_path, n_train=1000))
    with pytest.raises(ConfigError, match=r"data\.n_ood = 69"):
        build(config(trees["folders"], tmp_path, n_ood=69))


def test_full_imagenet_check_warns_on_a_small_tree(trees, tmp_path):
    with pytest.warns(UserWarning, match="train has 102 images; the full ImageNet gives 44,200"):
        build_breeds_benchmark(config(trees["folders"], tmp_path), TINY, verbose=False)


def test_corrupt_images_fail_or_are_skipped(trees, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(trees["folders"], root)
    bad_train = root / "train" / LIVING17.source_wnids()[0] / f"{LIVING17.source_wnids()[0]}_1.JPEG"
    bad_train.write_bytes(b"not a jpeg at all")
    bad_val = next((root / "val" / LIVING17.target_wnids()[3]).iterdir())
    bad_val.write_bytes(b"")
    with pytest.raises(CorruptImagesError) as info:
        build(config(root, tmp_path / "c1"))
    assert str(bad_train) in str(info.value) and "1 of 102" in str(info.value)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        benchmark = build_breeds_benchmark(config(root, tmp_path / "c2", corrupt_policy="skip"), TINY, verbose=False)
    skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert skipped == ["train: skipped 1 unreadable images of 102 (data.corrupt_policy='skip')",
                       "living17_target: skipped 1 unreadable images of 68 (data.corrupt_policy='skip')"]
    assert split_sizes(benchmark) == {"train": 101, "id_val": 68, "living17_target": 67}
    assert str(bad_train) not in benchmark.train.paths and str(bad_val) not in benchmark.ood["living17_target"].paths

    unchecked = build(config(root, tmp_path / "c3"), corrupt_check="none")
    assert len(unchecked.train) == 102


def test_bad_settings_fail_before_touching_the_tree(tmp_path):
    missing_root = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="data.benchmark"):
        build_breeds_benchmark(config(missing_root, tmp_path, benchmark="digits"), TINY)
    with pytest.raises(ConfigError, match="data.corrupt_policy"):
        build_breeds_benchmark(config(missing_root, tmp_path, corrupt_policy="ignore"), TINY)
    with pytest.raises(ConfigError, match="data.n_id_val"):
        build_breeds_benchmark(config(missing_root, tmp_path, n_id_val=0), TINY)
    with pytest.raises(FileNotFoundError, match="train does not exist"):
        build_breeds_benchmark(config(missing_root, tmp_path), TINY)


def test_datasets_pickle_cheaply_and_load_after_unpickling(trees, tmp_path):
    benchmark = build(config(trees["folders"], tmp_path))
    blob = pickle.dumps(benchmark.train)
    assert len(blob) < 200 * len(benchmark.train)  # strings, not pixels
    clone: ImageFileDataset = pickle.loads(blob)
    image, label = clone[7]
    assert torch.equal(image, benchmark.train[7][0]) and label == benchmark.train.labels[7]


def test_manifest_tracks_the_transform(trees, tmp_path):
    cfg = config(trees["folders"], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = build_breeds_benchmark(cfg, eval_transform(resize=10, crop=8), verbose=False)
        b = build_breeds_benchmark(cfg, eval_transform(resize=12, crop=8), verbose=False)
    assert a.manifest["transform"]["steps"][0]["size"] == 10
    assert a.manifest_hash() != b.manifest_hash()


# --------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3():
    with MotoS3Server() as server:
        yield server


def test_living17_from_s3_and_cached_index(trees, s3, tmp_path, monkeypatch):
    bucket = s3.make_bucket("imagenet-living17")
    fs = s3.filesystem()
    local = trees["kaggle"]
    needed = set(LIVING17.source_wnids())
    for path in sorted(local.rglob("*")):
        rel = path.relative_to(local).as_posix()
        if path.is_file() and (not rel.startswith("train/") or rel.split("/")[1] in needed):
            fs.pipe_file(f"imagenet-living17/ilsvrc/{rel}", path.read_bytes())
    cfg = config(f"{bucket}/ilsvrc", tmp_path)
    benchmark = build(cfg, storage_options=s3.storage_options)
    assert split_sizes(benchmark) == {"train": 102, "id_val": 68, "living17_target": 68}
    assert benchmark.train.paths[0].startswith("s3://imagenet-living17/ilsvrc/train/")
    assert_labels_follow_breeds(benchmark)
    image, label = pickle.loads(pickle.dumps(benchmark.id_val))[0]
    assert image.shape == (3, 8, 8) and label == benchmark.id_val.labels[0]

    monkeypatch.setattr(imagenet, "_list_entries", lambda *a: pytest.fail("relisted S3"))
    monkeypatch.setattr(imagenet, "_find_files", lambda *a: pytest.fail("relisted S3"))
    again = build(cfg, storage_options=s3.storage_options)
    assert again.manifest == benchmark.manifest
