"""S3 never hangs: connect/read timeouts and bounded retries, and a clear error naming the URL.

* an endpoint that accepts connections but never answers fails in seconds (it took 431 s before),
  for the artifact store, image reads and the corrupt-image scan alike;
* with the store on S3 (a local moto server behind a proxy that can stop answering), a server
  that stops mid-run ends the run in that error, and the rerun resumes once it is back.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from s3_server import DUMMY_KEY, MotoS3Server, PausableProxy

from entk_ray.errors import StorageError
from entk_ray.storage import S3_CONFIG, S3_FS_RETRIES, filesystem_for
from entk_ray.store import ArtifactStore

#: Short limits for the tests (the defaults allow S3_FS_RETRIES × total_max_attempts × read_timeout).
FAST = {"connect_timeout": 2, "read_timeout": 2, "retries": {"total_max_attempts": 2, "mode": "standard"}}


def options(endpoint_url: str, config=None) -> dict:
    opts = {"key": DUMMY_KEY, "secret": DUMMY_KEY, "client_kwargs": {"endpoint_url": endpoint_url}}
    if config is not None:
        opts["config_kwargs"] = config
    return opts


@pytest.fixture(scope="module")
def s3():
    with MotoS3Server() as server:
        yield server


def test_s3_filesystems_get_timeouts_and_bounded_retries():
    import copy

    defaults = copy.deepcopy(S3_CONFIG)
    fs, _ = filesystem_for("s3://bucket/x", options("http://127.0.0.1:9"))
    assert fs.retries == S3_FS_RETRIES
    assert {k: fs.config_kwargs[k] for k in S3_CONFIG} == S3_CONFIG
    fs.connect()  # builds the botocore client (no request): botocore edits the config it is given
    worst = S3_FS_RETRIES * S3_CONFIG["retries"]["total_max_attempts"] * S3_CONFIG["read_timeout"]
    assert worst <= 60, "a silent endpoint must fail within a minute with the defaults"
    # The user's own settings win, key by key.
    fs, _ = filesystem_for("s3://bucket/x", options("http://127.0.0.1:9", {"read_timeout": 120}))
    assert fs.config_kwargs["read_timeout"] == 120 and fs.config_kwargs["connect_timeout"] == 5
    assert S3_CONFIG == defaults  # the module's defaults were not edited through a shared dict


def test_silent_endpoint_fails_in_seconds_naming_the_url():
    from entk_ray.data.images import read_rgb_image, scan_images

    with PausableProxy(target=None) as silent:  # accepts connections, never answers
        opts = options(silent.endpoint_url, {"connect_timeout": 1, "read_timeout": 1, "retries": {"total_max_attempts": 1}})
        store = ArtifactStore("s3://bucket/runs", opts).namespace("fp")
        start = time.monotonic()
        with pytest.raises(StorageError) as info:
            store.load_array("kernels/train")
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert "s3://bucket/runs/fp/kernels/train" in message and silent.endpoint_url in message
        assert "read_timeout" in message
        assert elapsed < 30, f"took {elapsed:.0f} s"

        # Image reads and the corrupt scan: a silent store is not a corrupt image.
        with pytest.raises(StorageError, match="s3://bucket/img/a.jpg"):
            read_rgb_image("s3://bucket/img/a.jpg", storage_options=opts)
        with pytest.raises(StorageError, match="s3://bucket/img/a.jpg"):
            scan_images(["s3://bucket/img/a.jpg"], opts, check="header")


def test_server_stops_mid_run_then_the_rerun_resumes(ray_local, s3, tmp_path):
    from entk_ray.config import Config
    from entk_ray.distributed import RayBackend
    from entk_ray.distributed.testing import TinyFeaturizerFactory, tiny_benchmark

    s3.make_bucket("entk-stop-test")
    with PausableProxy(target=("127.0.0.1", s3.port)) as proxy:
        cfg = Config()
        cfg.features.p, cfg.features.batch_size, cfg.ray.shard_size = 150, 16, 16
        cfg.ray.num_workers = 1
        cfg.store.out_dir = str(tmp_path / "out")
        cfg.store.artifact_store = "s3://entk-stop-test/runs"
        cfg.storage_options = options(proxy.endpoint_url, FAST)
        benchmark = tiny_benchmark(n_train=48, n_id_val=16, n_ood=16, seed=3)
        factory = TinyFeaturizerFactory(cfg.features, seed=1)
        stopped = []

        def stop_after_two_shards(event, **payload):
            if event == "shard" and payload["backend"].stats["shards_computed"] == 2:
                proxy.pause()
                stopped.append(time.monotonic())

        backend = RayBackend(cfg, featurizer_factory=factory, on_event=stop_after_two_shards)
        with pytest.raises(StorageError) as info:
            backend.kernels(cfg, benchmark, progress=False)
        assert stopped, "the server was not stopped mid-run"
        assert time.monotonic() - stopped[0] < 60
        assert "s3://entk-stop-test/runs/" in str(info.value) and proxy.endpoint_url in str(info.value)
        assert backend.stats["shard_failures"] <= 1  # not retried shard after shard

        # What the store holds now (read past the proxy): none of it may be recomputed.
        listing = s3.filesystem().find("entk-stop-test/runs")
        stored = {p.split(f"/{backend.fingerprint}/", 1)[1][:-len(".json")] for p in listing
                  if p.endswith("/phi.json")}
        assert len(stored) >= 2

        proxy.resume()
        recomputed = []
        rerun = RayBackend(cfg, featurizer_factory=factory,
                           on_event=lambda event, **p: recomputed.append(p["result"].shard.key("phi"))
                           if event == "shard" else None)
        ks = rerun.kernels(cfg, benchmark, progress=False)
        assert rerun.stats["shards_loaded"] >= 2 and not set(recomputed) & stored
        assert ks.train.shape == (48, 48) and np.isfinite(ks.train).all()
