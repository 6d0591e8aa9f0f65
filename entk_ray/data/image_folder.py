"""Image files on a local disk or ``s3://`` as datasets, and the ``image_folder`` benchmark.

* :class:`ImageFileDataset` — a map-style dataset over a list of image paths/URLs with integer
  labels. It holds only strings and a transform, so it pickles cheaply (Ray ships it to feature
  actors); each ``__getitem__`` reads one file through fsspec, decodes it with PIL, converts it
  to RGB and applies the transform.
* :func:`scan_images` / :func:`drop_or_fail_on_corrupt` — find unreadable images and apply the
  ``data.corrupt_policy`` ("fail": error naming them; "skip": drop them with a warning).
* :func:`build_image_folder_benchmark` — ID train / ID validation / one OOD split per folder, each
  folder holding one subfolder per class (the ImageFolder layout).
* :func:`subsample_indices` — seeded, class-stratified subsampling shared by every image benchmark.

Corrupt-image check levels (``corrupt_check``):

``"header"`` (default)
    Open each file and let PIL parse and ``verify()`` it. Reads each file once and does not
    decode pixels; it catches empty files, non-images, bad headers and (for PNG) bad checksums,
    but not a JPEG truncated after its header.
``"decode"``
    Fully decode every image (what ``__getitem__`` does). Catches truncation too; costs about as
    much as one pass of data loading.
``"none"``
    No scan. A bad file then fails during feature extraction with an error naming its path.

Only the examples that survive subsampling are scanned, so with ``corrupt_policy="skip"`` a split
can end up smaller than the requested ``n_*`` by the number of images dropped (the warning says
how many).
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
import warnings
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from entk_ray.config import CORRUPT_POLICIES, ConfigError
from entk_ray.data.base import Benchmark

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CORRUPT_CHECKS = ("header", "decode", "none")
MAX_NAMED_FILES = 50  # how many bad files an error message lists before summarizing


class CorruptImagesError(RuntimeError):
    """Some images cannot be read; the message names them (see ``data.corrupt_policy``)."""

    def __init__(self, message: str, corrupt: list[tuple[str, str]]):
        super().__init__(message)
        self.corrupt = corrupt


class ImageReadError(RuntimeError):
    """One image could not be read or decoded while loading an example."""


# --------------------------------------------------------------------------- filesystem helpers
def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem_for(path: str, storage_options: dict[str, Any] | None = None):
    """``(fsspec filesystem, path inside it)`` for a local path or a URL such as ``s3://b/p``."""
    import fsspec

    options = dict(storage_options or {}) if is_remote(path) else {}
    return fsspec.core.url_to_fs(path, **options)


def as_url(fs, path: str) -> str:
    """A path as returned by ``fs.find``/``fs.ls`` turned back into something ``filesystem_for`` opens."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def join_url(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def has_image_extension(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


# --------------------------------------------------------------------------- the dataset
def _default_to_tensor(image) -> torch.Tensor:
    from torchvision.transforms.functional import to_tensor

    return to_tensor(image)


class ImageFileDataset(Dataset):
    """Images read on demand from local paths or URLs (``s3://…``), with integer labels.

    Args:
        paths: one path or URL per example (all local, or all of one remote protocol).
        labels: one integer label per example.
        transform: PIL RGB image → tensor ``(C, H, W)``; ``None`` means ``ToTensor`` only.
        storage_options: fsspec options for remote paths (e.g. S3 endpoint and keys).
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        transform: Callable | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != self.labels.shape[0]:
            raise ValueError(f"ImageFileDataset: {len(self.paths)} paths but {self.labels.shape[0]} labels")
        protocols = {_protocol_of(p) for p in self.paths}
        if len(protocols) > 1:
            raise ValueError(f"ImageFileDataset: paths mix storage protocols {sorted(protocols)}")
        self.transform = transform
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._fs_pid = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        image = read_rgb_image(path, self._filesystem())
        transform = self.transform or _default_to_tensor
        return transform(image), int(self.labels[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageFileDataset":
        """A dataset of the given examples (cheap: copies strings, not pixels)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageFileDataset(
            [self.paths[i] for i in indices], self.labels[indices], self.transform, self.storage_options
        )

    def _filesystem(self):
        if self._fs is None or self._fs_pid != os.getpid():  # a fresh client after fork / unpickle
            self._fs, _ = filesystem_for(self.paths[0] if self.paths else ".", self.storage_options)
            self._fs_pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None
        state["_fs_pid"] = None
        return state

    def __repr__(self) -> str:
        first = self.paths[0] if self.paths else "-"
        return f"ImageFileDataset(n={len(self)}, classes={len(np.unique(self.labels))}, first={first!r})"


def _protocol_of(path: str) -> str:
    return path.split("://", 1)[0] if is_remote(path) else "file"


def read_rgb_image(path: str, fs=None, storage_options: dict[str, Any] | None = None):
    """Decode one image file as an RGB PIL image; errors name the file."""
    from PIL import Image

    if fs is None:
        fs, _ = filesystem_for(path, storage_options)
    try:
        with fs.open(fs._strip_protocol(path), "rb") as fh:
            with Image.open(fh) as image:
                return image.convert("RGB")
    except Exception as exc:
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- corrupt images
def check_image(path: str, fs, check: str = "header") -> str | None:
    """``None`` when ``path`` reads as an image at the given check level, else the reason."""
    from PIL import Image

    try:
        with fs.open(fs._strip_protocol(path), "rb") as fh:
            with Image.open(fh) as image:
                if check == "decode":
                    image.convert("RGB")
                else:
                    image.verify()
    except Exception as exc:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError...
        return f"{type(exc).__name__}: {exc}"
    return None


def scan_images(
    paths: Sequence[str],
    storage_options: dict[str, Any] | None = None,
    check: str = "header",
    num_threads: int = 16,
    cache_file: str | None = None,
) -> list[tuple[str, str]]:
    """``(path, reason)`` for every image of ``paths`` that fails the ``check`` (see module doc).

    With ``cache_file`` (a Parquet file, local or remote), results of earlier scans at the same
    check level are reused and new results are added, so a rerun reads no image twice.
    """
    if check not in CORRUPT_CHECKS:
        raise ValueError(f"corrupt check must be one of {', '.join(CORRUPT_CHECKS)}, got {check!r}")
    if check == "none" or not paths:
        return []
    known = _load_scan_cache(cache_file, storage_options) if cache_file else {}
    todo = [p for p in dict.fromkeys(paths) if p not in known]
    if todo:
        fs, _ = filesystem_for(todo[0], storage_options)
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            reasons = list(pool.map(lambda p: check_image(p, fs, check), todo))
        known.update((p, r or "") for p, r in zip(todo, reasons))
        if cache_file:
            _save_scan_cache(cache_file, known, storage_options)
    return [(p, known[p]) for p in paths if known[p]]


def scan_cache_path(cache_dir: str, roots: Sequence[str], check: str) -> str:
    """Scan-result cache file for images under ``roots`` at check level ``check``."""
    key = hashlib.sha256("\n".join(roots).encode()).hexdigest()[:16]
    return join_url(cache_dir, f"image-scan-{key}-{check}.parquet")


def _load_scan_cache(path: str, storage_options: dict[str, Any] | None) -> dict[str, str]:
    fs, inner = filesystem_for(path, storage_options)
    if not fs.exists(inner):
        return {}
    try:
        columns = read_parquet(path, storage_options).to_pydict()
    except Exception as exc:
        warnings.warn(f"ignoring unreadable image-scan cache {path}: {exc}", stacklevel=3)
        return {}
    return dict(zip(columns["path"], columns["reason"]))


def _save_scan_cache(path: str, results: dict[str, str], storage_options: dict[str, Any] | None) -> None:
    import pyarrow as pa

    table = pa.table({"path": list(results), "reason": list(results.values())})
    write_parquet(table, path, storage_options)


def read_parquet(path: str, storage_options: dict[str, Any] | None = None):
    """Read a whole Parquet file (local or URL) into a pyarrow table.

    The bytes are read first and parsed from memory, so no pyarrow thread ever calls back into
    a Python file object (small cache files only).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, inner = filesystem_for(path, storage_options)
    return pq.read_table(pa.BufferReader(fs.cat_file(inner)))


def write_parquet(table, path: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write a pyarrow table to a local path (atomically: temp file + rename) or a URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_remote(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        fs, inner = filesystem_for(path, storage_options)
        fs.pipe_file(inner, sink.getvalue().to_pybytes())
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def drop_or_fail_on_corrupt(
    dataset: ImageFileDataset,
    policy: str,
    split_name: str,
    check: str = "header",
    num_threads: int = 16,
    cache_file: str | None = None,
) -> ImageFileDataset:
    """Scan ``dataset`` and apply ``policy``: "fail" raises naming the files, "skip" drops them."""
    if policy not in CORRUPT_POLICIES:
        raise ConfigError(f"data.corrupt_policy must be one of {', '.join(CORRUPT_POLICIES)}; got {policy!r}")
    corrupt = scan_images(dataset.paths, dataset.storage_options, check, num_threads, cache_file)
    if not corrupt:
        return dataset
    listing = "\n".join(f"  {p}: {r}" for p, r in corrupt[:MAX_NAMED_FILES])
    more = f"\n  ... and {len(corrupt) - MAX_NAMED_FILES} more" if len(corrupt) > MAX_NAMED_FILES else ""
    if policy == "fail":
        raise CorruptImagesError(
            f"{split_name}: {len(corrupt)} of {len(dataset)} images cannot be read "
            f"(data.corrupt_policy='fail'; set it to 'skip' to drop them):\n{listing}{more}",
            corrupt,
        )
    bad = {p for p, _ in corrupt}
    keep = [i for i, p in enumerate(dataset.paths) if p not in bad]
    message = f"{split_name}: skipped {len(corrupt)} unreadable images of {len(dataset)} (data.corrupt_policy='skip')"
    warnings.warn(message, stacklevel=2)
    logger.warning("%s:\n%s%s", message, listing, more)
    return dataset.subset(keep)


# --------------------------------------------------------------------------- subsampling
def subsample_indices(labels: np.ndarray, n: int | None, seed: int, field: str, split_name: str) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified sample of ``n`` examples (all when ``n`` is None).

    Each class gets ``n`` × its share, rounded by largest remainder so the total is exactly ``n``.
    The random stream depends on ``seed`` and ``split_name``, so splits draw independently.
    Raises :class:`ConfigError` naming ``data.<field>`` when ``n`` exceeds what is available.
    """
    labels = np.asarray(labels)
    available = labels.shape[0]
    if n is None:
        return np.arange(available)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"data.{field} must be a positive integer or null, got {n!r}")
    if n > available:
        raise ConfigError(f"data.{field} = {n} exceeds the {available} examples available in {split_name}")
    rng = np.random.default_rng([seed, zlib.crc32(split_name.encode())])
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / available)
    take = np.floor(quota).astype(np.int64)
    shortfall = n - int(take.sum())
    if shortfall:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:shortfall]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=k, replace=False) for c, k in zip(classes, take) if k
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


# --------------------------------------------------------------------------- fingerprints
def file_list_digest(paths: Sequence[str], labels: np.ndarray) -> str:
    """A short hash of (path, label) pairs, for manifests."""
    digest = hashlib.sha256()
    for path, label in zip(paths, np.asarray(labels).tolist()):
        digest.update(f"{path}\t{label}\n".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- image folders
@dataclass
class FolderListing:
    """Images of one ImageFolder-style folder: class name → sorted image URLs."""

    root: str
    by_class: dict[str, list[str]]

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self.by_class.values())


def list_image_folder(root: str, storage_options: dict[str, Any] | None = None) -> FolderListing:
    """List ``root/<class>/**/<image>`` (one recursive listing; files directly in ``root`` are ignored)."""
    fs, base = filesystem_for(root, storage_options)
    fs.invalidate_cache(base)
    if not fs.isdir(base):
        raise FileNotFoundError(f"image folder {root!r} does not exist or is not a folder")
    base = base.rstrip("/")
    by_class: dict[str, list[str]] = {}
    for path in sorted(fs.find(base)):
        relative = path[len(base):].lstrip("/")
        if "/" not in relative or not has_image_extension(relative):
            continue
        class_name = relative.split("/", 1)[0]
        if class_name.startswith("."):
            continue
        by_class.setdefault(class_name, []).append(as_url(fs, path))
    return FolderListing(root, by_class)


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
    corrupt_check: str = "header",
    scan_threads: int = 16,
    cache_dir: str | None = None,
    verbose: bool = True,
) -> Benchmark:
    """The ``image_folder`` benchmark from ``data_cfg.id_train_dir``, ``id_val_dir`` and ``ood_dirs``.

    Classes are the subfolders of ``id_train_dir`` (labels in sorted-name order); the validation
    and OOD folders must use the same class names (a class absent from one of them only warns).
    One OOD split per entry of ``ood_dirs``, keyed by the folder's name. Sizes are capped by
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
    options = data_cfg.storage_options

    train_listing = list_image_folder(data_cfg.id_train_dir, options)
    empty = sorted(c for c, v in train_listing.by_class.items() if not v)
    if not train_listing.by_class or empty:
        raise ConfigError(f"data.id_train_dir = {data_cfg.id_train_dir!r} holds no images in class subfolders")
    class_names = sorted(train_listing.by_class)
    class_index = {c: i for i, c in enumerate(class_names)}

    sources = {"train": ("id_train_dir", train_listing, data_cfg.n_train)}
    sources["id_val"] = ("id_val_dir", list_image_folder(data_cfg.id_val_dir, options), data_cfg.n_id_val)
    for i, (key, folder) in enumerate(zip(ood_names, data_cfg.ood_dirs)):
        sources[key] = (f"ood_dirs[{i}]", list_image_folder(folder, options), data_cfg.n_ood)

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


def check_corrupt_settings(policy: str, check: str) -> None:
    if policy not in CORRUPT_POLICIES:
        raise ConfigError(f"data.corrupt_policy must be one of {', '.join(CORRUPT_POLICIES)}; got {policy!r}")
    if check not in CORRUPT_CHECKS:
        raise ConfigError(f"corrupt_check must be one of {', '.join(CORRUPT_CHECKS)}; got {check!r}")


def report_sizes(name: str, sizes: dict[str, int], verbose: bool) -> None:
    line = f"{name}: " + ", ".join(f"{split} {n:,}" for split, n in sizes.items())
    logger.info(line)
    if verbose:
        print(line, flush=True)
