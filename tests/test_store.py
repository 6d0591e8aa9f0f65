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
