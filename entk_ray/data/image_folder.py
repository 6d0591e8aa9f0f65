"""The ``image_folder`` benchmark: ID train / ID validation / OOD folders in the ImageFolder layout.

Each folder holds one subfolder per class (local or ``s3://``). Reading the images and the
corrupt-image scan live in :mod:`entk_ray.data.images`; seeded, class-stratified subsampling in
:func:`entk_ray.data.base.subsample_indices`.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from entk_ray.config import ConfigError
from entk_ray.data.base import Benchmark, report_sizes, subsample_indices
from entk_ray.data.images import (ImageFileDataset, check_corrupt_settings, drop_or_fail_on_corrupt,
                                  file_list_digest, has_image_extension, scan_cache_path)
from entk_ray.storage import as_url, filesystem_for, storage_errors


@dataclass
class FolderListing:
    """Images of one ImageFolder-style folder: class name → sorted image URLs."""

    root: str
    by_class: dict[str, list[str]]
    empty_classes: list[str] = dataclasses.field(default_factory=list)  # class folders without a single image

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self.by_class.values())


def list_image_folder(root: str, storage_options: dict[str, Any] | None = None) -> FolderListing:
    """List ``root/<class>/**/<image>`` (one recursive listing; files directly in ``root`` are ignored)."""
    with storage_errors(root, storage_options, "list"):
        fs, base = filesystem_for(root, storage_options)
        fs.invalidate_cache(base)
        if not fs.isdir(base):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a folder")
        base = base.rstrip("/")
        files = sorted(fs.find(base))
        folders = [e["name"].rstrip("/") for e in fs.ls(base, detail=True) if e.get("type") == "directory"]
    by_class: dict[str, list[str]] = {}
    for path in files:
        relative = path[len(base):].lstrip("/")
        if "/" not in relative or not has_image_extension(relative):
            continue
        class_name = relative.split("/", 1)[0]
        if class_name.startswith("."):
            continue
        by_class.setdefault(class_name, []).append(as_url(fs, path))
    empty = sorted(as_url(fs, f) for f in folders
                   if not f.rsplit("/", 1)[-1].startswith(".") and f.rsplit("/", 1)[-1] not in by_class)
    return FolderListing(root, by_class, empty)


def _ood_split_names(ood_dirs: Sequence[str]) -> list[str]:
    names = [d.rstrip("/").rsplit("/", 1)[-1] for d in ood_dirs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"data.ood_dirs: OOD splits are named by their folder's name, and {duplicates} occur more "
            f"than once in {list(ood_dirs)}; rename the folders"
        )
    return names


def _labelled_files(listing: FolderListing, class_index: dict[str, int], field: str) -> tuple[list[str], np.ndarray]:
    unknown = sorted(set(listing.by_class) - set(class_index))
    if unknown:
        raise ConfigError(
            f"data.{field} = {listing.root!r} has class folders not in data.id_train_dir: {unknown}"
        )
    missing = sorted(set(class_index) - set(listing.by_class))
    if missing:
        warnings.warn(f"data.{field} = {listing.root!r} has no images for classes {missing}", stacklevel=3)
    paths, labels = [], []
    for name in sorted(listing.by_class):
        paths.extend(listing.by_class[name])
        labels.extend([class_index[name]] * len(listing.by_class[name]))
    if not paths:
        raise ConfigError(f"data.{field} = {listing.root!r} holds no images in class subfolders")
    return paths, np.asarray(labels, dtype=np.int64)


def build_image_folder_benchmark(
    data_cfg,
    transform: Callable | None = None,
    storage_options: dict[str, Any] | None = None,
    corrupt_check: str = "header",
    scan_threads: int = 16,
    cache_dir: str | None = None,
    verbose: bool = True,
) -> Benchmark:
    """The ``image_folder`` benchmark from ``data_cfg.id_train_dir``, ``id_val_dir`` and ``ood_dirs``.

    Classes are the subfolders of ``id_train_dir`` (labels in sorted-name order); the validation
    and OOD folders must use the same class names (a class absent from one of them only warns).
    One OOD split per entry of ``ood_dirs``, keyed by the folder's name; ``storage_options`` are
    fsspec options for ``s3://`` folders. Sizes are capped by
    ``n_train`` / ``n_id_val`` / ``n_ood`` (the last per OOD split) with seeded stratified
    sampling; then the chosen images are checked (``corrupt_check``) and ``corrupt_policy``
    applies. Scan results are cached in ``cache_dir`` (else ``data_cfg.index_cache``) when one
    is given; folder listings are not cached.
    """
    from entk_ray.data.transforms import describe_transform

    for name in ("id_train_dir", "id_val_dir"):
        if not getattr(data_cfg, name):
            raise ConfigError(f"data.{name} is required for data.benchmark='image_folder'")
    if not data_cfg.ood_dirs:
        raise ConfigError("data.ood_dirs must list at least one folder for data.benchmark='image_folder'")
    check_corrupt_settings(data_cfg.corrupt_policy, corrupt_check)
    ood_names = _ood_split_names(data_cfg.ood_dirs)
    options = dict(storage_options or {})

    train_listing = list_image_folder(data_cfg.id_train_dir, options)
    if not train_listing.by_class:
        raise ConfigError(f"data.id_train_dir = {data_cfg.id_train_dir!r} holds no images in class subfolders")
    class_names = sorted(train_listing.by_class)
    class_index = {c: i for i, c in enumerate(class_names)}

    sources = {"train": ("id_train_dir", train_listing, data_cfg.n_train)}
    sources["id_val"] = ("id_val_dir", list_image_folder(data_cfg.id_val_dir, options), data_cfg.n_id_val)
    for i, (key, folder) in enumerate(zip(ood_names, data_cfg.ood_dirs)):
        sources[key] = (f"ood_dirs[{i}]", list_image_folder(folder, options), data_cfg.n_ood)

    for field_name, listing, _ in sources.values():
        if listing.empty_classes:
            dropped = " (their classes are left out of the benchmark)" if field_name == "id_train_dir" else ""
            warnings.warn(f"data.{field_name}: class folder(s) {listing.empty_classes} hold no images and are "
                          f"ignored{dropped}", stacklevel=2)

    sized_field = {"train": "n_train", "id_val": "n_id_val"}
    selected: dict[str, tuple[list[str], np.ndarray]] = {}
    for split, (field, listing, n) in sources.items():
        paths, labels = _labelled_files(listing, class_index, field)
        keep = subsample_indices(labels, n, data_cfg.seed, sized_field.get(split, "n_ood"), split)
        selected[split] = ([paths[i] for i in keep], labels[keep])

    cache_dir = cache_dir or data_cfg.index_cache
    roots = [listing.root for _, listing, _ in sources.values()]
    scan_cache = scan_cache_path(cache_dir, roots, corrupt_check) if cache_dir else None
    datasets = {}
    for split, (paths, labels) in selected.items():
        dataset = ImageFileDataset(paths, labels, transform, options)
        datasets[split] = drop_or_fail_on_corrupt(
            dataset, data_cfg.corrupt_policy, split, corrupt_check, scan_threads, scan_cache
        )

    sizes = {split: len(ds) for split, ds in datasets.items()}
    manifest = {
        "benchmark": "image_folder",
        "roots": {split: sources[split][1].root for split in sources},
        "class_names": class_names,
        "seed": data_cfg.seed,
        "requested": {"n_train": data_cfg.n_train, "n_id_val": data_cfg.n_id_val, "n_ood": data_cfg.n_ood},
        "sizes": sizes,
        "files": {split: file_list_digest(ds.paths, ds.labels) for split, ds in datasets.items()},
        "corrupt_policy": data_cfg.corrupt_policy,
        "corrupt_check": corrupt_check,
        "transform": describe_transform(transform),
    }
    report_sizes("image_folder", sizes, verbose)
    return Benchmark(
        name="image_folder",
        class_names=class_names,
        train=datasets["train"],
        id_val=datasets["id_val"],
        ood={key: datasets[key] for key in ood_names},
        manifest=manifest,
    )
