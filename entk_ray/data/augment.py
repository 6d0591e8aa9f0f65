"""Training-time augmentation for the trained baselines (fine-tuning, LP-FT, from scratch).

Evaluation always uses the benchmark's own splits and transform (the eNTK rows' preprocessing);
only the training split is augmented, as Kumar et al. (ICLR 2022) train:

* **Image files** (BREEDS, ``image_folder``): :class:`TrainTransform` = ``RandomResizedCrop(crop)``
  (scale (0.08, 1), aspect ratio (3/4, 4/3), bilinear, antialiased) → ``RandomHorizontalFlip`` →
  ``ToTensor`` → ``Normalize(mean, std)`` with the backbone's statistics, applied to the decoded file.
* **In-memory tensors** (the digits shift, test benchmarks): the images are already normalized at
  the model's resolution, so :class:`TensorCrop` applies ``RandomResizedCrop`` to the tensor itself,
  keeping 85–100 % of the area at aspect ratio 0.9–1.1 and resizing back (bilinear, antialiased).
  No flip: a mirrored digit is another glyph (2, 3, 7 …), and optdigits' bitmaps fill their box, so
  a stronger crop would cut strokes off.

Randomness is a function of ``(seed, epoch, example index)`` only (:class:`SeededAugmentation`):
every example's augmentation is the same whichever worker, DataLoader process or resumed run draws
it, which is what lets a run resumed from a checkpoint, or split over several DDP workers, repeat
an uninterrupted single-worker run.
"""
from __future__ import annotations

import functools

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from entk_ray.data.base import TensorLabeledDataset
from entk_ray.data.images import ImageFileDataset
from entk_ray.data.transforms import KUMAR_MEAN, KUMAR_STD

#: RandomResizedCrop area and aspect-ratio ranges for in-memory digit images (see the module doc).
TENSOR_CROP_SCALE = (0.85, 1.0)
TENSOR_CROP_RATIO = (0.9, 1.0 / 0.9)


def example_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one example's augmentation in one epoch (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class TrainTransform:
    """Kumar et al.'s training transform for decoded images: PIL RGB image → normalized tensor."""

    crop: int = 224
    mean: tuple[float, ...] = KUMAR_MEAN
    std: tuple[float, ...] = KUMAR_STD

    def __call__(self, image) -> torch.Tensor:
        return _train_pipeline(self.crop, tuple(self.mean), tuple(self.std))(image)

    def describe(self) -> dict[str, Any]:
        return {"type": "train", "steps": [
            {"op": "random_resized_crop", "size": self.crop, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3]},
            {"op": "random_horizontal_flip", "p": 0.5}, {"op": "to_tensor"},
            {"op": "normalize", "mean": list(self.mean), "std": list(self.std)}]}


@dataclass(frozen=True)
class TensorCrop:
    """RandomResizedCrop of an already-normalized image tensor ``(C, H, W)`` back to ``(C, H, W)``."""

    scale: tuple[float, float] = TENSOR_CROP_SCALE
    ratio: tuple[float, float] = TENSOR_CROP_RATIO

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return _tensor_crop(tuple(image.shape[-2:]), tuple(self.scale), tuple(self.ratio))(image)

    def describe(self) -> dict[str, Any]:
        return {"type": "tensor_train", "steps": [
            {"op": "random_resized_crop", "size": "input", "scale": list(self.scale), "ratio": list(self.ratio)}]}


@functools.lru_cache(maxsize=8)
def _train_pipeline(crop: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """:class:`TrainTransform`'s torchvision pipeline, built once per process (building draws no
    random numbers: the seeded crops are unchanged)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(crop, antialias=True), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(mean, std)])


@functools.lru_cache(maxsize=8)
def _tensor_crop(size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float]):
    """:class:`TensorCrop`'s transform for one image size, built once per process."""
    from torchvision.transforms import v2

    return v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)


class SeededAugmentation(Dataset):
    """``base[i]`` (then ``post(image)``) drawn under a torch RNG seeded by ``(seed, epoch, i)``.

    Call :meth:`set_epoch` before each epoch (DataLoader processes receive a fresh copy each epoch
    unless ``persistent_workers``, which this dataset must not be used with). The global RNG of the
    calling process is left as it was.
    """

    def __init__(self, base: Dataset, post: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0):
        self.base, self.post, self.seed = base, post, int(seed)
        self.epoch = 0
        self.labels = np.asarray(base.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone (what the transforms draw from): torch.manual_seed would also
            # queue CUDA seeding, recording a stack trace per call
            torch.default_generator.manual_seed(example_seed(self.seed, self.epoch, index))
            image, label = self.base[index]
            if self.post is not None:
                image = self.post(image)
        return image, label

    def describe(self) -> dict[str, Any]:
        transform = getattr(self.base, "transform", None)
        inner = self.post or (transform if isinstance(transform, TrainTransform) else None)
        return {"augmentation": inner.describe() if inner is not None else None, "seed": self.seed}


def training_set(train: Dataset, augment: str = "auto", *, crop: int | None = None,
                 mean=KUMAR_MEAN, std=KUMAR_STD, seed: int = 0) -> SeededAugmentation:
    """The training split as the trained baselines see it (see the module docstring).

    ``augment="auto"``: :class:`TrainTransform` at ``crop`` px for image files, :class:`TensorCrop`
    for in-memory tensors; ``"none"``: the examples as the benchmark transforms them for evaluation.
    """
    if augment == "none":
        return SeededAugmentation(train, None, seed)
    if augment != "auto":
        raise ValueError(f"augment must be 'auto' or 'none', got {augment!r}")
    if isinstance(train, ImageFileDataset):
        if crop is None:
            raise ValueError("training_set: image files need the crop size (data.crop_size)")
        files = ImageFileDataset(train.paths, train.labels, TrainTransform(int(crop), tuple(mean), tuple(std)),
                                 train.storage_options)
        return SeededAugmentation(files, None, seed)
    if isinstance(train, TensorLabeledDataset):
        return SeededAugmentation(train, TensorCrop(), seed)
    raise TypeError(f"no training augmentation for {type(train).__name__}; set finetune.augment=none")
