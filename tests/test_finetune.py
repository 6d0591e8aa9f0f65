"""Trained baselines without Ray: the training loop, LP-FT's head, data order, selection, report rows."""
import csv
import json

import numpy as np
import pytest
import torch
from references import assert_accuracies_close

from entk_ray.baselines import linear_probe
from entk_ray.cli import COMMON_OPTIONS, build_parser, config_from_args
from entk_ray.config import Config, ConfigError
from entk_ray.data.augment import SeededAugmentation, TensorCrop, training_set
from entk_ray.distributed.testing import TinyClassifierFactory, TinyFeaturizerFactory, tiny_benchmark
from entk_ray.finetune import (BaselineResult, GlobalBatchSampler, TrainSettings, TrialInputs, TrialResult,
                               autocast_dtype, best_epoch, evaluate_examples, pack_correct, probe_head,
                               resolve_batchnorm, run_trial, unpack_correct)
from entk_ray.report import format_table

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_inputs(norm="batch", augment="auto", head=None, **bench):
    b = tiny_benchmark(**bench)
    return TrialInputs(TinyClassifierFactory(norm=norm), training_set(b.train, augment), dict(b.eval_sets()),
                       b.num_classes, "id_val", head)


def test_per_example_correctness_is_each_examples_argmax_and_survives_packing():
    b = tiny_benchmark(n_id_val=45)  # not a multiple of 8: the packed form keeps the length
    evals = dict(b.eval_sets())
    model = TinyClassifierFactory()("scratch", b.num_classes, None, 3)
    correct = evaluate_examples(model, evals, CPU, batch_size=7)
    for name, dataset in evals.items():
        with torch.no_grad():
            want = [int(model(dataset[i][0][None]).argmax()) == int(dataset[i][1]) for i in range(len(dataset))]
        assert correct[name].dtype == bool and correct[name].tolist() == want
    unpacked = unpack_correct(pack_correct(correct))
    assert set(unpacked) == set(correct)
    for name, mask in correct.items():
        assert np.array_equal(unpacked[name], mask)
    assert 0 < sum(mask.sum() for mask in correct.values()) < sum(mask.size for mask in correct.values())


def test_fine_tuning_improves_id_accuracy_over_its_initialization():
    inputs = tiny_inputs()
    history = run_trial(inputs, "ft", 0.1, TrainSettings(epochs=3, batch_size=16), CPU)
    assert [rec["epoch"] for rec in history] == [0, 1, 2, 3]
    assert history[0]["train_loss"] is None and history[-1]["step"] == 3 * (96 // 16)
    start, best = history[0]["accuracy"]["id_val"], best_epoch(history, "id_val")["accuracy"]["id_val"]
    assert best >= start + 0.2, (start, best)  # 4 classes: 25% at a random head
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at 0


def test_lpft_starts_from_the_linear_probe_with_its_standardization_folded_in():
    b = tiny_benchmark()
    factory = TinyClassifierFactory()
    backbone, _ = factory.pretrained_backbone()
    with torch.no_grad():
        emb = {name: backbone.eval()(ds.images).numpy() for name, ds in [("train", b.train), *b.eval_sets().items()]}
    probe = linear_probe(emb["train"], b.train.labels, {"id_val": (emb["id_val"], b.id_val.labels)}, "id_val",
                         [0.01, 1.0])
    head = probe_head(probe, b.num_classes)
    model = factory("lpft", b.num_classes, head).eval()
    with torch.no_grad():
        logits = model(b.id_val.images).double().numpy()
    decision = (emb["id_val"] - probe.mean) / probe.scale @ probe.coef.T + probe.intercept
    # float32 network vs float64 scikit-learn arithmetic on the same features
    np.testing.assert_allclose(logits, decision, rtol=1e-4, atol=1e-4 * np.abs(decision).max())
    inputs = TrialInputs(factory, training_set(b.train), dict(b.eval_sets()), b.num_classes, "id_val", head)
    history = run_trial(inputs, "lpft", 0.01, TrainSettings(epochs=1, batch_size=16), CPU)
    # float32 network vs float64 scikit-learn: one example of slack at a round-off tie
    assert_accuracies_close(history[0]["accuracy"]["id_val"], probe.accuracy["id_val"], len(b.id_val))


def test_batchnorm_auto_keeps_the_pretrained_statistics_on_the_digits_and_trains_them_elsewhere():
    # docs/finetuning.md: on the digits shift batch statistics stall Lite0's fine-tuning (ID at chance)
    ft = Config().finetune
    assert ft.batchnorm == "auto"
    assert TrainSettings.from_config(ft, "digits").batchnorm == "frozen"
    for benchmark in ("living17", "entity30", "image_folder", None):
        assert TrainSettings.from_config(ft, benchmark).batchnorm == "train"  # Kumar et al.
    assert resolve_batchnorm("train", "digits") == "train" and resolve_batchnorm("frozen", "living17") == "frozen"
    assert Config().with_overrides(["finetune.batchnorm=train"]).validate().finetune.batchnorm == "train"
    with pytest.raises(ConfigError, match="finetune.batchnorm"):
        Config().with_overrides(["finetune.batchnorm=sync"]).validate()


def test_frozen_batchnorm_leaves_the_running_statistics_and_training_mode_moves_them():
    # at lr 0 only BatchNorm's running statistics can change the network: LP-FT's probe accuracy
    # survives an epoch with frozen statistics (on the digits, train mode lost 69.5 % → 31.0 % so)
    b = tiny_benchmark()
    factory = TinyClassifierFactory(norm="batch")
    start = factory("ft", b.num_classes).state_dict()
    for batchnorm, moved in (("frozen", False), ("train", True)):
        model = factory("ft", b.num_classes)
        inputs = TrialInputs(factory, training_set(b.train), dict(b.eval_sets()), b.num_classes, "id_val")
        history = run_trial(inputs, "ft", 0.0, TrainSettings(epochs=1, batch_size=16, batchnorm=batchnorm), CPU,
                            model=model)
        stats = [name for name in start if "running_" in name]
        assert stats
        changed = [name for name in stats if not torch.equal(model.state_dict()[name], start[name])]
        assert bool(changed) == moved, (batchnorm, changed)
        if not moved:
            assert history[1]["accuracy"] == history[0]["accuracy"]


def test_bf16_autocast_is_the_gpu_default_and_trains_close_to_fp32():
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert autocast_dtype("auto", CPU) is None and autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16  # CPU autocast runs the same code path here
    inputs = tiny_inputs(norm="group")
    fp32 = run_trial(inputs, "ft", 0.1, TrainSettings(epochs=1, batch_size=16, precision="fp32"), CPU)
    bf16 = run_trial(inputs, "ft", 0.1, TrainSettings(epochs=1, batch_size=16, precision="bf16"), CPU)
    # bf16 rounds activations to 8 bits of mantissa: the loss moves (1e-4 relative here; bound 1e-2)
    assert bf16[1]["train_loss"] != fp32[1]["train_loss"]
    assert bf16[1]["train_loss"] == pytest.approx(fp32[1]["train_loss"], rel=1e-2)


def test_a_two_class_probe_becomes_a_two_row_head_with_the_same_decision():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)) + 3.0, np.arange(40) % 2
    x[y == 1] += 1.0
    probe = linear_probe(x, y, {"val": (x, y)}, "val", [1.0])
    head = probe_head(probe, 2)
    logits = x @ head.weight.T + head.bias
    decision = (x - probe.mean) / probe.scale @ probe.coef[0] + probe.intercept[0]
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, rtol=1e-5, atol=1e-5)


def test_global_batches_split_across_workers_as_one_worker_sees_them():
    one = list(GlobalBatchSampler(50, 8, seed=3))
    halves = [list(GlobalBatchSampler(50, 8, rank=r, world=2, seed=3)) for r in range(2)]
    assert len(one) == 48 and all(len(h) == 24 for h in halves)  # 6 full global batches
    for step in range(6):
        assert one[8 * step: 8 * step + 8] == halves[0][4 * step: 4 * step + 4] + halves[1][4 * step: 4 * step + 4]
    later = GlobalBatchSampler(50, 8, seed=3)
    later.set_epoch(1)
    assert list(later) != one and sorted(set(one)) != list(range(50))  # a new order; the tail is dropped
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8)


def test_augmentation_depends_on_seed_epoch_and_example_only():
    b = tiny_benchmark()
    aug = training_set(b.train, "auto", seed=1)
    assert isinstance(aug, SeededAugmentation) and isinstance(aug.post, TensorCrop)
    torch.manual_seed(123)
    first = aug[5][0]
    torch.manual_seed(456)  # the global RNG does not matter, and is left alone
    state = torch.random.get_rng_state()
    assert torch.equal(aug[5][0], first)
    assert torch.equal(torch.random.get_rng_state(), state)
    aug.set_epoch(1)
    assert not torch.equal(aug[5][0], first)
    assert first.shape == b.train.images[5].shape
    assert torch.equal(training_set(b.train, "none")[5][0], b.train.images[5])


def test_selection_takes_the_best_epoch_then_the_best_learning_rate_earliest_on_ties():
    def hist(accs):
        return [{"epoch": e, "accuracy": {"id_val": a, "ood:x": a / 2}} for e, a in enumerate(accs)]

    assert best_epoch(hist([0.9, 0.5, 0.7, 0.7]), "id_val")["epoch"] == 2  # epoch 0 is not a choice
    result = BaselineResult("ft", "id_val", [TrialResult(0.1, hist([0.2, 0.6, 0.8])),
                                             TrialResult(0.01, hist([0.2, 0.8, 0.7]))])
    row = result.row()
    assert (row["lr"], row["epoch"], row["id_acc"], row["ood"]) == (0.01, 1, 0.8, {"x": 0.4})
    assert row["method"] == "Fine-tuning" and row["source"] == "measured"


def test_the_table_lists_the_trained_rows_with_their_learning_rate_and_epoch():
    result = BaselineResult("lpft", "id_val", [TrialResult(0.003, [
        {"epoch": 0, "accuracy": {"id_val": 0.5, "ood:optdigits": 0.4}},
        {"epoch": 1, "accuracy": {"id_val": 0.9, "ood:optdigits": 0.7}}])])
    probe_row = {"method": "Linear probing", "id_acc": 0.8, "ood_acc": 0.6, "ood": {"optdigits": 0.6}, "C": 1.0,
                 "source": "measured"}
    table = format_table([probe_row, result.row()]).splitlines()
    assert table[0] == "| Method | ID | OOD | r | β | step | C | lr | epoch | source |"
    assert table[3] == "| LP-FT | 90.0% | 70.0% |  |  |  |  | 0.003 | 1 | measured |"
    assert "lr" not in format_table([probe_row]).splitlines()[0]  # no trained rows, no extra columns


def test_config_and_cli_take_a_comma_separated_list_of_baselines():
    parser = build_parser("test")
    cfg = config_from_args(parser.parse_args(["--baselines", "ft,lpft,scratch"]), Config())
    assert cfg.validate().finetune.baselines == ["ft", "lpft", "scratch"]
    assert "--baselines" in COMMON_OPTIONS
    assert Config().finetune.baselines == []  # opt-in: the quick-start stays within its time
    with pytest.raises(ConfigError, match=r"finetune.baselines\[1\] must be one of ft, lpft, scratch"):
        Config().with_overrides(["finetune.baselines=ft,sgd"]).validate()
    with pytest.raises(ConfigError, match="multiple of finetune.num_workers"):
        Config().with_overrides(["finetune.batch_size=63", "finetune.num_workers=2"]).validate()
    with pytest.raises(ConfigError, match=r"finetune.lr_grid\[0\] must be a positive number"):
        Config().with_overrides(["finetune.lr_grid=[0]"]).validate()


def test_the_pipeline_adds_the_trained_rows_the_histories_and_the_progress_figure(tmp_path):
    from entk_ray.backends import LocalBackend
    from entk_ray.pipeline import run

    cfg = Config().with_overrides([
        "data.n_train=64", "data.n_id_val=30", "data.n_ood=30", "data.image_size=16", "features.p=500",
        "solver.max_steps=60", "solver.rounds=1", "solver.points_per_round=3", "probe.c_grid=[0.1, 10.0]",
        "finetune.baselines=ft,lpft,scratch", "finetune.epochs=2", "finetune.batch_size=16",
        "finetune.lr_grid=[0.01, 0.1]", f"store.out_dir={tmp_path}"])
    result = run(cfg, backend=LocalBackend(TinyFeaturizerFactory(cfg.features)), progress=False,
                 log=lambda _msg: None, classifier_factory=TinyClassifierFactory())
    payload = json.loads((tmp_path / "results.json").read_text())
    methods = [row["method"] for row in payload["rows"]]
    assert methods[-3:] == ["Fine-tuning", "LP-FT", "From scratch"]
    for row in payload["rows"][-3:]:
        assert row["lr"] in (0.01, 0.1) and row["epoch"] in (1, 2) and 0 <= row["ood_acc"] <= 1
        # bootstrap intervals from the chosen epoch's per-example correctness, around the accuracy
        assert row["id_ci"][0] <= row["id_acc"] <= row["id_ci"][1] and row["id_ci"][0] < row["id_ci"][1]
        assert row["ood_acc_ci"][0] <= row["ood_acc"] <= row["ood_acc_ci"][1]
    lpft = result.trained["lpft"]
    for trial in lpft.trials:  # the probe is where LP-FT starts (float32 vs float64: one example of slack)
        assert trial.history[0]["accuracy"].keys() == result.probe.accuracy.keys()
        for name, accuracy in result.probe.accuracy.items():
            assert_accuracies_close(trial.history[0]["accuracy"][name], accuracy, len(result.probe.predictions[name]))
    assert set(payload["trained"]) == {"ft", "lpft", "scratch"}
    with open(tmp_path / "training.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 3 * 2 * 3  # methods × learning rates × epochs (0, 1, 2)
    assert sum(line["chosen"] == "True" for line in lines) == 3
    assert (tmp_path / "accuracy_vs_progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Fine-tuning |" in (tmp_path / "results.md").read_text()


def test_holdout_selection_trains_on_the_rest_and_selects_on_the_held_out_slice():
    from entk_ray.finetune import trial_inputs

    b = tiny_benchmark()
    cfg = Config().with_overrides(["finetune.baselines=[ft]", "solver.selection=holdout",
                                   "solver.holdout_fraction=0.25"])
    inputs = trial_inputs(cfg, b, select_on="holdout", factory=TinyClassifierFactory())
    assert len(inputs.train) == 72 and len(inputs.evals["holdout"]) == 24
    assert list(inputs.evals)[:2] == ["id_val", "ood:shifted"]
    history = run_trial(inputs, "ft", 0.1, TrainSettings(epochs=1, batch_size=24), CPU)
    assert set(history[-1]["accuracy"]) == {"id_val", "ood:shifted", "holdout"}
    assert inputs.fingerprint("ft", TrainSettings()) != trial_inputs(cfg, b, factory=TinyClassifierFactory()) \
        .fingerprint("ft", TrainSettings())
