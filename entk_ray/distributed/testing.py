"""A tiny model and benchmark for tests, smoke checks and fault injection (no data, no weights).

Why it lives in the package: Ray workers must import whatever a task or actor receives, and test
modules are not importable from worker processes (nor from other nodes). Everything here is small
and deterministic: the CNN is seeded without touching the global RNG, and the benchmark is drawn
from a seeded generator, so a driver and any actor build bitwise-identical copies.

* :func:`tiny_model` — conv → BatchNorm → ReLU → conv(stride 2) → BatchNorm → ReLU → global
  average pool (D = ``width``·2) with the usual scalar head; BatchNorm running statistics are
  randomized so eval-mode BatchNorm is not the identity.
* :class:`TinyFeaturizerFactory` — the ``factory(device) -> featurizer`` contract of
  :class:`~entk_ray.distributed.RayBackend` for that model.
* :func:`tiny_benchmark` — a few classes of noisy prototypes (ID) and shifted, noisier copies (OOD).
* :class:`CrashOnceFactory` — wraps a factory so the process computing one chosen shard exits
  mid-shard (once per marker file): a real crash for fault-tolerance tests; :class:`SlowFactory`
  makes every shard slower, so a fault injected mid-call lands mid-call.
* :class:`TinyClassifierFactory` / :class:`CrashOnceClassifierFactory` — the same for the trained
  baselines (``entk_ray.finetune``): a tiny classifier, and one whose training process exits once.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from entk_ray.config import FeatureConfig
from entk_ray.data.base import Benchmark, TensorLabeledDataset
from entk_ray.featurizer import Featurizer
from entk_ray.finetune import ClassifierFactory


def tiny_model(seed: int = 0, width: int = 4, head_seed: int = 0) -> nn.Module:
    """A seeded two-conv CNN with BatchNorm and a scalar head, in eval mode."""
    from entk_ray.models import ScalarHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        for module in backbone:
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.1, 0.1)
    return ScalarHeadModel(backbone, feature_dim=2 * width, head_seed=head_seed).eval()


class TinyFeaturizerFactory:
    """Picklable ``factory(device) -> Featurizer`` of :func:`tiny_model`."""

    def __init__(self, feature_cfg: FeatureConfig, seed: int = 0, width: int = 4, head_seed: int = 0):
        self.feature_cfg = feature_cfg
        self.seed, self.width, self.head_seed = seed, width, head_seed

    def __call__(self, device=None) -> Featurizer:
        model = tiny_model(self.seed, self.width, self.head_seed).to(device or "cpu")
        return Featurizer.from_model(model, self.feature_cfg)

    def weights_fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, tensor in tiny_model(self.seed, self.width, 0).backbone.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def tiny_benchmark(n_train: int = 96, n_id_val: int = 48, n_ood: int = 48, num_classes: int = 4,
                   image_size: int = 12, seed: int = 0) -> Benchmark:
    """Noisy class prototypes (ID train / ID val) and shifted, noisier prototypes (OOD "shifted")."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(num_classes, 3, image_size, image_size)).astype(np.float32)

    def split(n: int, noise: float, shift: float) -> TensorLabeledDataset:
        labels = np.arange(n) % num_classes
        images = prototypes[labels] + noise * rng.normal(size=(n, 3, image_size, image_size)).astype(np.float32)
        return TensorLabeledDataset(torch.from_numpy((images + shift).astype(np.float32)), labels)

    train, id_val, ood = split(n_train, 1.0, 0.0), split(n_id_val, 1.0, 0.0), split(n_ood, 1.5, 0.5)
    manifest = {"benchmark": "tiny", "seed": seed, "sizes": [n_train, n_id_val, n_ood],
                "num_classes": num_classes, "image_size": image_size}
    return Benchmark("tiny", [str(c) for c in range(num_classes)], train, id_val, {"shifted": ood}, manifest)


class _CrashingFeaturizer:
    def __init__(self, inner, marker: str, dataset_len: int, start: int, mode: str):
        self._inner, self._marker, self._len, self._start, self._mode = inner, marker, dataset_len, start, mode

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def features(self, dataset, indices=None, **kwargs):
        first = next(iter(indices)) if indices is not None else 0
        if len(dataset) == self._len and first == self._start and not os.path.exists(self._marker):
            Path(self._marker).write_text(str(os.getpid()))
            if self._mode == "raise":
                raise RuntimeError(f"injected failure in the shard starting at row {first}")
            os._exit(1)  # the actor process dies mid-shard, like a segfault or an OOM kill
        return self._inner.features(dataset, indices, **kwargs)


class _SlowFeaturizer:
    def __init__(self, inner, seconds: float):
        self._inner, self._seconds = inner, seconds

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def features(self, dataset, indices=None, **kwargs):
        time.sleep(self._seconds)
        return self._inner.features(dataset, indices, **kwargs)


class SlowFactory:
    """Wraps a featurizer factory: every shard takes ``seconds`` longer, so a fault injected
    while a shard is in flight lands mid-call (tiny models otherwise finish in milliseconds)."""

    def __init__(self, inner, seconds: float):
        self.inner, self.seconds = inner, seconds

    def __call__(self, device="cpu"):
        return _SlowFeaturizer(self.inner(device), self.seconds)

    def weights_fingerprint(self) -> str:
        return self.inner.weights_fingerprint()


class CrashOnceFactory:
    """Wraps a featurizer factory: the first process to compute the shard starting at row
    ``start`` of the split with ``dataset_len`` rows exits (``mode="exit"``: ``os._exit``) or
    raises (``mode="raise"``); ``marker`` (a file) records that it happened, so the retry
    computes the shard normally."""

    def __init__(self, inner, marker: str | os.PathLike, dataset_len: int, start: int, mode: str = "exit"):
        if mode not in ("exit", "raise"):
            raise ValueError(f"mode must be 'exit' or 'raise', got {mode!r}")
        self.inner, self.marker, self.dataset_len, self.start, self.mode = inner, str(marker), dataset_len, start, mode

    def __call__(self, device="cpu"):
        return _CrashingFeaturizer(self.inner(device), self.marker, self.dataset_len, self.start, self.mode)

    def weights_fingerprint(self) -> str:
        return self.inner.weights_fingerprint()


class TinyAblationSetup:
    """The ablation runner's setup (``entk_ray.ablation.ConfigSetup``) for :func:`tiny_model` and
    :func:`tiny_benchmark`: the head seed comes from ``cfg.model.head_seed``, sizes from ``cfg.data``."""

    def __init__(self, width: int = 4, image_size: int = 10):
        self.width, self.image_size = width, image_size

    def benchmark(self, cfg) -> Benchmark:
        d = cfg.data
        return tiny_benchmark(d.n_train, d.n_id_val, d.n_ood, image_size=self.image_size, seed=d.seed)

    def model(self, cfg) -> nn.Module:
        return tiny_model(0, self.width, head_seed=cfg.model.head_seed)

    def weights_fingerprint(self, cfg) -> str:
        return TinyFeaturizerFactory(FeatureConfig(), width=self.width).weights_fingerprint()


# --------------------------------------------------------------------------------------------
# trained baselines (entk_ray.finetune)


class TinyClassifierFactory(ClassifierFactory):
    """``ClassifierFactory`` over the tiny CNN: "pretrained" = :func:`tiny_model`'s backbone with
    ``seed``; random = the same architecture drawn from the trial's seed. ``norm="group"`` uses
    GroupNorm instead of BatchNorm: per-example statistics, so DDP workers on CPUs (no SyncBatchNorm
    there) take exactly one worker's steps."""

    def __init__(self, seed: int = 0, width: int = 4, norm: str = "batch"):
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        self.seed, self.width, self.norm = seed, width, norm

    def _backbone(self, seed: int) -> nn.Module:
        if self.norm == "batch":
            return tiny_model(seed, self.width).backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Sequential(nn.Conv2d(3, self.width, 3, padding=1), nn.GroupNorm(1, self.width), nn.ReLU(),
                                 nn.Conv2d(self.width, 2 * self.width, 3, stride=2, padding=1),
                                 nn.GroupNorm(1, 2 * self.width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def pretrained_backbone(self):
        return self._backbone(self.seed), 2 * self.width

    def random_backbone(self, seed: int):
        return self._backbone(10_000 + seed), 2 * self.width

    def fingerprint(self) -> str:
        return f"tiny-{self.seed}-{self.width}-{self.norm}"


class CrashOnceClassifierFactory:
    """Wraps a classifier factory: the process whose model takes training step ``after_steps + 1``
    exits (``os._exit``) unless ``marker`` exists; it creates the marker first, so a resumed run
    trains normally. A real crash of a Ray Train worker, for the resume test.

    Ray Train's controller registers a reported checkpoint when it next polls the workers (every
    2 s), and a rerun resumes from the last *registered* one. With ``registered_under`` (a local
    folder holding the trainer's storage) the process first waits, up to ``wait_s``, until Ray
    Train's checkpoint-manager snapshot appears there, so the epoch a test resumes from is known."""

    SNAPSHOT = "checkpoint_manager_snapshot.json"

    def __init__(self, inner, marker: str | os.PathLike, after_steps: int,
                 registered_under: str | os.PathLike | None = None, wait_s: float = 60.0):
        self.inner, self.marker, self.after_steps = inner, str(marker), int(after_steps)
        self.registered_under = None if registered_under is None else str(registered_under)
        self.wait_s = float(wait_s)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()

    def _wait_for_registration(self) -> None:
        if self.registered_under is None:
            return
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline and not any(Path(self.registered_under).rglob(self.SNAPSHOT)):
            time.sleep(0.05)

    def __call__(self, method, num_classes, head=None, seed=0):
        model = self.inner(method, num_classes, head, seed)
        steps = [0]
        marker, after = self.marker, self.after_steps

        def count(module, _args):
            if module.training:
                steps[0] += 1
                if steps[0] > after and not os.path.exists(marker):
                    self._wait_for_registration()
                    Path(marker).write_text(str(os.getpid()))
                    os._exit(1)

        model.register_forward_pre_hook(count)
        return model
