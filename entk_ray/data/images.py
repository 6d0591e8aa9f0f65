"""Image files on a local disk or ``s3://``: the dataset that reads them and the corrupt-image scan.

* :class:`ImageFileDataset` — a map-style dataset over a list of image paths/URLs with integer
  labels. It holds only strings and a transform, so it pickles cheaply (Ray ships it to feature
  actors); each ``__getitem__`` reads one file through fsspec, decodes it with PIL, converts it
  to RGB and applies the transform.
* :func:`scan_images` / :func:`drop_or_fail_on_corrupt` — find unreadable images and apply the
  ``data.corrupt_policy`` ("fail": error naming them; "skip": drop them with a warning).

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

A file that fails to decode during feature extraction (e.g. a JPEG truncated after its header,
which the header check passes) raises :class:`ImageReadError`, a :class:`CorruptImagesError`
naming the file and the options that catch it before the features start: decoding the same bytes
again cannot succeed, so the Ray layer does not retry it (``entk_ray.errors``). A storage endpoint
that does not answer is another matter: that raises :class:`~entk_ray.errors.StorageError` and is
never recorded as a corrupt image.

Scan results are cached (``cache_file``) per file *version*: the path plus its size and
modification time (its ETag on S3), read from one listing per folder, so a file replaced or
corrupted after a clean scan is scanned again.

Only the examples that survive subsampling are scanned, so with ``corrupt_policy="skip"`` a split
can end up smaller than the requested ``n_*`` by the number of images dropped (the warning says
how many).
"""
from __future__ import annotations

import io
import logging
import os
import posixpath
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from entk_ray.config import CORRUPT_POLICIES, ConfigError
from entk_ray.errors import StorageError, UserInputError
from entk_ray.fingerprints import digest_lines
from entk_ray.storage import (filesystem_for, is_remote, join_url, read_parquet, storage_errors, unreachable,
                              unreachable_message, write_parquet)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CORRUPT_CHECKS = ("header", "decode", "none")
MAX_NAMED_FILES = 50  # how many bad files an error message lists before summarizing


#: What to do about an image that fails to decode while its features are computed.
LATE_FAILURE_HINT = ("find every such file before the features start with --corrupt-check decode "
                     "(data.corrupt_check=decode), and drop them with --corrupt-policy skip")


class CorruptImagesError(UserInputError, RuntimeError):
    """Some images cannot be read; the message names them (see ``data.corrupt_policy``)."""

    def __init__(self, message: str, corrupt: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.corrupt = corrupt or []  # (path, reason); a default keeps the error picklable (Ray)


class ImageReadError(CorruptImagesError):
    """One image could not be read or decoded while loading an example (deterministic: never retried)."""


def has_image_extension(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)



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
        image = read_rgb_image(path, self._filesystem(), self.storage_options)
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
    """Decode one image file as an RGB PIL image.

    Raises :class:`ImageReadError` (naming the file and what to do) when the file is missing or
    does not decode, and :class:`~entk_ray.errors.StorageError` when its storage does not answer."""
    from PIL import Image

    if fs is None:
        fs, _ = filesystem_for(path, storage_options)
    try:
        with storage_errors(path, storage_options, "read"):
            data = fs.cat_file(fs._strip_protocol(path))
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except UserInputError:
        raise
    except Exception as exc:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError...
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ImageReadError(f"cannot read image {path}: {reason}; {LATE_FAILURE_HINT}", [(path, reason)]) from exc


def check_image(path: str, fs, check: str = "header", storage_options: dict[str, Any] | None = None) -> str | None:
    """``None`` when ``path`` reads as an image at the given check level, else the reason.
    An unreachable storage endpoint raises :class:`~entk_ray.errors.StorageError` instead."""
    from PIL import Image

    try:
        with fs.open(fs._strip_protocol(path), "rb") as fh:
            with Image.open(fh) as image:
                if check == "decode":
                    image.convert("RGB")
                else:
                    image.verify()
    except Exception as exc:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError...
        if unreachable(exc):  # not the image's fault: never cache it as corrupt
            raise StorageError(unreachable_message(path, storage_options, exc, "read")) from exc
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
    check level are reused for files whose version (size and modification time, or ETag; see
    :func:`file_versions`) is unchanged, and new results are added, so a rerun reads no unchanged
    image twice.
    """
    if check not in CORRUPT_CHECKS:
        raise ValueError(f"corrupt check must be one of {', '.join(CORRUPT_CHECKS)}, got {check!r}")
    if check == "none" or not paths:
        return []
    unique = list(dict.fromkeys(paths))
    fs, _ = filesystem_for(unique[0], storage_options)
    versions = file_versions(unique, fs, num_threads, storage_options) if cache_file else {}
    known = _load_scan_cache(cache_file, storage_options) if cache_file else {}
    todo = [p for p in unique if p not in known or versions.get(p) is None or known[p][0] != versions[p]]
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            reasons = list(pool.map(lambda p: check_image(p, fs, check, storage_options), todo))
        known.update((p, (versions.get(p), r or "")) for p, r in zip(todo, reasons))
        if cache_file:
            _save_scan_cache(cache_file, known, storage_options)
    return [(p, known[p][1]) for p in paths if known[p][1]]


def file_versions(paths: Sequence[str], fs, num_threads: int = 16,
                  storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """``path → "<size>:<ETag or mtime>"`` from one detailed listing per folder (a file that is
    not listed, e.g. deleted, has no version and is scanned again)."""
    by_folder: dict[str, dict[str, str]] = {}
    for path in paths:
        inner = fs._strip_protocol(path)
        by_folder.setdefault(posixpath.dirname(inner), {})[inner] = path

    def listing(folder: str) -> list[dict]:
        with storage_errors(folder, storage_options, "list"):
            try:
                return fs.ls(folder, detail=True)
            except FileNotFoundError:
                return []

    folders = list(by_folder)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        listings = list(pool.map(listing, folders))
    out = {}
    for folder, entries in zip(folders, listings):
        wanted = by_folder[folder]
        for entry in entries:
            name = fs._strip_protocol(entry["name"])
            if name in wanted and entry.get("type", "file") == "file":
                stamp = entry.get("ETag") or entry.get("etag") or entry.get("mtime") or entry.get("LastModified")
                out[wanted[name]] = f"{entry.get('size')}:{stamp}"
    return out


def scan_cache_path(cache_dir: str, roots: Sequence[str], check: str) -> str:
    """Scan-result cache file for images under ``roots`` at check level ``check``."""
    key = digest_lines(roots)
    return join_url(cache_dir, f"image-scan-{key}-{check}.parquet")


def _load_scan_cache(path: str, storage_options: dict[str, Any] | None) -> dict[str, tuple[str | None, str]]:
    """``path → (version, reason)`` of earlier scans (a cache without versions counts as empty)."""
    with storage_errors(path, storage_options, "read"):
        fs, inner = filesystem_for(path, storage_options)
        if not fs.exists(inner):
            return {}
    try:
        columns = read_parquet(path, storage_options).to_pydict()
    except UserInputError:
        raise
    except Exception as exc:
        warnings.warn(f"ignoring unreadable image-scan cache {path}: {exc}", stacklevel=3)
        return {}
    if "version" not in columns:
        return {}
    return {p: (v, r) for p, v, r in zip(columns["path"], columns["version"], columns["reason"])}


def _save_scan_cache(path: str, results: dict[str, tuple[str | None, str]],
                     storage_options: dict[str, Any] | None) -> None:
    import pyarrow as pa

    table = pa.table({"path": list(results), "version": [v for v, _ in results.values()],
                      "reason": [r for _, r in results.values()]})
    write_parquet(table, path, storage_options)


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
            f"{split_name}: {len(corrupt)} of {len(dataset)} images cannot be read, e.g. {corrupt[0][0]} "
            f"(data.corrupt_policy='fail'; rerun with --corrupt-policy skip to drop them):\n{listing}{more}",
            corrupt,
        )
    bad = {p for p, _ in corrupt}
    keep = [i for i, p in enumerate(dataset.paths) if p not in bad]
    message = f"{split_name}: skipped {len(corrupt)} unreadable images of {len(dataset)} (data.corrupt_policy='skip')"
    warnings.warn(message, stacklevel=2)
    logger.warning("%s:\n%s%s", message, listing, more)
    return dataset.subset(keep)



def check_corrupt_settings(policy: str, check: str) -> None:
    if policy not in CORRUPT_POLICIES:
        raise ConfigError(f"data.corrupt_policy must be one of {', '.join(CORRUPT_POLICIES)}; got {policy!r}")
    if check not in CORRUPT_CHECKS:
        raise ConfigError(f"corrupt_check must be one of {', '.join(CORRUPT_CHECKS)}; got {check!r}")


def file_list_digest(paths: Sequence[str], labels: np.ndarray) -> str:
    """A short hash of (path, label) pairs, for manifests."""
    return digest_lines(f"{path}\t{label}" for path, label in zip(paths, np.asarray(labels).tolist()))
