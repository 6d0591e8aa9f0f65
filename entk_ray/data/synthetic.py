"""Synthetic benchmarks of a real benchmark's shape: seeded images made on the fly from their index.

For runs at a benchmark's full size without its data (``benchmarks/living17_scale.py``). Image i of
a split is drawn from a generator seeded by (seed, split, i), so any process — a Ray feature actor,
a DataLoader worker — makes the same image from the index alone: nothing is stored, and a dataset
pickles as a few numbers. Each class has its own mean colour, so the classes are separable and a
sane pipeline beats chance; the OOD split shifts every colour. Labels cycle through the classes
(``i mod C``), so every prefix of a split is class-balanced.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch.utils.data import Dataset

from entk_ray.data.base import Benchmark


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


class SyntheticImages(Dataset):
    """``n`` images (3 × ``image_size`` × ``image_size``, normalized with ``mean``/``std``) of
    ``num_classes`` classes: x_i = colour(label_i) + shift + 0.5·U(0, 1) noise per pixel, the noise
    seeded by (``seed``, ``split``, i)."""

    def __init__(self, n: int, num_classes: int, image_size: int, seed: int, split: str, shift: float = 0.0,
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225)):
        if n < 1 or num_classes < 1 or image_size < 1:
            raise ValueError(f"a synthetic split needs n, num_classes and image_size ≥ 1, got {n}, {num_classes}, "
                             f"{image_size}")
        self.n, self.num_classes, self.image_size = int(n), int(num_classes), int(image_size)
        self.seed, self.split, self.shift = int(seed), str(split), float(shift)
        self.mean, self.std = tuple(mean), tuple(std)
        self.labels = np.arange(self.n, dtype=np.int64) % self.num_classes
        colours = np.random.default_rng(_seed(self.seed, "colours")).uniform(0.0, 0.5, size=(self.num_classes, 3))
        self._colours = torch.from_numpy(colours.astype(np.float32))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for a split of {self.n} images")
        label = int(self.labels[index])
        generator = torch.Generator().manual_seed(_seed(self.seed, self.split, int(index)))
        size = self.image_size
        image = 0.5 * torch.rand((3, size, size), generator=generator)
        image += (self._colours[label] + self.shift).view(3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (image - mean) / std, label

    def describe(self) -> dict:
        return {"n": self.n, "num_classes": self.num_classes, "image_size": self.image_size, "seed": self.seed,
                "split": self.split, "shift": self.shift, "mean": list(self.mean), "std": list(self.std)}


def synthetic_benchmark(n_train: int, n_id_val: int, n_ood: int, num_classes: int, image_size: int, seed: int = 0,
                        name: str = "synthetic", mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                        std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> Benchmark:
    """ID train / ID validation / one OOD split (``ood:shifted``: colours shifted by 0.25) of
    :class:`SyntheticImages`."""
    def split(n: int, label: str, shift: float = 0.0) -> SyntheticImages:
        return SyntheticImages(n, num_classes, image_size, seed, label, shift, mean, std)

    train, id_val, ood = split(n_train, "train"), split(n_id_val, "id_val"), split(n_ood, "ood", 0.25)
    manifest = {"benchmark": "synthetic", "name": name,
                "splits": {"train": train.describe(), "id_val": id_val.describe(), "ood": ood.describe()}}
    return Benchmark(name, [f"class{c}" for c in range(num_classes)], train, id_val, {"shifted": ood}, manifest)
