"""The linear probe (Kumar et al. protocol): standardization, C chosen on the selection set."""
import numpy as np
import pytest

from entk_ray.baselines import linear_probe


def blobs(n_per_class=40, classes=3, dim=6, spread=0.6, shift=0.0, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(100).normal(size=(classes, dim)) * 2.0
    y = np.repeat(np.arange(classes), n_per_class)
    x = centers[y] + spread * rng.normal(size=(y.size, dim)) + shift
    return x * scale, y


def test_probe_fits_separable_data_and_reports_every_c():
    x, y = blobs(seed=0)
    xv, yv = blobs(seed=1)
    xo, yo = blobs(seed=2, shift=3.0)
    result = linear_probe(x, y, {"id_val": (xv, yv), "ood:shift": (xo, yo)}, "id_val", [1e-4, 1e-2, 1.0])
    assert [row["C"] for row in result.sweep] == [1e-4, 1e-2, 1.0]
    assert all({"C", "id_val", "ood:shift", "selection_loss"} == set(row) for row in result.sweep)
    assert result.accuracy["id_val"] == max(row["id_val"] for row in result.sweep) >= 0.95
    assert result.accuracy["ood:shift"] < result.accuracy["id_val"]  # the shift costs accuracy
    chosen = next(row for row in result.sweep if row["C"] == result.c)
    assert result.accuracy == {"id_val": chosen["id_val"], "ood:shift": chosen["ood:shift"]}
    # the per-example predictions at the chosen C are what the accuracies count
    assert np.mean(result.predictions["id_val"] == yv) == result.accuracy["id_val"]
    assert np.mean(result.predictions["ood:shift"] == yo) == result.accuracy["ood:shift"]


def test_ties_on_accuracy_go_to_the_lowest_selection_loss():
    x, y = blobs(seed=3, spread=0.1)  # so well separated that every C classifies perfectly
    xv, yv = blobs(seed=4, spread=0.1)
    result = linear_probe(x, y, {"id_val": (xv, yv)}, "id_val", [10.0, 0.1, 1.0, 1e-4])
    assert all(row["id_val"] == 1.0 for row in result.sweep)
    assert result.tied == 4
    losses = {row["C"]: row["selection_loss"] for row in result.sweep}
    assert result.c == min(losses, key=losses.get)
    # on separable data the weakest penalty is the most confident: not the strongest one (1e-4)
    assert result.c == 10.0 and losses[10.0] < losses[1e-4]


def test_a_unique_best_accuracy_is_not_a_tie_and_a_partial_tie_counts_only_the_best():
    x, y = blobs(seed=0, spread=2.0)
    xv, yv = blobs(seed=1, spread=2.0)
    result = linear_probe(x, y, {"id_val": (xv, yv)}, "id_val", [1e-6, 1e-3, 1.0])
    assert sorted(row["id_val"] for row in result.sweep)[-2] < result.accuracy["id_val"]
    assert result.tied == 1 and result.c == 1.0
    x, y = blobs(seed=0, spread=3.0)  # noisier: the two smallest C tie, the largest is worse
    xv, yv = blobs(seed=1, spread=3.0)
    result = linear_probe(x, y, {"id_val": (xv, yv)}, "id_val", [1e-6, 1e-3, 1.0])
    accs = [row["id_val"] for row in result.sweep]
    assert accs[0] == accs[1] > accs[2]
    assert result.tied == 2 and result.c == 1e-3  # the lower cross-entropy, not the first C


def test_progress_is_plain_lines_when_not_a_terminal(capsys):
    x, y = blobs(seed=0)
    linear_probe(x, y, {"id_val": (x, y)}, "id_val", [0.01, 1.0], progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["linear probe", "linear probe"]
    assert "2/2 C" in lines[-1] and "C=1" in lines[-1]
    assert "\r" not in err and "\x1b" not in err


def test_features_are_standardized_with_train_statistics():
    # Scaling every feature by 1e4 changes nothing: the probe standardizes with train mean/std.
    x, y = blobs(seed=5)
    xv, yv = blobs(seed=6)
    plain = linear_probe(x, y, {"id_val": (xv, yv)}, "id_val", [1e-3, 1e-1])
    scaled = linear_probe(x * 1e4, y, {"id_val": (xv * 1e4, yv)}, "id_val", [1e-3, 1e-1])
    assert [r["id_val"] for r in plain.sweep] == pytest.approx([r["id_val"] for r in scaled.sweep], abs=1e-9)


def test_selection_set_must_be_an_evaluation_set():
    x, y = blobs()
    with pytest.raises(ValueError, match="select_on='holdout'"):
        linear_probe(x, y, {"id_val": (x, y)}, "holdout", [1.0])


def test_cross_entropy_matches_sklearn_and_survives_a_class_missing_from_training():
    from sklearn.metrics import log_loss

    from entk_ray.baselines import cross_entropy

    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    classes, labels = np.array([0, 2, 5]), np.array([0, 5, 2])
    assert cross_entropy(proba, classes, labels) == pytest.approx(log_loss(labels, proba, labels=classes), rel=1e-12)
    unseen = cross_entropy(proba, classes, np.array([0, 5, 3]))  # class 3 was never trained on
    assert unseen == pytest.approx((-np.log(0.7) - np.log(0.8) - np.log(1e-15)) / 3, rel=1e-12)
