"""BREEDS benchmarks (Living-17, ...) over an ImageNet tree on a local disk or ``s3://``.

Expected tree under ``data.imagenet_root`` (a local path or ``s3://bucket/prefix``)::

    train/<wnid>/*.JPEG                    the 1,000 training folders
    val/<wnid>/*.JPEG                      validation, one folder per class ("folders" layout)
    val/ILSVRC2012_val_00000001.JPEG ...   or flat ("flat" layout) plus one ground-truth file:

Ground truth for a flat ``val/`` (pass paths explicitly, or put the file at one of the places
listed in :data:`GROUND_TRUTH_CANDIDATES` / :data:`CLASS_MAPPING_CANDIDATES`, relative to the root):

* ``LOC_val_solution.csv`` (Kaggle): ``ImageId,PredictionString``; the first token of
  ``PredictionString`` is the image's wnid. Self-contained.
* ``ILSVRC2012_validation_ground_truth.txt`` (devkit): line *i* holds the 1-based
  ``ILSVRC2012_ID`` of ``ILSVRC2012_val_<i:08d>.JPEG``. These IDs follow the **devkit's** class
  order (``meta.mat``: ID 1 is n02119789 "kit fox"), *not* torchvision's 0..999 sorted-wnid order
  of ``dataset_class_info.json``, so a mapping ID → wnid is required. It may be:

  - the devkit's ``data/meta.mat`` (read with scipy; leaf synsets only), or
  - a text file with one class per line, either ``<wnid>`` alone (line *i* is ID *i*) or
    ``<wnid> <ILSVRC2012_ID> [name]`` (the devkit's ``map_clsloc.txt`` format).

  There is deliberately no fallback to the sorted order: it would silently mislabel every image.

The file index (which image files exist per split and class) is cached as Parquet in a cache
folder, keyed by the root (and S3 endpoint, and explicit ground-truth files), so a rerun does not
list S3 again. Only the class folders a benchmark needs are listed (a flat ``val/`` is listed
once, whole); classes listed later are added to the same cache file. A stale cache (images added
or removed) is rebuilt with ``refresh_index=True`` or by deleting the file.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from entk_ray.config import ConfigError
from entk_ray.data.base import Benchmark, report_sizes, subsample_indices
from entk_ray.data.breeds import BREEDS_BENCHMARKS, BreedsSplit, breeds_split
from entk_ray.data.images import (ImageFileDataset, check_corrupt_settings, drop_or_fail_on_corrupt,
                                  file_list_digest, has_image_extension, scan_cache_path)
from entk_ray.errors import UserInputError
from entk_ray.fingerprints import digest
from entk_ray.storage import as_url, filesystem_for, join_url, read_parquet, write_parquet

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
WNID_PATTERN = re.compile(r"^n\d{8}$")
INDEX_FORMAT_VERSION = 1
INDEX_METADATA_KEY = b"entk_ray.imagenet_index"

# ILSVRC2012-CLS: 50 validation images per class; 732..1,300 training images per class.
VAL_IMAGES_PER_CLASS = 50
TRAIN_IMAGES_PER_CLASS = (732, 1300)
# Exact split sizes on the full ImageNet where they are known (BREEDS: Living-17 has 88,400
# training images over its 68 classes, i.e. 1,300 for each).
FULL_IMAGENET_SIZES = {"living17": {"train": 44_200, "id_val": 1_700, "living17_target": 1_700}}

GROUND_TRUTH_CANDIDATES = (
    "LOC_val_solution.csv",
    "val/LOC_val_solution.csv",
    "ILSVRC2012_validation_ground_truth.txt",
    "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
)
CLASS_MAPPING_CANDIDATES = (
    "ILSVRC2012_devkit_t12/data/meta.mat",
    "meta.mat",
    "map_clsloc.txt",
    "ILSVRC2012_devkit_t12/data/map_clsloc.txt",
)


class MissingClassesError(UserInputError, FileNotFoundError):
    """Class folders (or validation ground truth) required by a benchmark are absent."""

    def __init__(self, message: str, missing: dict[str, list[str]]):
        super().__init__(message)
        self.missing = missing


# --------------------------------------------------------------------------- the index
@dataclass
class ImageNetIndex:
    """Image files of an ImageNet tree: per split, the classes present and the listed files.

    ``available[split]`` are the wnids that have a folder (for a flat ``val/``: that have images
    in the ground truth); ``files[split][wnid]`` are sorted paths relative to ``root`` for the
    classes listed so far.
    """

    root: str
    val_layout: str | None = None  # "folders" or "flat"
    available: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {s: {} for s in SPLITS})

    def image_urls(self, split: str, wnid: str) -> list[str]:
        return [join_url(self.root, rel) for rel in self.files[split][wnid]]

    def count(self, split: str, wnid: str) -> int:
        return len(self.files[split].get(wnid, ()))

    # ---- Parquet round trip
    def to_table(self):
        import pyarrow as pa

        rows = [(s, w, rel) for s in SPLITS for w, rels in sorted(self.files[s].items()) for rel in rels]
        table = pa.table(
            {
                "split": pa.array([r[0] for r in rows], pa.string()).dictionary_encode(),
                "wnid": pa.array([r[1] for r in rows], pa.string()).dictionary_encode(),
                "path": pa.array([r[2] for r in rows], pa.string()),
            }
        )
        meta = {
            "version": INDEX_FORMAT_VERSION,
            "root": self.root,
            "val_layout": self.val_layout,
            "available": self.available,
            "listed": {s: sorted(self.files[s]) for s in SPLITS},
        }
        return table.replace_schema_metadata({INDEX_METADATA_KEY: json.dumps(meta).encode()})

    @classmethod
    def from_table(cls, table) -> "ImageNetIndex":
        meta = json.loads((table.schema.metadata or {})[INDEX_METADATA_KEY])
        if meta.get("version") != INDEX_FORMAT_VERSION:
            raise ValueError(f"index format version {meta.get('version')} != {INDEX_FORMAT_VERSION}")
        files: dict[str, dict[str, list[str]]] = {s: {w: [] for w in meta["listed"].get(s, [])} for s in SPLITS}
        columns = table.to_pydict()
        for split, wnid, rel in zip(columns["split"], columns["wnid"], columns["path"]):
            files[split][wnid].append(rel)
        return cls(meta["root"], meta["val_layout"], meta["available"], files)


def default_index_cache_dir() -> str:
    """``$ENTK_RAY_CACHE/index`` or ``~/.cache/entk_ray/index``."""
    base = os.environ.get("ENTK_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "entk_ray")
    return os.path.join(base, "index")


def index_cache_path(
    cache_dir: str,
    root_url: str,
    storage_options: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The cache file for ``root_url``: keyed by the root, the S3 endpoint (never credentials) and ``extra``."""
    options = storage_options or {}
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url")
    key = digest({"root": root_url, "endpoint": endpoint, **(extra or {})})
    return join_url(cache_dir, f"imagenet-index-{key}.parquet")


def _load_cached_index(path: str, root_url: str, storage_options: dict[str, Any]) -> ImageNetIndex | None:
    fs, inner = filesystem_for(path, storage_options)
    if not fs.exists(inner):
        return None
    try:
        index = ImageNetIndex.from_table(read_parquet(path, storage_options))
    except Exception as exc:  # unreadable or old cache: rebuild rather than fail
        warnings.warn(f"ignoring unreadable ImageNet index cache {path}: {exc}", stacklevel=3)
        return None
    if index.root != root_url:
        warnings.warn(f"ignoring ImageNet index cache {path}: it indexes {index.root}, not {root_url}", stacklevel=3)
        return None
    return index


def _save_index(index: ImageNetIndex, path: str, storage_options: dict[str, Any]) -> None:
    write_parquet(index.to_table(), path, storage_options)


# ---- listing (module-level so tests can count or forbid calls)
def _list_entries(fs, path: str) -> list[dict[str, Any]]:
    """One directory level: ``[{"name": ..., "type": "file" | "directory", ...}]``."""
    return fs.ls(path, detail=True)


def _find_files(fs, path: str) -> list[str]:
    """Every file below ``path`` (recursive)."""
    return fs.find(path)


def index_imagenet(
    root: str,
    wnids: dict[str, Iterable[str]],
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    val_ground_truth: str | None = None,
    val_class_mapping: str | None = None,
    refresh: bool = False,
) -> ImageNetIndex:
    """Index the images of the classes ``wnids[split]`` (split: "train" / "val") under ``root``.

    Uses and extends the Parquet cache in ``cache_dir`` (``None``: :func:`default_index_cache_dir`).
    Raises :class:`MissingClassesError` listing every absent class folder, before listing any
    folder's contents. ``refresh=True`` ignores the cache and lists again.
    """
    options = dict(storage_options or {})
    wanted = {split: list(dict.fromkeys(ws)) for split, ws in wnids.items()}
    unknown = sorted(set(wanted) - set(SPLITS))
    if unknown:
        raise ValueError(f"ImageNet splits must be among {SPLITS}, got {unknown}")
    fs, base = filesystem_for(root, options)
    base = base.rstrip("/")
    root_url = as_url(fs, base)
    cache_file = index_cache_path(
        cache_dir or default_index_cache_dir(),
        root_url,
        options,
        {"val_ground_truth": val_ground_truth, "val_class_mapping": val_class_mapping},
    )
    index = None if refresh else _load_cached_index(cache_file, root_url, options)
    if index is None:
        index = ImageNetIndex(root_url)
        fs.invalidate_cache(base)
    changed = False

    for split in wanted:
        if split not in index.available:
            _discover_split(index, fs, base, split, options, val_ground_truth, val_class_mapping)
            changed = True
    absent = {s: [w for w in ws if w not in index.available[s]] for s, ws in wanted.items()}
    _raise_if_missing(root_url, absent, "no folder" if index.val_layout != "flat" else "no folder / no val images")

    for split, ws in wanted.items():
        todo = [w for w in ws if w not in index.files[split]]
        for wnid in todo:
            found = _find_files(fs, f"{base}/{split}/{wnid}")
            index.files[split][wnid] = sorted(_relative(p, base) for p in found if has_image_extension(p))
        changed = changed or bool(todo)
    empty = {s: [w for w in ws if not index.files[s][w]] for s, ws in wanted.items()}
    _raise_if_missing(root_url, empty, "no images in their folder")

    if changed:
        _save_index(index, cache_file, options)
        logger.info("ImageNet index for %s saved to %s", root_url, cache_file)
    else:
        logger.info("ImageNet index for %s read from %s", root_url, cache_file)
    return index


def _relative(path: str, base: str) -> str:
    if not path.startswith(base + "/"):
        raise ValueError(f"listed path {path!r} is not under {base!r}")
    return path[len(base) + 1:]


def _raise_if_missing(root_url: str, missing: dict[str, list[str]], what: str) -> None:
    missing = {s: ws for s, ws in missing.items() if ws}
    if not missing:
        return
    lines = [f"  {split}: {len(ws)} classes with {what}: {' '.join(ws)}" for split, ws in missing.items()]
    raise MissingClassesError(
        f"ImageNet tree {root_url} lacks classes the benchmark needs:\n" + "\n".join(lines), missing
    )


def _discover_split(
    index: ImageNetIndex,
    fs,
    base: str,
    split: str,
    options: dict[str, Any],
    val_ground_truth: str | None,
    val_class_mapping: str | None,
) -> None:
    """Fill ``index.available[split]`` (and, for a flat ``val/``, its files) from one listing."""
    split_dir = f"{base}/{split}"
    if not fs.isdir(split_dir):
        raise FileNotFoundError(
            f"{join_url(index.root, split)} does not exist: expected an ImageNet tree with "
            f"train/<wnid>/*.JPEG and val/ (per-class folders, or flat with a ground-truth file)"
        )
    entries = _list_entries(fs, split_dir)
    folders = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    wnid_folders = [f for f in folders if WNID_PATTERN.match(f)]
    if split == "train" or wnid_folders:
        index.available[split] = wnid_folders
        if split == "val":
            index.val_layout = "folders"
        return
    images = [e["name"] for e in entries if e["type"] != "directory" and has_image_extension(e["name"])]
    if not images:
        raise FileNotFoundError(f"{join_url(index.root, 'val')} has neither <wnid> folders nor images")
    labels = read_val_ground_truth(fs, base, options, val_ground_truth, val_class_mapping)
    by_wnid: dict[str, list[str]] = {}
    unlabelled = []
    for path in images:
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        wnid = labels.get(stem)
        if wnid is None:
            unlabelled.append(path)
        else:
            by_wnid.setdefault(wnid, []).append(_relative(path, base))
    if unlabelled:
        warnings.warn(f"{len(unlabelled)} images in flat val/ have no ground truth and are ignored", stacklevel=3)
    index.val_layout = "flat"
    index.available["val"] = sorted(by_wnid)
    index.files["val"] = {w: sorted(ps) for w, ps in sorted(by_wnid.items())}


# --------------------------------------------------------------------------- validation ground truth
def read_val_ground_truth(
    fs,
    base: str,
    storage_options: dict[str, Any] | None = None,
    val_ground_truth: str | None = None,
    val_class_mapping: str | None = None,
) -> dict[str, str]:
    """Map validation image stems (``ILSVRC2012_val_00000001``) to wnids (see module doc)."""
    gt_path = val_ground_truth or _first_existing(fs, base, GROUND_TRUTH_CANDIDATES)
    if gt_path is None:
        raise FileNotFoundError(
            f"flat val/ under {as_url(fs, base)} needs ground truth: put LOC_val_solution.csv or "
            f"ILSVRC2012_validation_ground_truth.txt (+ meta.mat) at one of {GROUND_TRUTH_CANDIDATES}, "
            f"or pass val_ground_truth"
        )
    text = _read_text(gt_path, storage_options)
    if gt_path.lower().endswith(".csv"):
        return parse_loc_val_solution(text, source=gt_path)
    mapping_path = val_class_mapping or _first_existing(fs, base, CLASS_MAPPING_CANDIDATES)
    if mapping_path is None:
        raise FileNotFoundError(
            f"{gt_path} holds devkit ILSVRC2012_IDs, which need the devkit's ID → wnid mapping "
            f"(meta.mat, or a text file of wnids in ILSVRC2012_ID order); none found at "
            f"{CLASS_MAPPING_CANDIDATES} — pass val_class_mapping. (torchvision's sorted-wnid order "
            f"is a different order and must not be used.)"
        )
    id_to_wnid = read_ilsvrc_id_mapping(mapping_path, storage_options)
    return parse_devkit_ground_truth(text, id_to_wnid, source=gt_path)


def _first_existing(fs, base: str, candidates: Sequence[str]) -> str | None:
    for rel in candidates:
        if fs.exists(f"{base}/{rel}"):
            return as_url(fs, f"{base}/{rel}")
    return None


def _read_bytes(path: str, storage_options: dict[str, Any] | None) -> bytes:
    fs, inner = filesystem_for(path, storage_options)
    with fs.open(inner, "rb") as fh:
        return fh.read()


def _read_text(path: str, storage_options: dict[str, Any] | None) -> str:
    return _read_bytes(path, storage_options).decode("utf-8-sig")


def parse_loc_val_solution(text: str, source: str = "LOC_val_solution.csv") -> dict[str, str]:
    """Kaggle's ``ImageId,PredictionString`` → ``{ImageId: first token of PredictionString}``."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise ValueError(f"{source}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
    out = {}
    for line_no, row in enumerate(reader, start=2):
        tokens = (row["PredictionString"] or "").split()
        if not tokens or not WNID_PATTERN.match(tokens[0]):
            raise ValueError(
                f"{source} line {line_no}: PredictionString must start with a wnid, got {row['PredictionString']!r}"
            )
        out[row["ImageId"].strip()] = tokens[0]
    return out


def parse_devkit_ground_truth(text: str, id_to_wnid: dict[int, str], source: str = "ground truth") -> dict[str, str]:
    """Devkit ``ILSVRC2012_validation_ground_truth.txt`` → ``{ILSVRC2012_val_<i:08d>: wnid}``."""
    out = {}
    for i, line in enumerate((ln for ln in text.splitlines() if ln.strip()), start=1):
        try:
            class_id = int(line.strip())
        except ValueError as exc:
            raise ValueError(f"{source} line {i}: expected an ILSVRC2012_ID, got {line.strip()!r}") from exc
        if class_id not in id_to_wnid:
            raise ValueError(f"{source} line {i}: ILSVRC2012_ID {class_id} is not in the class mapping")
        out[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[class_id]
    return out


def read_ilsvrc_id_mapping(path: str, storage_options: dict[str, Any] | None = None) -> dict[int, str]:
    """ILSVRC2012_ID (1-based, devkit order) → wnid, from ``meta.mat`` or a text mapping file."""
    data = _read_bytes(path, storage_options)
    if path.lower().endswith(".mat"):
        return parse_devkit_meta_mat(data)
    return parse_id_mapping_text(data.decode("utf-8-sig"), source=path)


def parse_devkit_meta_mat(data: bytes) -> dict[int, str]:
    """The leaf synsets (``num_children == 0``) of the devkit's ``meta.mat``: ID → wnid."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
    out = {}
    for row in np.atleast_1d(synsets):
        if int(row["num_children"]) == 0:
            out[int(row["ILSVRC2012_ID"])] = str(row["WNID"])
    return out


def parse_id_mapping_text(text: str, source: str = "class mapping") -> dict[int, str]:
    """Lines ``<wnid>`` (line i ↦ ID i) or ``<wnid> <ILSVRC2012_ID> [name]`` → ID → wnid."""
    out: dict[int, str] = {}
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    for i, tokens in enumerate(lines, start=1):
        if not WNID_PATTERN.match(tokens[0]):
            raise ValueError(f"{source} line {i}: expected a wnid first, got {tokens[0]!r}")
        class_id = int(tokens[1]) if len(tokens) > 1 and tokens[1].isdigit() else i
        if class_id in out:
            raise ValueError(f"{source} line {i}: ILSVRC2012_ID {class_id} appears twice")
        out[class_id] = tokens[0]
    return out


# --------------------------------------------------------------------------- the benchmark
def full_imagenet_warnings(
    name: str, split: BreedsSplit, index: ImageNetIndex, available: dict[str, int]
) -> list[str]:
    """Ways in which the indexed tree differs from the full ILSVRC2012 (each a sentence)."""
    problems = []
    low, high = TRAIN_IMAGES_PER_CLASS
    odd_train = {w: index.count("train", w) for w in split.source_wnids()}
    odd_train = {w: c for w, c in odd_train.items() if not low <= c <= high}
    if odd_train:
        problems.append(
            f"{len(odd_train)} source classes have a train image count outside ImageNet's {low}..{high}: "
            + ", ".join(f"{w}={c}" for w, c in sorted(odd_train.items())[:10])
        )
    odd_val = {w: index.count("val", w) for w in split.source_wnids() + split.target_wnids()}
    odd_val = {w: c for w, c in odd_val.items() if c != VAL_IMAGES_PER_CLASS}
    if odd_val:
        problems.append(
            f"{len(odd_val)} classes do not have ImageNet's {VAL_IMAGES_PER_CLASS} val images: "
            + ", ".join(f"{w}={c}" for w, c in sorted(odd_val.items())[:10])
        )
    for key, expected in FULL_IMAGENET_SIZES.get(name, {}).items():
        if available[key] != expected:
            problems.append(f"{key} has {available[key]:,} images; the full ImageNet gives {expected:,}")
    return problems


def build_breeds_benchmark(
    data_cfg,
    transform: Callable | None = None,
    name: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    corrupt_check: str = "header",
    val_ground_truth: str | None = None,
    val_class_mapping: str | None = None,
    refresh_index: bool = False,
    scan_threads: int = 16,
    verbose: bool = True,
) -> Benchmark:
    """A BREEDS benchmark over the ImageNet tree at ``data_cfg.imagenet_root``.

    Train = ImageNet train images of the source subclasses; ``id_val`` = val images of the source
    subclasses; OOD ``"<name>_target"`` = val images of the target subclasses; label = superclass.
    On the full ImageNet, Living-17 gives 44,200 / 1,700 / 1,700 (a warning says when it differs).
    ``n_train`` / ``n_id_val`` / ``n_ood`` subsample (seeded by ``data_cfg.seed``, stratified by
    superclass); the kept images are then checked (``corrupt_check``: "header", "decode", "none")
    and ``data_cfg.corrupt_policy`` applies; scan results are cached beside the file index, so a
    rerun reads no image for the check. ``refresh_index=True`` lists and scans afresh.
    ``name`` defaults to ``data_cfg.benchmark``; the index cache folder is ``cache_dir``, else
    ``data_cfg.index_cache``, else :func:`default_index_cache_dir`; ``storage_options`` are fsspec
    options for ``s3://`` roots. The available and final sizes are printed (``verbose``), logged
    and stored in ``manifest["available"]`` / ``manifest["sizes"]``.
    """
    from entk_ray.data.transforms import eval_transform

    name = name or data_cfg.benchmark
    _check_breeds_settings(data_cfg, name, corrupt_check)
    transform = transform if transform is not None else eval_transform()
    split = breeds_split(name)
    options = dict(storage_options or {})
    cache_dir = cache_dir or data_cfg.index_cache or default_index_cache_dir()

    # 1. The file index of the subclasses the split uses (cached as Parquet).
    index = index_imagenet(
        data_cfg.imagenet_root,
        {"train": split.source_wnids(), "val": split.source_wnids() + split.target_wnids()},
        storage_options=options,
        cache_dir=cache_dir,
        val_ground_truth=val_ground_truth,
        val_class_mapping=val_class_mapping,
        refresh=refresh_index,
    )
    # 2. Every available image of each split, labelled by superclass.
    full = _breeds_splits(index, split, name)
    available = {k: len(paths) for k, (paths, _) in full.items()}
    problems = full_imagenet_warnings(name, split, index, available)
    if problems:
        message = f"{name} on {index.root} differs from the full ImageNet:\n" + "\n".join(f"  - {p}" for p in problems)
        warnings.warn(message, stacklevel=2)
    # 3. Subsample (every size is checked before any image is read), then drop or fail on corrupt images.
    selected = _subsample_splits(full, data_cfg, transform, options)
    scan_cache = scan_cache_path(cache_dir, [index.root], corrupt_check)
    if refresh_index:
        _remove_if_exists(scan_cache, options)
    datasets = {
        key: drop_or_fail_on_corrupt(ds, data_cfg.corrupt_policy, key, corrupt_check, scan_threads, scan_cache)
        for key, ds in selected.items()
    }
    sizes = {key: len(ds) for key, ds in datasets.items()}
    report_sizes(f"{name} (available {', '.join(f'{k} {v:,}' for k, v in available.items())})", sizes, verbose)
    # 4. The benchmark and the manifest its artifacts are keyed by.
    ood_key = f"{name}_target"
    return Benchmark(
        name=name,
        class_names=list(split.superclass_names),
        train=datasets["train"],
        id_val=datasets["id_val"],
        ood={ood_key: datasets[ood_key]},
        manifest=_breeds_manifest(name, index, split, data_cfg, available, datasets, corrupt_check, transform),
    )


def _check_breeds_settings(data_cfg, name: str, corrupt_check: str) -> None:
    if name not in BREEDS_BENCHMARKS:
        raise ConfigError(f"data.benchmark must be one of {', '.join(BREEDS_BENCHMARKS)} for ImageNet; got {name!r}")
    if not data_cfg.imagenet_root:
        raise ConfigError(f"data.imagenet_root is required for data.benchmark={name!r}")
    check_corrupt_settings(data_cfg.corrupt_policy, corrupt_check)
    for field_name in ("n_train", "n_id_val", "n_ood"):
        value = getattr(data_cfg, field_name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"data.{field_name} must be a positive integer or null, got {value!r}")


def _breeds_splits(index: ImageNetIndex, split: BreedsSplit, name: str) -> dict[str, tuple[list[str], np.ndarray]]:
    """(urls, superclass labels) of every available image: train, id_val and ``<name>_target``."""
    return {
        "train": _labelled_urls(index, "train", split.source),
        "id_val": _labelled_urls(index, "val", split.source),
        f"{name}_target": _labelled_urls(index, "val", split.target),
    }


def _subsample_splits(full: dict[str, tuple[list[str], np.ndarray]], data_cfg, transform,
                      storage_options: dict[str, Any]) -> dict[str, ImageFileDataset]:
    """Seeded, superclass-stratified samples of ``n_train`` / ``n_id_val`` / ``n_ood`` images."""
    fields = {"train": ("n_train", data_cfg.n_train), "id_val": ("n_id_val", data_cfg.n_id_val)}
    selected = {}
    for key, (paths, labels) in full.items():
        field_name, n = fields.get(key, ("n_ood", data_cfg.n_ood))
        keep = subsample_indices(labels, n, data_cfg.seed, field_name, key)
        selected[key] = ImageFileDataset([paths[i] for i in keep], labels[keep], transform, storage_options)
    return selected


def _breeds_manifest(name: str, index: ImageNetIndex, split: BreedsSplit, data_cfg, available: dict[str, int],
                     datasets: dict[str, ImageFileDataset], corrupt_check: str, transform) -> dict[str, Any]:
    from entk_ray.data.transforms import describe_transform

    return {
        "benchmark": name,
        "imagenet_root": index.root,
        "val_layout": index.val_layout,
        "breeds_split": digest(split.to_dict()),
        "class_names": list(split.superclass_names),
        "seed": data_cfg.seed,
        "requested": {"n_train": data_cfg.n_train, "n_id_val": data_cfg.n_id_val, "n_ood": data_cfg.n_ood},
        "available": available,
        "sizes": {key: len(ds) for key, ds in datasets.items()},
        "files": {key: file_list_digest(ds.paths, ds.labels) for key, ds in datasets.items()},
        "corrupt_policy": data_cfg.corrupt_policy,
        "corrupt_check": corrupt_check,
        "transform": describe_transform(transform),
    }


def _remove_if_exists(path: str, storage_options: dict[str, Any]) -> None:
    fs, inner = filesystem_for(path, storage_options)
    if fs.exists(inner):
        fs.rm(inner)


def _labelled_urls(index: ImageNetIndex, split: str, groups: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """All images of the subclasses in ``groups`` with their superclass label (group position)."""
    paths: list[str] = []
    labels: list[int] = []
    for label, wnids in enumerate(groups):
        for wnid in wnids:
            urls = index.image_urls(split, wnid)
            paths.extend(urls)
            labels.extend([label] * len(urls))
    return paths, np.asarray(labels, dtype=np.int64)


def split_sizes(benchmark: Benchmark) -> dict[str, int]:
    """Number of examples per split: ``{"train": …, "id_val": …, "<ood key>": …}``."""
    sizes = {"train": len(benchmark.train), "id_val": len(benchmark.id_val)}
    sizes.update((key, len(dataset)) for key, dataset in benchmark.ood.items())
    return sizes
