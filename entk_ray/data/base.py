"""The dataset contract shared by every benchmark.

A benchmark is three kinds of split: the ID training set, the ID validation set and one or more
OOD evaluation sets. Every split is a map-style ``torch.utils.data.Dataset`` whose items are
``(image, label)`` with ``image`` a float tensor ``(C, H, W)`` already transformed for the model,
and which exposes ``labels`` (an ``int64`` numpy array, known without decoding any image) so the
solver can build targets and score predictions without touching pixels. Datasets must pickle
cheaply (file lists, not decoded images) so Ray can ship them to feature actors.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset


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
        blob = json.dumps(self.manifest, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
