"""Trained baselines beside the eNTK: fine-tuning, LP-FT and training from scratch (Ray-free).

Kumar et al. (ICLR 2022) compare linear probing with fine-tuning (FT), linear probing followed by
fine-tuning (LP-FT) and training from scratch; this module trains all three on the run's own splits
so every benchmark's table has measured rows. The network is the backbone g_θ (D features) with a
linear head, logits(x) = W g_θ(x) + b, W ∈ R^{C×D}, trained on cross-entropy:

* ``ft`` — pretrained g_θ, a fresh head (PyTorch's default ``nn.Linear`` init, seeded);
* ``lpft`` — pretrained g_θ, the head of the run's linear probe. The probe scores
  z = A (g − μ)/σ + a on standardized features, so the head that gives the same logits on raw
  features is W = A / σ (column-wise) and b = a − A (μ/σ) (:func:`probe_head`); with two classes
  scikit-learn fits one row A, and the head is [0; A] (same softmax);
* ``scratch`` — the same architecture from a seeded random initialization.

Protocol (Kumar et al.'s Living-17 recipe, every number in ``FinetuneConfig``): SGD with momentum
0.9, no weight decay, global batch 64, 20 epochs, learning rate following a per-step cosine from
``lr`` to 0, BatchNorm in training mode (``batchnorm="frozen"`` keeps the pretrained statistics for
``ft``/``lpft`` instead; the default ``"auto"`` does so on the digits shift: :func:`resolve_batchnorm`). The training split is augmented (``entk_ray.data.augment``);
evaluation uses the benchmark's own splits and transform, with the model in eval mode. Every epoch
records the accuracy of every evaluation set (epoch 0: at initialization). For each learning rate of
the grid the best epoch by selection-set accuracy is kept (earliest on ties, epochs ≥ 1: early
stopping, as for the eNTK), and the learning rate whose best epoch is best wins (smallest on ties).

Data order and augmentation depend on (seed, epoch, example) only: :class:`GlobalBatchSampler` cuts
one seeded permutation into global batches and gives each of W workers a contiguous 1/W of every
batch, and the augmentation is seeded per example. So W DDP workers (gradients averaged) take the
same steps as one worker with the same global batch (up to float summation order and BatchNorm,
whose batch statistics are per worker unless SyncBatchNorm syncs them on GPUs), and a run resumed
from a checkpoint repeats an uninterrupted one.

:func:`run_trial` is one (method, learning rate) training run as plain torch; it runs here for the
one-process path (:func:`local_baselines`) and inside each Ray Train worker for the distributed one
(``entk_ray.distributed.train``), which only adds DDP, checkpoints and the Tune sweep around it.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from entk_ray.config import Config, ConfigError, FinetuneConfig, ModelConfig
from entk_ray.fingerprints import digest

METHODS = ("ft", "lpft", "scratch")
METHOD_NAMES = {"ft": "Fine-tuning", "lpft": "LP-FT", "scratch": "From scratch"}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """Everything a trial's numbers depend on besides the method, the learning rate and the data."""

    epochs: int = 20
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "auto"
    channels_last: bool = True
    sync_batchnorm: bool = True
    eval_batch_size: int = 256
    loader_workers: int = 0
    batchnorm: str = "train"

    @classmethod
    def from_config(cls, ft: FinetuneConfig, benchmark: str | None = None) -> "TrainSettings":
        """``benchmark`` (``data.benchmark``) resolves ``batchnorm="auto"`` (:func:`resolve_batchnorm`)."""
        loaders = ft.loader_workers if ft.loader_workers is not None else max(0, int(ft.cpus_per_worker) - 1)
        return cls(ft.epochs, ft.batch_size, float(ft.momentum), float(ft.weight_decay), ft.seed, ft.precision,
                   ft.channels_last, ft.sync_batchnorm, ft.eval_batch_size, loaders,
                   resolve_batchnorm(ft.batchnorm, benchmark))

    def numerics(self) -> dict[str, Any]:
        """The settings that change the numbers (not the DataLoader processes)."""
        out = asdict(self)
        out.pop("loader_workers")
        out.pop("eval_batch_size")
        return out


#: Benchmarks on which ``finetune.batchnorm="auto"`` keeps the pretrained BatchNorm statistics.
FROZEN_BATCHNORM_BENCHMARKS = ("digits",)


def resolve_batchnorm(batchnorm: str, benchmark: str | None) -> str:
    """``"auto"`` → ``"frozen"`` on the digits shift, ``"train"`` (Kumar et al.) elsewhere.

    Why the digits differ (measured, docs/finetuning.md): their batch statistics are far from the
    ImageNet running statistics (a late layer's batch variance is 3 % of its running variance), so
    in training mode Lite0's features are another function (cosine 0.14 to the pretrained ones, 2.6×
    smaller) on which a fresh head learns several times slower; the few steps of a small digits run
    then leave the training loss near log 10, and the running statistics, updated with momentum 0.1,
    match neither the pretrained network nor the trained one.
    """
    if batchnorm == "auto":
        return "frozen" if benchmark in FROZEN_BATCHNORM_BENCHMARKS else "train"
    return batchnorm


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for ``precision="bf16"``, or ``"auto"`` on CUDA; None (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """``logits(x) = head(backbone(x))``: a backbone ``(B, C, H, W) → (B, D)`` and a linear head."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@dataclass
class ProbeHead:
    """The linear probe as a head on raw penultimate features: logits = weight · g + bias."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)

    def linear(self) -> nn.Linear:
        head = nn.Linear(self.weight.shape[1], self.weight.shape[0], device="meta")
        head.weight = nn.Parameter(torch.tensor(np.array(self.weight, dtype=np.float32)))
        head.bias = nn.Parameter(torch.tensor(np.array(self.bias, dtype=np.float32)))
        return head

    def fingerprint(self) -> str:
        return digest({"weight": np.asarray(self.weight, np.float32).tobytes().hex(),
                       "bias": np.asarray(self.bias, np.float32).tobytes().hex()})


def probe_head(probe, num_classes: int) -> ProbeHead:
    """Fold the probe's standardization into a head (see the module docstring).

    ``probe`` is a :class:`entk_ray.baselines.ProbeResult` (``coef``, ``intercept``, ``mean``,
    ``scale``, ``classes``). A class absent from the probe's training labels gets a zero row and a
    bias 10 below the smallest, so it starts out never predicted, as the probe never predicts it.
    """
    if probe.coef is None:
        raise ValueError("LP-FT needs the fitted probe (ProbeResult.coef); this ProbeResult has none")
    coef = np.asarray(probe.coef, np.float64)
    intercept = np.asarray(probe.intercept, np.float64)
    classes = np.asarray(probe.classes)
    if coef.shape[0] == 1 and classes.size == 2:  # binary: one decision function for classes[1]
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    weight_rows = coef / np.asarray(probe.scale, np.float64)[None, :]
    bias_rows = intercept - weight_rows @ np.asarray(probe.mean, np.float64)
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, bias_rows.min() - 10.0)
    weight[classes] = weight_rows
    bias[classes] = bias_rows
    return ProbeHead(weight.astype(np.float32), bias.astype(np.float32))


def seeded_linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from a private seed (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return nn.Linear(in_features, out_features)


class ClassifierFactory:
    """Builds the network each baseline trains; picklable, so every Ray Train worker builds its own.

    Subclasses provide :meth:`pretrained_backbone`, :meth:`random_backbone` and :meth:`fingerprint`.
    """

    def pretrained_backbone(self) -> tuple[nn.Module, int]:
        raise NotImplementedError

    def random_backbone(self, seed: int) -> tuple[nn.Module, int]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    def __call__(self, method: str, num_classes: int, head: ProbeHead | None = None, seed: int = 0) -> Classifier:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        backbone, dim = self.random_backbone(seed) if method == "scratch" else self.pretrained_backbone()
        if method == "lpft":
            if head is None:
                raise ValueError("LP-FT needs the linear probe's head")
            if head.weight.shape != (num_classes, dim):
                raise ValueError(f"probe head has shape {head.weight.shape}, expected {(num_classes, dim)}")
            linear = head.linear()
        else:
            linear = seeded_linear(dim, num_classes, seed)
        return Classifier(backbone, linear).train()


def random_backbones() -> dict[str, Callable[[], nn.Module]]:
    """Randomly initialized backbones by ``model.name``: what ``scratch`` trains."""
    from entk_ray import models

    return {"efficientnet_lite0": models.create_lite0_backbone,
            **{arch: (lambda arch=arch: models.create_resnet_backbone(arch)) for arch in models.RESNET_ARCHS}}


class ConfigClassifierFactory(ClassifierFactory):
    """The run's backbone (``model.name`` with its weights) or its random initialization."""

    def __init__(self, model_cfg: ModelConfig, storage_options: dict[str, Any] | None = None):
        self.model_cfg = model_cfg
        self.storage_options = dict(storage_options or {})

    def pretrained_backbone(self) -> tuple[nn.Module, int]:
        from entk_ray.models import backbone

        entry = backbone(self.model_cfg.name)
        net = entry.load(self.model_cfg.weights, self.model_cfg.checkpoint_format, self.storage_options)
        return net, entry.feature_dim

    def random_backbone(self, seed: int) -> tuple[nn.Module, int]:
        from entk_ray.models import backbone

        constructors = random_backbones()
        if self.model_cfg.name not in constructors:
            raise ConfigError(f"finetune.baselines 'scratch' has no random initialization for model.name="
                              f"{self.model_cfg.name!r} (known: {', '.join(constructors)})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = constructors[self.model_cfg.name]()
        return net, backbone(self.model_cfg.name).feature_dim

    def fingerprint(self) -> str:
        from entk_ray.models import weights_fingerprint

        return digest({"model": self.model_cfg.name,
                       "weights": weights_fingerprint(self.model_cfg, self.storage_options)})


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------
class GlobalBatchSampler(Sampler[int]):
    """This worker's share of every global batch of one seeded permutation per epoch.

    The permutation of ``n`` examples depends on ``(seed, epoch)`` only; it is cut into
    ``n // batch_size`` full global batches (the last partial batch is dropped, so every step
    averages the same number of examples) and worker ``rank`` of ``world`` gets the contiguous
    slice ``[rank·b, (rank+1)·b)`` of each, b = batch_size / world. Iterate with a DataLoader of
    batch size b.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        if batch_size % world:
            raise ValueError(f"global batch size {batch_size} is not a multiple of the {world} workers")
        if n < batch_size:
            raise ValueError(f"the training set has {n} examples, fewer than one global batch of {batch_size} "
                             f"(finetune.batch_size)")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.local = batch_size // world
        self.steps = n // batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, 7919])
                                                      .generate_state(1)[0]))
        order = torch.randperm(self.n, generator=generator)[: self.steps * self.batch_size]
        mine = order.view(self.steps, self.world, self.local)[:, self.rank, :]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return self.steps * self.local


# --------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------
@dataclass
class TrialInputs:
    """What every trial of a run trains and evaluates on (shipped once to each Ray Train worker)."""

    factory: ClassifierFactory
    train: Dataset  # augmented (SeededAugmentation, possibly inside a Subset for a holdout)
    evals: dict[str, Dataset]  # "id_val", "ood:<name>"… and "holdout" when selecting on one
    num_classes: int
    select_on: str
    head: ProbeHead | None = None  # the linear probe's, for LP-FT
    description: dict[str, Any] = field(default_factory=dict)  # for the checkpoint key

    def fingerprint(self, method: str, settings: TrainSettings) -> str:
        """Key of a (method, settings) sweep: everything but the learning rate."""
        return digest({"method": method, "settings": settings.numerics(), "model": self.factory.fingerprint(),
                       "data": self.description, "select_on": self.select_on, "classes": self.num_classes,
                       "head": self.head.fingerprint() if method == "lpft" and self.head is not None else None})


def _augmented(dataset: Dataset):
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def _shard(n: int, rank: int, world: int) -> range:
    return range(rank, n, world)


@torch.no_grad()
def evaluate_examples(model: nn.Module, evals: dict[str, Dataset], device: torch.device, *, batch_size: int = 256,
                      autocast: torch.dtype | None = None, channels_last: bool = False, rank: int = 0,
                      world: int = 1, num_workers: int = 0) -> dict[str, np.ndarray]:
    """Per-example correctness ``argmax logits == label`` on every set (bool, in the set's order),
    with the model in eval mode (left in it).

    With ``world > 1`` each worker scores examples ``rank, rank + world, …`` and the disjoint
    per-worker masks are summed over the process group, so every worker returns the whole sets'.
    """
    model.eval()
    correct = {}
    for name, dataset in evals.items():
        indices = list(_shard(len(dataset), rank, world))
        mask = torch.zeros(len(dataset), dtype=torch.int32)
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda")
        done = 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast):
                logits = model(images)
            batch = indices[done:done + len(labels)]
            mask[batch] = (logits.argmax(1).cpu() == labels).to(torch.int32)
            done += len(labels)
        if world > 1:
            mask = mask.to(device)
            dist.all_reduce(mask)
            mask = mask.cpu()
        correct[name] = mask.numpy().astype(bool)
    return correct


def pack_correct(correct: dict[str, np.ndarray]) -> dict[str, str]:
    """Per-example correctness in a history record: ``"<n>:<base64 of the packed bits>"`` per set
    (1,700 examples take 292 characters)."""
    import base64

    return {name: f"{mask.size}:{base64.b64encode(np.packbits(mask.astype(bool))).decode()}"
            for name, mask in correct.items()}


def unpack_correct(packed: dict[str, str]) -> dict[str, np.ndarray]:
    """The bool arrays of :func:`pack_correct`."""
    import base64

    out = {}
    for name, text in packed.items():
        size, bits = text.split(":", 1)
        out[name] = np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=int(size)).astype(bool)
    return out


def _scored(model: nn.Module, evals: dict[str, Dataset], device: torch.device, **options) -> dict[str, Any]:
    """A history record's ``accuracy`` and ``correct`` (packed) fields."""
    correct = evaluate_examples(model, evals, device, **options)
    return {"accuracy": {name: float(mask.mean()) for name, mask in correct.items()},
            "correct": pack_correct(correct)}


def set_training(model: nn.Module, frozen_batchnorm: bool) -> None:
    """Training mode; with ``frozen_batchnorm`` BatchNorm layers stay in eval mode: they normalize
    with the pretrained running statistics and leave them alone (their affine weights still train)."""
    model.train()
    if frozen_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _sync_buffers(model: nn.Module) -> None:
    """Give every worker rank 0's BatchNorm statistics (what DDP does before each forward)."""
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def run_trial(inputs: TrialInputs, method: str, lr: float, settings: TrainSettings, device: torch.device, *,
              rank: int = 0, world: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None,
              resume: dict | None = None, on_epoch: Callable[[int, list[dict], Callable[[], dict]], None] | None = None,
              model: nn.Module | None = None) -> list[dict]:
    """Train one (method, learning rate) and return its history: one record per epoch (0 = init).

    Args:
        wrap: wraps the model for the step (DDP under Ray Train); evaluation uses the bare model.
        resume: a :func:`state` dict from a checkpoint: training continues after its epoch.
        on_epoch: ``on_epoch(epoch, history, state)`` after each trained epoch; ``state()`` builds
            the checkpoint dict (model, optimizer, schedule, history).
        model: a prebuilt classifier (tests); default: ``inputs.factory(method, …)``.

    Each record: ``epoch``, ``step``, ``lr`` (at the end of the epoch), ``train_loss`` (mean over
    the epoch's global batches), ``accuracy`` ({set: fraction}), ``correct`` (per-example
    correctness, :func:`pack_correct`: the table's bootstrap intervals), ``seconds`` and
    ``examples_per_s`` (training only, all workers).
    """
    s = settings
    autocast = autocast_dtype(s.precision, device)
    channels_last = s.channels_last and device.type == "cuda"
    model = model if model is not None else inputs.factory(method, inputs.num_classes, inputs.head, s.seed)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and s.sync_batchnorm and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    frozen_batchnorm = s.batchnorm == "frozen" and method != "scratch"  # scratch has no statistics to keep
    set_training(model, frozen_batchnorm)
    net = wrap(model) if wrap is not None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    sampler = GlobalBatchSampler(len(inputs.train), s.batch_size, rank, world, s.seed)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=s.epochs * sampler.steps)
    loader = DataLoader(inputs.train, batch_size=sampler.local, sampler=sampler, num_workers=s.loader_workers,
                        pin_memory=device.type == "cuda")
    score = dict(batch_size=s.eval_batch_size, autocast=autocast, channels_last=channels_last, rank=rank,
                 world=world, num_workers=s.loader_workers)

    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        schedule.load_state_dict(resume["schedule"])
        history = list(resume["history"])
    else:
        history = [{"epoch": 0, "step": 0, "lr": lr, "train_loss": None,
                    **_scored(model, inputs.evals, device, **score), "seconds": 0.0, "examples_per_s": None}]
    augmented = _augmented(inputs.train)

    def state() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "history": history, "epoch": history[-1]["epoch"]}

    for epoch in range(history[-1]["epoch"] + 1, s.epochs + 1):
        set_training(model, frozen_batchnorm)
        augmented.set_epoch(epoch)
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast):
                loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach().double()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
            _sync_buffers(model)
        history.append({"epoch": epoch, "step": epoch * sampler.steps, "lr": schedule.get_last_lr()[0],
                        "train_loss": float(loss_sum) / sampler.steps,
                        **_scored(model, inputs.evals, device, **score), "seconds": seconds,
                        "examples_per_s": sampler.steps * s.batch_size / seconds if seconds > 0 else None})
        if on_epoch is not None:
            on_epoch(epoch, history, state)
    return history


# --------------------------------------------------------------------------------------------
# Selection and results
# --------------------------------------------------------------------------------------------
def best_epoch(history: Sequence[dict], select_on: str) -> dict:
    """The record with the best selection accuracy among trained epochs (earliest on ties)."""
    trained = [rec for rec in history if rec["epoch"] >= 1] or list(history)
    return max(trained, key=lambda rec: (rec["accuracy"][select_on], -rec["epoch"]))


@dataclass
class TrialResult:
    lr: float
    history: list[dict]
    resumed_from_epoch: int | None = None  # set when the trial continued from a checkpoint

    def best(self, select_on: str) -> dict:
        return best_epoch(self.history, select_on)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BaselineResult:
    """One trained baseline: every learning rate's history and the chosen (lr, epoch)."""

    method: str
    select_on: str
    trials: list[TrialResult]

    @property
    def chosen(self) -> TrialResult:
        ordered = sorted(self.trials, key=lambda t: t.lr)
        return max(ordered, key=lambda t: (t.best(self.select_on)["accuracy"][self.select_on], -ordered.index(t)))

    def row(self, id_name: str = "id_val") -> dict:
        """The table row: accuracies at the chosen learning rate's best epoch."""
        trial = self.chosen
        record = trial.best(self.select_on)
        oods = [name for name in record["accuracy"] if name.startswith("ood:")]
        return {"method": METHOD_NAMES[self.method], "id_acc": record["accuracy"][id_name],
                "ood_acc": record["accuracy"][oods[0]] if oods else None,
                "ood": {name.removeprefix("ood:"): record["accuracy"][name] for name in oods},
                "lr": trial.lr, "epoch": record["epoch"], "source": "measured"}

    def chosen_correct(self) -> dict[str, np.ndarray] | None:
        """Per-example correctness at the chosen (learning rate, epoch), by set; None for a history
        stored before records carried it."""
        packed = self.chosen.best(self.select_on).get("correct")
        return unpack_correct(packed) if packed else None

    def to_dict(self) -> dict:
        chosen = self.chosen
        return {"method": self.method, "name": METHOD_NAMES[self.method], "select_on": self.select_on,
                "chosen_lr": chosen.lr, "chosen_epoch": chosen.best(self.select_on)["epoch"],
                "trials": [t.to_dict() for t in self.trials]}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def trial_inputs(cfg: Config, benchmark, probe=None, factory: ClassifierFactory | None = None,
                 select_on: str = "id_val") -> TrialInputs:
    """The training set (augmented), the evaluation sets and the LP-FT head for a run.

    ``select_on="holdout"`` trains on the train split minus the eNTK's holdout slice and scores
    that slice (eval transform) as the selection set, as the eNTK and the probe do.
    """
    from entk_ray.data.augment import training_set
    from entk_ray.data.transforms import describe_transform
    from entk_ray.models import normalization

    ft = cfg.finetune
    mean, std = normalization(cfg.model.name)
    train = training_set(benchmark.train, ft.augment, crop=cfg.data.crop_size, mean=mean, std=std, seed=ft.seed)
    evals = dict(benchmark.eval_sets())
    if select_on == "holdout":
        from entk_ray.solvers import holdout_split

        fit, hold = holdout_split(benchmark.train.labels, cfg.solver.holdout_fraction, cfg.solver.seed)
        evals["holdout"] = Subset(benchmark.train, hold)
        train = Subset(train, fit)
    head = probe_head(probe, benchmark.num_classes) if "lpft" in ft.baselines and probe is not None else None
    description = {"benchmark": benchmark.manifest_hash(), "augment": _augmented(train).describe(),
                   "eval_transform": describe_transform(getattr(benchmark.train, "transform", None)),
                   "holdout": [cfg.solver.holdout_fraction, cfg.solver.seed] if select_on == "holdout" else None}
    return TrialInputs(factory or ConfigClassifierFactory(cfg.model, cfg.storage_options), train, evals,
                       benchmark.num_classes, select_on, head, description)


def local_baselines(cfg: Config, inputs: TrialInputs, log: Callable[[str], None] = print) -> dict[str, BaselineResult]:
    """Every configured baseline and learning rate, one after another in this process (no checkpoints)."""
    from entk_ray.featurizer import resolve_device

    settings = TrainSettings.from_config(cfg.finetune, cfg.data.benchmark)
    device = resolve_device(cfg.features.device)
    results = {}
    for method in cfg.finetune.baselines:
        trials = []
        for lr in cfg.finetune.lr_grid:
            start = time.perf_counter()
            trials.append(TrialResult(float(lr), run_trial(inputs, method, float(lr), settings, device)))
            best = trials[-1].best(inputs.select_on)
            log(f"{METHOD_NAMES[method]} lr={lr:g}: best epoch {best['epoch']} "
                f"({inputs.select_on} {100 * best['accuracy'][inputs.select_on]:.1f}%) "
                f"in {time.perf_counter() - start:.1f}s")
        results[method] = BaselineResult(method, inputs.select_on, trials)
    return results


def run_baselines(cfg: Config, benchmark, probe, select_on: str, fingerprint: str,
                  log: Callable[[str], None] = print, factory: ClassifierFactory | None = None
                  ) -> dict[str, BaselineResult]:
    """The pipeline's training stage: on Ray Train + Tune when ``cfg.use_ray``, else in this process."""
    select_on = "holdout" if select_on == "holdout" else "id_val"
    inputs = trial_inputs(cfg, benchmark, probe, factory, select_on)
    if cfg.use_ray:
        from entk_ray.distributed.train import ray_baselines  # lazy: the Ray layer sits above this module

        return ray_baselines(cfg, inputs, fingerprint, log=log)
    return local_baselines(cfg, inputs, log=log)
