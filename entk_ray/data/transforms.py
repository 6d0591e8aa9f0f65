"""Image preprocessing for evaluation-style feature extraction.

Each backbone brings its own interpolation, crop fraction and normalization from its pretrained
config (:func:`entk_ray.models.preprocessing`; the pipeline passes them to
:func:`eval_transform_for_crop`). The defaults here are the transform of Kumar et al. (ICLR 2022)
used for Living-17, which the ResNets follow: ``Resize(256)``
(shorter side, bilinear, antialiased on PIL images), ``CenterCrop(224)``, ``ToTensor`` and
``Normalize(mean=(0.485, 0.456, 0.406), std=(0.228, 0.224, 0.225))``. Note the std's first entry
is 0.228 (Kumar et al.'s value), not torchvision's 0.229.

:class:`EvalTransform` is a picklable callable (PIL image → float tensor ``(3, crop, crop)``) with
a JSON-serializable :meth:`EvalTransform.describe`, which goes into benchmark manifests so that a
changed preprocessing never reuses stale features.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

KUMAR_MEAN = (0.485, 0.456, 0.406)
KUMAR_STD = (0.228, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class EvalTransform:
    """Resize(shorter side) → CenterCrop → ToTensor → Normalize, with its own description."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = KUMAR_MEAN
    std: tuple[float, ...] = KUMAR_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"transform {name} must be a positive integer, got {value!r}")
        if self.crop > self.resize:
            raise ValueError(f"transform crop ({self.crop}) must not exceed resize ({self.resize})")
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"transform std must be positive, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            choices = ", ".join(INTERPOLATIONS)
            raise ValueError(f"transform interpolation must be one of {choices}, got {self.interpolation!r}")

    def __call__(self, image) -> torch.Tensor:
        return self._pipeline()(image)

    def _pipeline(self) -> Callable:
        # Built lazily and cached per process; the dataclass itself stays trivially picklable.
        pipeline = self.__dict__.get("_compiled")
        if pipeline is None:
            from torchvision import transforms as T

            mode = getattr(T.InterpolationMode, self.interpolation.upper())
            pipeline = T.Compose(
                [
                    T.Resize(self.resize, interpolation=mode, antialias=True),
                    T.CenterCrop(self.crop),
                    T.ToTensor(),
                    T.Normalize(self.mean, self.std),
                ]
            )
            object.__setattr__(self, "_compiled", pipeline)
        return pipeline

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_compiled"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def describe(self) -> dict[str, Any]:
        """JSON-serializable description (for fingerprints and manifests)."""
        return {
            "type": "eval",
            "steps": [
                {"op": "resize", "size": self.resize, "interpolation": self.interpolation, "antialias": True},
                {"op": "center_crop", "size": self.crop},
                {"op": "to_tensor", "scale": "1/255", "mode": "RGB"},
                {"op": "normalize", "mean": list(self.mean), "std": list(self.std)},
            ],
        }


def eval_transform(
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = KUMAR_MEAN,
    std: Sequence[float] = KUMAR_STD,
    interpolation: str = "bilinear",
) -> EvalTransform:
    """The Kumar et al. evaluation transform, with every size and statistic adjustable."""
    return EvalTransform(resize, crop, tuple(mean), tuple(std), interpolation)


def eval_transform_for_crop(crop: int, crop_fraction: float = 224 / 256, **kwargs: Any) -> EvalTransform:
    """An evaluation transform for a ``crop`` resolution: resize the shorter side to
    ``round(crop / crop_fraction)`` (timm's ``crop_pct``; 224/256 by default), then center-crop."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction!r}")
    return eval_transform(resize=int(round(crop / crop_fraction)), crop=crop, **kwargs)


def describe_transform(transform: Any) -> Any:
    """A JSON-serializable description of any transform (``describe()`` when it has one)."""
    if transform is None:
        return None
    if hasattr(transform, "describe"):
        return transform.describe()
    return {"type": "repr", "repr": repr(transform)}


def _three_floats(name: str, values: Sequence[float]) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"transform {name} must be three numbers, got {values!r}") from exc
    if len(out) != 3:
        raise ValueError(f"transform {name} must be three numbers (RGB), got {values!r}")
    return out
