"""The trained baselines on Ray: each (method, learning rate) is a Ray Train ``TorchTrainer`` run,
and each method's learning-rate sweep is one Ray Tune run over those trainers.

The numbers come from the Ray-free :func:`entk_ray.finetune.run_trial`; this module only places it:

* **Ray Train.** :func:`train_worker` runs on every worker of a ``TorchTrainer`` (``ScalingConfig``:
  ``finetune.num_workers`` workers with one GPU each on a GPU cluster, else ``cpus_per_worker`` CPUs;
  process group NCCL or gloo). With more than one worker the model is wrapped in DDP
  (``ray.train.torch.prepare_model``) and each worker takes its 1/W of every global batch. After
  each epoch, rank 0 writes a checkpoint (model, SGD momentum, schedule, history) and every worker
  calls ``ray.train.report``.
* **Checkpoints and resume.** A trainer's ``RunConfig`` points at the run's artifact store (local
  folder or ``s3://``) under the run fingerprint, the sweep's key (method, training settings, model,
  data, LP-FT head: :meth:`TrialInputs.fingerprint`) and the learning rate::

      <artifact store>/<run fingerprint>/finetune/checkpoints/<method>-<key>/lr-<lr>/checkpoint_…

  Ray Train keeps a snapshot of the checkpoints it registered there; a later trainer with the same
  name and storage path (the same command, rerun after a crash or a kill) restores it, and
  :func:`train_worker` continues after the last checkpointed epoch. ``finetune.max_failures``
  restarts a failed worker group from the last checkpoint within the same run. A finished trial's
  history is stored as ``finetune/results/<method>-<key>/lr-<lr>`` (JSON), so a rerun skips it.
* **Ray Tune.** One ``Tuner`` per method: a grid over the learning rates still missing, each trial
  a function that builds and fits one ``TorchTrainer`` (the Ray Train V2 pattern; the trial itself
  holds almost nothing, the trainer's workers hold the CPUs/GPUs) and reports the trial's epochs to
  Tune. As many trials run at once as the cluster holds (``finetune.max_concurrent`` to cap it).

The training inputs (datasets, factory, LP-FT head) go into the object store once per run.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from entk_ray.distributed.runtime import cluster_cpus, cluster_gpus, init_ray, shutdown_ray
from entk_ray.distributed.sweep import _quiet_tune, tune_storage
from entk_ray.finetune import (METHOD_NAMES, BaselineResult, TrainSettings, TrialInputs, TrialResult,
                               run_trial)
from entk_ray.storage import is_remote
from entk_ray.store import ArtifactStore, Namespace

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
# A Tune trial only drives its trainer; the trainer's workers hold the real resources. Tune needs
# a non-empty request per trial: one byte of memory is as close to nothing as Ray allows.
TRIAL_DRIVER_RESOURCES = {"memory": 1}


@dataclass(frozen=True)
class TrialScaling:
    """How one trial's trainer is spread: workers, GPUs or CPUs each, failures to retry."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0

    @classmethod
    def from_config(cls, ft) -> "TrialScaling":
        use_gpu = ft.use_gpu if ft.use_gpu is not None else cluster_gpus() > 0
        return cls(ft.num_workers, bool(use_gpu), float(ft.cpus_per_worker), ft.max_failures)

    def scaling_config(self):
        from ray.train import ScalingConfig

        resources = {"CPU": self.cpus_per_worker, **({"GPU": 1.0} if self.use_gpu else {})}
        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker=resources)

    def concurrent_trials(self) -> int:
        """How many trials the cluster holds at once (at least one)."""
        if self.use_gpu:
            return max(1, int(cluster_gpus() // self.num_workers))
        return max(1, int(cluster_cpus() // (self.num_workers * self.cpus_per_worker)))


def trainer_storage(uri: str, storage_options: dict[str, Any] | None = None):
    """``(storage_path, storage_filesystem)`` for a Ray Train ``RunConfig``.

    Local folders pass as absolute paths. Remote URIs go through the run's fsspec filesystem (the
    same ``storage_options``: endpoint, keys) wrapped for pyarrow, with the protocol stripped.
    """
    if not is_remote(uri):
        return os.path.abspath(uri), None
    from entk_ray.distributed.sweep import credential_free_filesystem

    return credential_free_filesystem(uri, storage_options)  # its pickle (trainer state) holds no keys


def lr_name(lr: float) -> str:
    return f"lr-{lr:g}"


# --------------------------------------------------------------------------------------------
# On every Ray Train worker
# --------------------------------------------------------------------------------------------
def train_worker(config: dict) -> None:
    """One trial on one Ray Train worker: build, resume, train, checkpoint and report each epoch."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    inputs: TrialInputs = ray.get(config["inputs"][0])
    settings: TrainSettings = config["settings"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if config["use_gpu"]:
        if not torch.cuda.is_available():
            raise RuntimeError("finetune.use_gpu: the Ray cluster gave this worker a GPU but torch sees no CUDA "
                               "device; set finetune.use_gpu=false to train on CPUs")
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        resume = load_state(checkpoint)
    resumed_from = resume["epoch"] if resume is not None else None

    def metrics(history: list[dict]) -> dict:
        last = history[-1]  # the whole history travels in the checkpoint
        return {"epoch": last["epoch"], "train_loss": last["train_loss"], "resumed_from_epoch": resumed_from,
                **{f"acc/{name}": acc for name, acc in last["accuracy"].items()}}

    def on_epoch(epoch: int, history: list[dict], state: Callable[[], dict]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                torch.save(state(), os.path.join(folder, STATE_FILE))
                saved = Checkpoint.from_directory(folder)
            ray.train.report(metrics(history), checkpoint=saved)

    def wrap(model):
        if world == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    history = run_trial(inputs, config["method"], config["lr"], settings, device, rank=rank, world=world,
                        wrap=wrap, resume=resume, on_epoch=on_epoch)
    if resume is not None and resume["epoch"] >= settings.epochs:  # finished before the restart
        ray.train.report(metrics(history))


def load_state(checkpoint) -> dict:
    """The state a trial checkpointed (model, optimizer, schedule, history), on the CPU."""
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


def fit_trial(inputs_ref, method: str, lr: float, settings: TrainSettings, scaling: TrialScaling,
              storage: tuple[str, Any], name: str) -> TrialResult:
    """One ``TorchTrainer`` run (resumed from its storage when it was started before)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"inputs": [inputs_ref], "method": method, "lr": float(lr), "settings": settings,
                           "use_gpu": scaling.use_gpu},
        scaling_config=scaling.scaling_config(),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage[0], storage_filesystem=storage[1],
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             logging_config=LoggingConfig(log_level="WARNING")))
    result = trainer.fit()
    history = load_state(result.checkpoint)["history"]
    return TrialResult(float(lr), history, result.metrics.get("resumed_from_epoch"))


# --------------------------------------------------------------------------------------------
# Tune: one trial per learning rate
# --------------------------------------------------------------------------------------------
def tune_trial(config: dict, inputs_ref, method: str, settings: TrainSettings, scaling: TrialScaling,
               storage: tuple[str, Any], results: Namespace, prefix: str) -> None:
    """Tune function trainable: fit one trainer, store its history, report its epochs to Tune."""
    from ray import tune

    lr = float(config["lr"])
    trial = fit_trial(inputs_ref[0], method, lr, settings, scaling, storage, lr_name(lr))
    results.save_json(f"finetune/results/{prefix}/{lr_name(lr)}", trial.to_dict(), meta={"method": method, "lr": lr})
    last = len(trial.history) - 1
    for i, record in enumerate(trial.history):
        tune.report({"epoch": record["epoch"], "lr_now": record["lr"], "train_loss": record["train_loss"],
                     **{f"acc/{name}": acc for name, acc in record["accuracy"].items()},
                     **({"trial": json.dumps(trial.to_dict())} if i == last else {})})


def ray_baselines(cfg, inputs: TrialInputs, fingerprint: str, log: Callable[[str], None] = print,
                  store: ArtifactStore | None = None) -> dict[str, BaselineResult]:
    """Every configured baseline: one Tune sweep over learning rates per method, trainers on Ray Train."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    started = init_ray(cfg.ray.address)
    try:
        ft = cfg.finetune
        settings = TrainSettings.from_config(ft, cfg.data.benchmark)
        scaling = TrialScaling.from_config(ft)
        store = store or ArtifactStore.from_config(cfg)
        ns = store.namespace(fingerprint)
        inputs_ref = ray.put(inputs)
        concurrent = ft.max_concurrent or scaling.concurrent_trials()
        tune_path, tune_filesystem = tune_storage(cfg)
        out = {}
        for method in ft.baselines:
            prefix = f"{method}-{inputs.fingerprint(method, settings)}"
            storage = trainer_storage(f"{ns.uri}/finetune/checkpoints/{prefix}", cfg.storage_options)
            stored = {float(lr): ns.get_json(f"finetune/results/{prefix}/{lr_name(lr)}") for lr in ft.lr_grid}
            done = {lr: TrialResult(**doc) for lr, doc in stored.items() if doc is not None}  # verified loads
            todo = [float(lr) for lr in ft.lr_grid if float(lr) not in done]
            start = time.perf_counter()
            if todo:
                trainable = tune.with_resources(
                    tune.with_parameters(tune_trial, inputs_ref=[inputs_ref], method=method, settings=settings,
                                         scaling=scaling, storage=storage, results=ns, prefix=prefix),
                    TRIAL_DRIVER_RESOURCES)
                tuner = tune.Tuner(
                    trainable, param_space={"lr": tune.grid_search(todo)},
                    tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
                    run_config=tune.RunConfig(name=f"finetune-{prefix}", storage_path=tune_path,
                                              storage_filesystem=tune_filesystem, verbose=0,
                                              callbacks=[JsonLoggerCallback()]))
                with _quiet_tune():
                    grid = tuner.fit()
                if grid.errors:
                    raise RuntimeError(
                        f"{len(grid.errors)} {METHOD_NAMES[method]} trial(s) failed; rerun the same command to "
                        f"resume them from their last checkpoints under {storage[0]}. First error: {grid.errors[0]}")
                for result in grid:
                    trial = TrialResult(**json.loads(result.metrics["trial"]))
                    done[trial.lr] = trial
            trials = [done[float(lr)] for lr in ft.lr_grid]
            out[method] = BaselineResult(method, inputs.select_on, trials)
            row = out[method].row()
            resumed = [t.lr for t in trials if t.resumed_from_epoch]
            log(f"{METHOD_NAMES[method]}: {len(todo)} of {len(trials)} learning rates trained "
                f"({time.perf_counter() - start:.1f}s, {concurrent} at a time, {scaling.num_workers} worker(s) each"
                f"{', resumed lr ' + ', '.join(f'{lr:g}' for lr in resumed) if resumed else ''}); "
                f"chosen lr {row['lr']:g}, epoch {row['epoch']}")
        return out
    finally:
        shutdown_ray(started)

