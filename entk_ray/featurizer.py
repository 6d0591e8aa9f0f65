"""The featurizer: a scalar-head model, its parameter subset S and a feature computer, built once.

One :class:`Featurizer` lives in each process that computes features (the driver with the
one-process backend, each Ray feature actor otherwise). It maps dataset rows to

* Φ (rows × p): φ(x) = ∂f(x)/∂θ_S for the scalar output f(x) = wᵀ g_θ(x) (``entk_ray.features``);
* the penultimate embeddings g_θ(x) (rows × D), for the linear probe.

A *featurizer factory* is a picklable callable ``factory(device) -> Featurizer`` with a
``weights_fingerprint()`` method: backends receive a factory rather than a featurizer, so a Ray
actor builds its own copy on its own device. :class:`ConfigFeaturizerFactory` builds the configured
model; tests pass factories for tiny models (``entk_ray.distributed.testing``).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from entk_ray.config import FeatureConfig, ModelConfig
from entk_ray.feature_maps import FeatureMap, map_from_config
from entk_ray.features import FeatureComputer, ParameterSubset, compute_embeddings, compute_features


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Featurizer:
    """Model + S + feature computer, with the feature settings that batch and store Φ.

    Build it from its parts, from a model (:meth:`from_model`: draws S and picks the computer
    the config asks for) or from the config (:meth:`from_config`: also loads the backbone)."""

    def __init__(self, model: nn.Module, subset: ParameterSubset | FeatureMap, computer: FeatureComputer,
                 feature_cfg: FeatureConfig):
        self.model = model
        # The feature map (a parameter subset S, or any FeatureMap): its fingerprint() and p key
        # the artifacts. Kept under the name ``subset`` for the backends that read it.
        self.subset = subset
        self.computer = computer
        self.feature_cfg = feature_cfg

    @classmethod
    def from_model(cls, model: nn.Module, feature_cfg: FeatureConfig) -> "Featurizer":
        """The configured feature map (``features.map``; default: S drawn uniformly from ``model``'s
        parameters, seeded) and its feature computer."""
        model = model.eval()
        feature_map = map_from_config(model, feature_cfg)
        computer = feature_map.computer(model, feature_cfg.method, feature_cfg.chunk_size)
        return cls(model, feature_map, computer, feature_cfg)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, feature_cfg: FeatureConfig,
                    storage_options: dict[str, Any] | None = None,
                    device: str | torch.device | None = None) -> "Featurizer":
        """The configured backbone with its weights and seeded scalar head, on ``device``
        (default: ``feature_cfg.device``)."""
        from entk_ray.models import build_model

        device = resolve_device(feature_cfg.device) if device is None else torch.device(device)
        model = build_model(model_cfg, storage_options=storage_options).to(device)
        return cls.from_model(model, feature_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def features(self, dataset, indices: Iterable[int] | None = None, progress: bool = False,
                 desc: str = "features") -> torch.Tensor:
        """Φ for (a row range of) ``dataset``, on the CPU, in the configured storage dtype."""
        f = self.feature_cfg
        return compute_features(self.computer, dataset, indices, batch_size=f.batch_size,
                                storage_dtype=f.storage_dtype, num_workers=f.num_workers, progress=progress,
                                desc=desc)

    def embeddings(self, dataset, indices: Iterable[int] | None = None) -> torch.Tensor:
        """Penultimate features g_θ(x), float32 on the CPU."""
        f = self.feature_cfg
        return compute_embeddings(self.model, dataset, indices, batch_size=max(f.batch_size, 64),
                                  num_workers=f.num_workers)


class ConfigFeaturizerFactory:
    """``factory(device) -> Featurizer`` for the run's model and feature config (picklable)."""

    def __init__(self, model_cfg: ModelConfig, feature_cfg: FeatureConfig,
                 storage_options: dict[str, Any] | None = None):
        self.model_cfg = model_cfg
        self.feature_cfg = feature_cfg
        self.storage_options = dict(storage_options or {})

    def __call__(self, device: str | torch.device | None = None) -> Featurizer:
        return Featurizer.from_config(self.model_cfg, self.feature_cfg, self.storage_options, device=device)

    def weights_fingerprint(self) -> str:
        """Hash of the weights file the model loads (see :func:`entk_ray.models.weights_fingerprint`)."""
        from entk_ray.models import weights_fingerprint

        return weights_fingerprint(self.model_cfg, self.storage_options)
