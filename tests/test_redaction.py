"""No secrets in outputs: credentials given as storage options appear in no file the run writes
(results, figures, Tune's files, artifacts and their sidecars on S3) and in no log line."""
from __future__ import annotations

import pipeline_child
import pytest
from s3_server import MotoS3Server

from entk_ray import pipeline
from entk_ray.redaction import REDACTED, redact, redact_text

FAKE_KEY = "AKIAFAKE7QX2EXAMPLE"
FAKE_SECRET = "s3cr3t-Fake/K7MDENG+bPxRfiCYEXAMPLEKEY"
FAKE_TOKEN = "FwoGZXIvYXdzEFAKE-session-token"
SECRETS = (FAKE_KEY, FAKE_SECRET, FAKE_TOKEN)


def test_redact_keeps_settings_and_hides_credentials():
    options = {"key": FAKE_KEY, "secret": FAKE_SECRET, "token": FAKE_TOKEN, "anon": False,
               "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1",
                                 "aws_access_key_id": FAKE_KEY, "aws_secret_access_key": FAKE_SECRET,
                                 "aws_session_token": FAKE_TOKEN},
               "config_kwargs": {"read_timeout": 10}, "password": "hunter2", "profile": "dev"}
    clean = redact({"config": {"storage_options": options}, "rows": [{"method": "eNTK", "r": 0.1}]})
    text = repr(clean)
    assert not any(s in text for s in (*SECRETS, "hunter2"))
    kept = clean["config"]["storage_options"]
    assert kept["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert kept["client_kwargs"]["region_name"] == "us-east-1" and kept["profile"] == "dev"
    assert kept["config_kwargs"] == {"read_timeout": 10} and kept["anon"] is False
    assert kept["key"] == kept["client_kwargs"]["aws_secret_access_key"] == REDACTED
    assert clean["rows"] == [{"method": "eNTK", "r": 0.1}]
    assert redact_text(f"s3://{FAKE_KEY}:{FAKE_SECRET}@bucket/x") == f"s3://{REDACTED}@bucket/x"


@pytest.fixture(scope="module")
def s3():
    with MotoS3Server() as server:
        yield server


def test_fake_credentials_appear_in_no_output(ray_local, s3, tmp_path, monkeypatch, caplog, capfd):
    from entk_ray.distributed import RayBackend

    s3.make_bucket("entk-secret-test")
    options = {"key": FAKE_KEY, "secret": FAKE_SECRET,
               "client_kwargs": {"endpoint_url": s3.endpoint_url, "aws_session_token": FAKE_TOKEN}}
    out = tmp_path / "out"
    cfg = pipeline_child.make_config(str(out), "s3://entk-secret-test/runs", options)
    monkeypatch.setattr(pipeline, "build_benchmark", pipeline_child.benchmark)
    with caplog.at_level("DEBUG", logger="entk_ray"):
        backend = RayBackend(cfg, featurizer_factory=pipeline_child.factory(cfg), keep_partials=True)
        result = pipeline.run(cfg, backend=backend, progress=False)
    assert result.rows and backend.stats["shards_computed"] > 0  # the run really used the store

    written = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    fs = s3.filesystem()
    objects = fs.find("entk-secret-test")
    written.update({f"s3://{key}": fs.cat_file(key) for key in objects})
    assert any(name.endswith("results.json") for name in written) and any("/shards/" in k for k in objects)
    assert any(name.endswith("_fingerprint.json") for name in written)
    for name, data in written.items():
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} written to {name}"
    printed = capfd.readouterr()
    for secret in SECRETS:
        assert secret not in caplog.text and secret not in printed.out and secret not in printed.err
    # The endpoint (not a secret) is kept, so the results still say where the store was.
    assert s3.endpoint_url.encode() in written[str(out / "results.json")]


def test_command_lines_keep_their_shape_and_lose_credentials():
    """The command line goes into results.json and results.md: a --set storage_options override
    with credentials (whole mapping, one field, or malformed) is written without them."""
    import json
    import shlex

    from entk_ray.config import Config, ConfigError
    from entk_ray.provenance import command_line

    options = json.dumps({"key": FAKE_KEY, "secret": FAKE_SECRET,
                          "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": FAKE_TOKEN}})
    argv = ["scripts/run_demo.py", "--p", "1000", "--set", f"storage_options={options}",
            f"--set=storage_options.secret={FAKE_SECRET}", "--set", f"storage_options={{key: {FAKE_KEY}, secret: [",
            "--artifact-store", f"s3://{FAKE_KEY}:{FAKE_SECRET}@bucket/runs", "--set", "solver.r_grid=[0.1, 1.0]"]
    line = command_line(argv)
    assert not any(secret in line for secret in SECRETS), line
    args = shlex.split(line)
    assert args[:4] == ["python", "scripts/run_demo.py", "--p", "1000"] and args[-1] == "solver.r_grid=[0.1, 1.0]"
    kept = json.loads(args[5].split("=", 1)[1])
    assert kept["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000" and kept["key"] == REDACTED
    assert args[6] == f"--set=storage_options.secret={REDACTED}" and args[8] == f"storage_options={REDACTED}"
    assert args[10] == f"s3://{REDACTED}@bucket/runs"

    for bad in (f"storage_options.secret=[{FAKE_SECRET}", f"storage_options={{key: {FAKE_KEY}, secret: ["):
        with pytest.raises(ConfigError) as info:
            Config().with_overrides([bad])
        assert not any(secret in str(info.value) for secret in SECRETS), str(info.value)
