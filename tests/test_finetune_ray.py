"""Trained baselines on Ray Train and Tune: DDP workers, checkpoints in the store, resume after a crash."""
import numpy as np
import pytest
import ray
import torch

from entk_ray.config import Config
from entk_ray.data.augment import training_set
from entk_ray.distributed.testing import CrashOnceClassifierFactory, TinyClassifierFactory, tiny_benchmark
from entk_ray.distributed.train import TrialScaling, fit_trial, ray_baselines, trainer_storage
from entk_ray.finetune import TrainSettings, TrialInputs, run_trial, unpack_correct
from entk_ray.store import ArtifactStore

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def s3():
    from s3_server import MotoS3Server

    with MotoS3Server() as server:
        yield server


def inputs_for(factory):
    b = tiny_benchmark()
    return TrialInputs(factory, training_set(b.train), dict(b.eval_sets()), b.num_classes, "id_val")


def assert_same_history(got, want):
    """One worker in this process vs Ray Train workers: the same steps in float32, summed in another
    order across a gloo all-reduce, so losses agree to 1e-5 relative and accuracies exactly up to
    one evaluation example (1/48)."""
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got[1:], want[1:]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        for name in b["accuracy"]:
            assert abs(a["accuracy"][name] - b["accuracy"][name]) <= 1 / 48 + 1e-12, (name, a, b)
        # per-example correctness: whole sets, assembled from the workers' shards
        mine, theirs = unpack_correct(a["correct"]), unpack_correct(b["correct"])
        for name, mask in mine.items():
            assert mask.size == 48 and mask.mean() == pytest.approx(a["accuracy"][name], abs=1e-12)
            assert int((mask != theirs[name]).sum()) <= 1
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9, abs=1e-12)


def test_two_ddp_workers_take_the_steps_of_one_worker_checkpointing_to_s3(ray_local, s3):
    # GroupNorm: CPU workers have no SyncBatchNorm, and per-worker batch statistics would differ
    inputs = inputs_for(TinyClassifierFactory(norm="group"))
    settings = TrainSettings(epochs=2, batch_size=16, seed=1)
    one = run_trial(inputs, "ft", 0.5, settings, CPU)
    s3.make_bucket("ft-bucket")
    storage = trainer_storage("s3://ft-bucket/run/finetune", s3.storage_options)
    assert storage[0] == "ft-bucket/run/finetune" and storage[1] is not None
    import pickle

    from s3_server import DUMMY_KEY

    assert DUMMY_KEY.encode() not in pickle.dumps(storage[1])  # Ray Train writes its pickle next to the results
    two = fit_trial(ray.put(inputs), "ft", 0.5, settings, TrialScaling(num_workers=2, cpus_per_worker=1.0),
                    storage, "lr-0.5")
    assert_same_history(two.history, one)  # read back from the checkpoint in S3
    assert any(path.endswith("/state.pt") for path in s3.filesystem().find("ft-bucket/run/finetune/lr-0.5"))
    assert one[-1]["train_loss"] < one[1]["train_loss"]  # it trained: the comparison is not vacuous
    assert two.resumed_from_epoch is None


def test_a_crashed_sweep_resumes_from_its_checkpoints_and_ends_as_an_uninterrupted_one(ray_local, tmp_path):
    # One learning rate: each Ray Train trainer costs seconds of process start-up, and the resume
    # logic is per trial (a sweep with more rates repeats it for each).
    cfg = Config().with_overrides([
        "finetune.baselines=[ft]", "finetune.epochs=2", "finetune.batch_size=16", "finetune.lr_grid=[0.5]",
        "finetune.seed=2", "finetune.use_gpu=false", f"store.out_dir={tmp_path / 'out'}",
        # BatchNorm in training mode (not auto's frozen for data.benchmark=digits): the running
        # statistics then change every step, so the checkpoint must carry them too
        "finetune.batchnorm=train"])
    plain = TinyClassifierFactory()
    # the training process exits at its 7th step: in epoch 2, after epoch 1's checkpoint
    # (once Ray Train has registered that checkpoint: a rerun resumes from registered ones only)
    crashing = inputs_for(CrashOnceClassifierFactory(plain, tmp_path / "crashed", after_steps=6,
                                                     registered_under=tmp_path / "store"))
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(RuntimeError, match="rerun the same command to resume"):
        ray_baselines(cfg, crashing, "fp-test", log=lambda _msg: None, store=store)
    assert (tmp_path / "crashed").exists()
    ns = store.namespace("fp-test")
    assert ns.keys("finetune/results") == []
    assert any((tmp_path / "store" / "fp-test" / "finetune" / "checkpoints").rglob("state.pt"))

    result = ray_baselines(cfg, crashing, "fp-test", log=lambda _msg: None, store=store)["ft"]
    (trial,) = result.trials
    assert trial.resumed_from_epoch == 1
    uninterrupted = run_trial(inputs_for(plain), "ft", 0.5, TrainSettings.from_config(cfg.finetune), CPU)
    assert_same_history(trial.history, uninterrupted)
    assert uninterrupted[-1]["train_loss"] < uninterrupted[1]["train_loss"]  # it trained in epoch 2
    assert len(ns.keys("finetune/results")) == 1
    # a third run trains nothing: the history is in the store
    again = ray_baselines(cfg, inputs_for(plain), "fp-test", log=lambda _msg: None, store=store)["ft"]
    assert [t.history for t in again.trials] == [trial.history]
    assert np.isfinite(again.row()["id_acc"])
