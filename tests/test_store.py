"""The artifact store: fingerprinted arrays and JSON on a local folder and on S3 (a real local
moto server), and RayBackend reusing what a previous run stored there."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from s3_server import MotoS3Server

from entk_ray.store import (
    ArtifactError,
    ArtifactStore,
    default_store_uri,
    load_kernels,
    save_kernels,
)


@pytest.fixture(scope="module")
def s3():
    with MotoS3Server() as server:
        yield server


def exercise(store: ArtifactStore) -> None:
    """Behaviour every backend of the store must have."""
    ns = store.namespace("fp1", parts={"weights": "abc", "p": 10})
    assert ns.load_json("_fingerprint") == {"weights": "abc", "p": 10}
    arrays = {"kernels/train": np.arange(12, dtype=np.float64).reshape(3, 4),
              "emb/x": np.ones((2, 5), dtype=np.float16), "ints": np.array([3, 1, 2], dtype=np.int64)}
    assert not ns.has("kernels/train")
    for key, value in arrays.items():
        ns.save_array(key, value, meta={"note": key})
    for key, value in arrays.items():
        assert ns.has(key)
        back = ns.load_array(key)
        assert back.dtype == value.dtype and np.array_equal(back, value)
        assert ns.meta(key)["meta"] == {"note": key} and ns.meta(key)["fingerprint"] == "fp1"
    ns.save_json("sweeps/s", [{"r": 0.1, "acc": [0.5, 0.75]}])
    assert ns.load_json("sweeps/s") == [{"r": 0.1, "acc": [0.5, 0.75]}]
    assert ns.keys() == sorted(["_fingerprint", "emb/x", "ints", "kernels/train", "sweeps/s"])
    assert ns.keys("kernels/") == ["kernels/train"]
    with pytest.raises(ArtifactError, match="not an array"):
        ns.load_array("sweeps/s")
    with pytest.raises(ArtifactError, match="no artifact"):
        ns.load_array("missing")

    # Another fingerprint sees none of it.
    other = store.namespace("fp2")
    assert not other.has("kernels/train") and other.keys() == []

    # Overwrite, then delete by prefix.
    ns.save_array("kernels/train", np.zeros((1, 1)))
    assert ns.load_array("kernels/train").shape == (1, 1)
    assert ns.delete("kernels/") == 1 and not ns.has("kernels/train") and ns.has("ints")
    assert store.fingerprints() == ["fp1"]

    # Picklable without live connections (Ray tasks write through their own copy).
    clone = pickle.loads(pickle.dumps(store))
    assert np.array_equal(clone.namespace("fp1").load_array("ints"), arrays["ints"])


def test_local_store(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    exercise(store)
    assert (tmp_path / "artifacts" / "fp1" / "ints.npy").is_file()
    assert (tmp_path / "artifacts" / "fp1" / "ints.json").is_file()
    assert not list((tmp_path / "artifacts").rglob("*.tmp-*"))  # atomic writes leave no temporaries


def test_local_store_rejects_incomplete_or_foreign_artifacts(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ns = store.namespace("aaaa")
    ns.save_array("k", np.arange(100, dtype=np.float64))
    folder = tmp_path / "aaaa"
    # A data file without its sidecar is not an artifact (the sidecar is written last).
    (folder / "orphan.npy").write_bytes((folder / "k.npy").read_bytes())
    assert not ns.has("orphan")
    # A truncated data file is rejected, not reused.
    data = (folder / "k.npy").read_bytes()
    (folder / "k.npy").write_bytes(data[:-80])
    with pytest.raises(ArtifactError):
        ns.load_array("k")
    # An artifact copied into another fingerprint's folder is rejected.
    (folder / "k.npy").write_bytes(data)
    other = tmp_path / "bbbb"
    other.mkdir()
    for suffix in (".npy", ".json"):
        (other / f"k{suffix}").write_bytes((folder / f"k{suffix}").read_bytes())
    with pytest.raises(ArtifactError, match="belongs to fingerprint"):
        store.namespace("bbbb").load_array("k")
    with pytest.raises(ValueError):
        store.namespace("../escape")
    with pytest.raises(ValueError):
        ns.save_array("../x", np.zeros(1))


def test_kernel_set_roundtrip(tmp_path):
    ns = ArtifactStore(str(tmp_path)).namespace("k")
    rng = np.random.default_rng(0)
    train, evals = rng.normal(size=(4, 4)), {"id_val": rng.normal(size=(3, 4)), "ood:x": rng.normal(size=(2, 4))}
    embeddings = {"train": rng.normal(size=(4, 5)).astype(np.float32), "id_val": np.zeros((3, 5), np.float32),
                  "ood:x": np.ones((2, 5), np.float32)}
    sizes = {"train": 4, "id_val": 3, "ood:x": 2}
    assert load_kernels(ns, sizes, ["id_val", "ood:x"]) is None
    save_kernels(ns, train, evals, embeddings)
    k, e, emb = load_kernels(ns, sizes, ["id_val", "ood:x"])
    assert np.array_equal(k, train) and np.array_equal(e["ood:x"], evals["ood:x"])
    assert np.array_equal(emb["train"], embeddings["train"])
    assert ns.has("kernels/ood-x")  # split names become safe keys
    assert load_kernels(ns, {**sizes, "id_val": 5}, ["id_val", "ood:x"]) is None  # other sizes: not reused


def test_default_store_location():
    assert default_store_uri("results/demo", None) == "results/demo/artifacts"
    assert default_store_uri("results/demo", "s3://b/x") == "s3://b/x"


def test_s3_store_on_moto(s3):
    bucket = s3.make_bucket("entk-store-test")
    store = ArtifactStore(f"{bucket}/artifacts", s3.storage_options)
    assert store.is_remote
    exercise(store)
    # The objects really are in the bucket, under the fingerprint.
    listing = s3.filesystem().find("entk-store-test/artifacts/fp1")
    assert "entk-store-test/artifacts/fp1/ints.npy" in listing
    assert "entk-store-test/artifacts/fp1/ints.json" in listing


def test_ray_backend_reuses_s3_artifacts(ray_local, s3, tmp_path):
    """Block tasks write blocks to S3 from Ray workers; a second backend finds everything there."""
    from entk_ray.config import Config
    from entk_ray.distributed import RayBackend
    from entk_ray.distributed.testing import TinyFeaturizerFactory, tiny_benchmark

    bucket = s3.make_bucket("entk-ray-test")
    cfg = Config()
    cfg.features.p = 150
    cfg.features.batch_size = 16
    cfg.ray.shard_size = 16
    cfg.store.out_dir = str(tmp_path / "out")
    cfg.store.artifact_store = f"{bucket}/runs"
    cfg.storage_options = s3.storage_options
    benchmark = tiny_benchmark(n_train=32, n_id_val=16, n_ood=16, seed=11)
    factory = TinyFeaturizerFactory(cfg.features, seed=3)

    first_backend = RayBackend(cfg, featurizer_factory=factory, keep_partials=True)
    first = first_backend.kernels(cfg, benchmark, progress=False)
    fp = first_backend.fingerprint
    keys = first_backend.namespace.keys()
    assert {"kernels/train", "kernels/id_val", "kernels/ood-shifted", "embeddings/train"} <= set(keys)
    assert sum(k.startswith("blocks/") for k in keys) == 3 + 2 + 2
    assert s3.filesystem().exists(f"entk-ray-test/runs/{fp}/kernels/train.npy")

    second_backend = RayBackend(cfg, featurizer_factory=factory)
    second = second_backend.kernels(cfg, benchmark, progress=False)
    assert second_backend.stats["reused"] and second_backend.stats["shards_computed"] == 0
    assert np.array_equal(second.train, first.train)
    assert np.array_equal(second.evals["ood:shifted"], first.evals["ood:shifted"])
    assert np.array_equal(second.embeddings["id_val"], first.embeddings["id_val"])


# --------------------------------------------------------------------------------------------
# Verified artifacts: a content hash in every sidecar, checked on load
# --------------------------------------------------------------------------------------------
def _flip_byte(path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sidecars_hold_a_content_hash(tmp_path):
    import hashlib
    import json

    ns = ArtifactStore(str(tmp_path)).namespace("fp")
    ns.save_array("k", np.arange(10.0))
    ns.save_json("doc", {"a": [1, 2]})
    sidecar = json.loads((tmp_path / "fp" / "k.json").read_text())
    assert sidecar["sha256"] == hashlib.sha256((tmp_path / "fp" / "k.npy").read_bytes()).hexdigest()
    assert len(json.loads((tmp_path / "fp" / "doc.json").read_text())["sha256"]) == 64


@pytest.mark.parametrize("damage", ["flip", "truncate", "truncate_sidecar", "empty", "edit_sidecar", "unhashed"])
def test_damaged_array_is_detected_logged_and_discarded(tmp_path, caplog, damage):
    import json

    from entk_ray.store import CorruptArtifactError

    ns = ArtifactStore(str(tmp_path)).namespace("fp")
    ns.save_array("kernels/train", np.arange(64.0).reshape(8, 8))
    data, sidecar = tmp_path / "fp" / "kernels" / "train.npy", tmp_path / "fp" / "kernels" / "train.json"
    if damage == "flip":  # one bit of one value: same size, same header
        _flip_byte(data)
    elif damage == "truncate":
        data.write_bytes(data.read_bytes()[:-80])
    elif damage == "truncate_sidecar":
        sidecar.write_bytes(sidecar.read_bytes()[:40])
    elif damage == "empty":
        data.write_bytes(b"")
    elif damage == "edit_sidecar":  # a hand-edited shape
        doc = json.loads(sidecar.read_text())
        doc["shape"] = [4, 16]
        sidecar.write_text(json.dumps(doc))
    elif damage == "unhashed":  # written by an older version: cannot be verified
        doc = json.loads(sidecar.read_text())
        del doc["sha256"]
        sidecar.write_text(json.dumps(doc))
    with pytest.raises(CorruptArtifactError):
        ns.load_array("kernels/train")
    with caplog.at_level("WARNING", logger="entk_ray.store"):
        assert ns.get_array("kernels/train") is None
    assert "'kernels/train'" in caplog.text  # the warning names the key
    assert not ns.has("kernels/train") and not data.exists()  # discarded: the next save replaces it


def test_edited_json_artifact_is_detected(tmp_path, caplog):
    import json

    ns = ArtifactStore(str(tmp_path)).namespace("fp")
    ns.save_json("sweeps/abc", [{"r": 0.1, "accuracy": {"id_val": [0.5, 0.6]}}])
    path = tmp_path / "fp" / "sweeps" / "abc.json"
    doc = json.loads(path.read_text())
    doc["value"][0]["accuracy"]["id_val"] = [0.99, 0.99]  # a better-looking result
    path.write_text(json.dumps(doc))
    with caplog.at_level("WARNING", logger="entk_ray.store"):
        assert ns.get_json("sweeps/abc") is None
    assert "'sweeps/abc'" in caplog.text and not ns.has("sweeps/abc")


def test_load_kernels_recovers_from_a_corrupt_kernel(tmp_path):
    ns = ArtifactStore(str(tmp_path)).namespace("k")
    sizes = {"train": 4, "id_val": 3}
    save_kernels(ns, np.eye(4), {"id_val": np.ones((3, 4))},
                 {"train": np.zeros((4, 2), np.float32), "id_val": np.zeros((3, 2), np.float32)})
    _flip_byte(tmp_path / "k" / "kernels" / "train.npy")
    assert load_kernels(ns, sizes, ["id_val"]) is None  # recompute, do not crash
    assert not ns.has("kernels/train") and ns.has("kernels/id_val")


def test_delete_racing_list_then_load_is_missing_not_a_crash(tmp_path, caplog):
    """Another run deletes artifacts between this run's listing and its loads."""
    import threading

    store = ArtifactStore(str(tmp_path))
    ns = store.namespace("fp")
    for i in range(4):
        ns.save_array(f"blocks/train/b{i}", np.full((3, 3), float(i)))
    other = ArtifactStore(str(tmp_path)).namespace("fp")  # the other run: its own filesystem handle

    # Deterministic: the data file vanishes after the sidecar was read.
    keys = ns.keys("blocks/")
    real_cat = store.fs.cat_file

    def cat_then_vanish(path, *args, **kwargs):
        if path.endswith("b0.npy"):
            other.delete("blocks/train/b0")
        return real_cat(path, *args, **kwargs)

    store.fs.cat_file = cat_then_vanish
    try:
        with caplog.at_level("WARNING", logger="entk_ray.store"):
            loaded = {k: ns.get_array(k) for k in keys}
    finally:
        store.fs.cat_file = real_cat
    assert loaded["blocks/train/b0"] is None and loaded["blocks/train/b1"] is not None
    assert "discarding" not in caplog.text  # missing, not corrupt
    assert other.delete("blocks/train/b0") == 0  # deleting what is gone is no error

    # Concurrent: one thread keeps saving and deleting while another lists and loads.
    errors, stop = [], threading.Event()

    def churn():
        while not stop.is_set():
            for i in range(4):
                other.save_array(f"blocks/train/b{i}", np.full((3, 3), float(i)))
            other.delete("blocks/")

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(200):
            for key in ns.keys("blocks/"):
                value = ns.get_array(key)
                if value is not None and value[0, 0] != float(key[-1]):
                    errors.append(f"{key}: {value[0, 0]}")
    except Exception as exc:  # noqa: BLE001 - any exception is the failure under test
        errors.append(repr(exc))
    finally:
        stop.set()
        thread.join()
    assert not errors


def test_deleting_a_prefix_leaves_no_empty_local_folders(tmp_path):
    ns = ArtifactStore(str(tmp_path / "store")).namespace("fp1")
    for key in ("blocks/train/0_0", "blocks/train/0_1", "blocks/id_val/0_0", "kernels/train"):
        ns.save_array(key, np.ones(2))
    assert ns.delete("blocks/") == 3
    top = tmp_path / "store" / "fp1"
    assert not (top / "blocks").exists()
    assert (top / "kernels").is_dir() and ns.keys() == ["kernels/train"]
