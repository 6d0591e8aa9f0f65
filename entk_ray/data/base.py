"""The dataset contract shared by every benchmark.

A benchmark is three kinds of split: the ID training set, the ID validation set and one or more
OOD evaluation sets. Every split is a map-style ``torch.utils.data.Dataset`` whose items are
``(image, label)`` with ``image`` a float tensor ``(C, H, W)`` already transformed for the model,
and which exposes ``labels`` (an ``int64`` numpy array, known without decoding any image) so the
solver can build targets and score predictions without touching pixels. Datasets must pickle
cheaply (file lists, not decoded images) so Ray can ship them to feature actors.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from entk_ray.config import ConfigError
from entk_ray.fingerprints import digest

logger = logging.getLogger(__name__)


@runtime_checkable
class LabeledDataset(Protocol):
    labels: np.ndarray

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class TensorLabeledDataset(Dataset):
    """Images held in memory as one tensor ``(n, C, H, W)`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray | torch.Tensor):
        labels = np.asarray(labels, dtype=np.int64)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images has {images.shape[0]} rows but labels has {labels.shape[0]}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass
class Benchmark:
    """ID train / ID validation / named OOD splits plus a manifest for fingerprinting.

    ``manifest`` is a JSON-serializable description of everything that determines the examples
    and their preprocessing (sources, sizes, seeds, transform); artifacts derived from this
    benchmark are keyed by :meth:`manifest_hash`.
    """

    name: str
    class_names: list[str]
    train: Dataset
    id_val: Dataset
    ood: dict[str, Dataset]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def eval_sets(self) -> dict[str, Dataset]:
        """Evaluation splits in a fixed order: ``id_val`` first, then each OOD set."""
        return {"id_val": self.id_val, **{f"ood:{k}": v for k, v in self.ood.items()}}

    def manifest_hash(self) -> str:
        return digest(self.manifest)


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


def report_sizes(name: str, sizes: dict[str, int], verbose: bool) -> None:
    line = f"{name}: " + ", ".join(f"{split} {n:,}" for split, n in sizes.items())
    logger.info(line)
    if verbose:
        print(line, flush=True)
