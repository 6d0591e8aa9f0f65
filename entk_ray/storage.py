"""Local paths and URLs (``s3://…``) through fsspec: the filesystem helpers every module shares.

``storage_options`` (``Config.storage_options``) are fsspec options for remote URLs, e.g.
``{"client_kwargs": {"endpoint_url": ...}, "key": ..., "secret": ...}`` for s3fs; local paths
ignore them.

S3 never hangs: :func:`filesystem_for` is the one place filesystems are made, and it gives s3fs
connect and read timeouts and a bounded number of attempts (:data:`S3_CONFIG`, merged under the
user's own ``storage_options["config_kwargs"]``, which win; :data:`S3_FS_RETRIES` attempts of
s3fs's own retry loop around botocore's). An endpoint that accepts connections but never answers
therefore fails after at most ``S3_FS_RETRIES × total_max_attempts × read_timeout`` seconds (plus
backoff) instead of minutes; uploads, which the read timeout does not cover once the server stops
reading, get a deadline of their own (:func:`pipe_file`). :func:`storage_errors` turns such a
failure into a :class:`~entk_ray.errors.StorageError` naming the URL and the endpoint.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

from entk_ray.errors import StorageError
from entk_ray.redaction import redact_text

#: botocore ``Config`` defaults for s3fs (``config_kwargs``): seconds to connect, seconds without
#: a byte while reading a response, and attempts per request, the first one included
#: (``total_max_attempts``; botocore's ``max_attempts`` counts retries only).
S3_CONFIG: dict[str, Any] = {"connect_timeout": 5, "read_timeout": 15,
                             "retries": {"total_max_attempts": 2, "mode": "standard"}}
#: Attempts of s3fs's own retry loop (it also retries a response body cut mid-stream).
S3_FS_RETRIES = 2


def is_remote(path: str) -> bool:
    """True for URLs opened through fsspec with storage options (``s3://``, ``gs://``, ...);
    plain paths and ``file://`` URLs are local."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    """A local path from a plain path or a ``file://`` URL."""
    return str(path)[len("file://"):] if str(path).startswith("file://") else str(path)


def filesystem_for(path: str, storage_options: dict[str, Any] | None = None):
    """``(fsspec filesystem, path inside it)`` for a local path or a URL such as ``s3://b/p``."""
    import fsspec

    options = dict(storage_options or {}) if is_remote(path) else {}
    s3 = str(path).startswith(("s3://", "s3a://"))
    if s3:
        options["config_kwargs"] = deep_merged(S3_CONFIG, options.get("config_kwargs") or {})
    fs, inner = fsspec.core.url_to_fs(path, **options)
    if s3:
        fs.retries = S3_FS_RETRIES  # an instance attribute of s3fs (default 5); fsspec caches fs per options
        if getattr(fs, "session", None) is None:  # before its first request: s3fs then keeps this session
            fs.session = _s3_session(getattr(fs, "kwargs", {}) or {})
    return fs, inner


def pipe_file(fs, path: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """``fs.pipe_file`` (one PUT, or a multipart upload) within :func:`write_deadline`."""
    deadline = write_deadline(fs, len(data), storage_options)
    if deadline is None:
        fs.pipe_file(path, data)
    else:
        fs.pipe_file(path, data, timeout=deadline)  # fsspec's sync wrapper: FSTimeoutError when it passes


def _s3_session(kwargs: dict[str, Any]):
    """An aiobotocore session whose PUTs carry no ``Expect: 100-continue``: aiohttp waits for the
    "100 Continue" with no timeout at all, so a server that stops answering would hang every
    upload forever (reads time out; writes would not). Without the header the read timeout
    applies to small uploads too (large ones: :func:`write_deadline`)."""
    import aiobotocore.session
    from botocore.handlers import add_expect_header

    session = aiobotocore.session.AioSession(**kwargs)
    session.unregister("before-call.s3", add_expect_header)
    return session


#: Slowest upload rate a write deadline allows for (bytes per second).
MIN_UPLOAD_RATE = 1 << 20


def write_deadline(fs, nbytes: int, storage_options: dict[str, Any] | None = None) -> float | None:
    """Seconds an upload of ``nbytes`` may take before it counts as hung, or None (no deadline:
    a local or synchronous filesystem). Needed because a request whose body cannot be sent (the
    server stopped reading) is not covered by the read timeout: every attempt may take
    connect + read timeout, plus the transfer at :data:`MIN_UPLOAD_RATE` at worst."""
    if not getattr(fs, "async_impl", False):
        return None
    config = deep_merged(S3_CONFIG, (storage_options or {}).get("config_kwargs") or {})
    attempts = request_attempts(config) * int(getattr(fs, "retries", 1) or 1)
    per_attempt = float(config.get("connect_timeout") or 60) + float(config.get("read_timeout") or 60)
    return attempts * per_attempt + nbytes / MIN_UPLOAD_RATE


def request_attempts(config: dict[str, Any]) -> int:
    """Attempts botocore makes per request under ``config_kwargs`` (first one included)."""
    retries = config.get("retries") or {}
    if retries.get("total_max_attempts"):
        return int(retries["total_max_attempts"])
    if retries.get("max_attempts") is not None:
        return int(retries["max_attempts"]) + 1
    return 3 if retries.get("mode") == "standard" else 5  # botocore's defaults


def deep_merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``given``, nested dicts key by key; a deep copy (botocore edits the
    ``retries`` dict it is given)."""
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        out[key] = deep_merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says a storage endpoint did not answer or could not
    be reached: timeouts and connection errors of botocore, aiohttp, fsspec and sockets."""
    kinds: list[type] = [TimeoutError, asyncio.TimeoutError, socket.timeout, ConnectionError]
    with contextlib.suppress(ImportError):
        import botocore.exceptions as boto

        kinds += [boto.ConnectionError, boto.ReadTimeoutError, boto.ConnectionClosedError]
    with contextlib.suppress(ImportError):
        import aiohttp

        kinds += [aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError]
    with contextlib.suppress(ImportError):
        from fsspec.exceptions import FSTimeoutError

        kinds.append(FSTimeoutError)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageError) or isinstance(exc, tuple(kinds)):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__  # Ray's wrapper, then `raise … from`
    return False


@contextlib.contextmanager
def storage_errors(url: str, storage_options: dict[str, Any] | None = None, what: str = "") -> Iterator[None]:
    """Turn "the endpoint did not answer" inside the block into a :class:`StorageError` naming
    ``url`` and the endpoint; every other error passes through unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        if not unreachable(exc):
            raise
        raise StorageError(unreachable_message(url, storage_options, exc, what)) from exc


def unreachable_message(url: str, storage_options: dict[str, Any] | None, exc: BaseException,
                        what: str = "") -> str:
    options = storage_options or {}
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url")
    config = deep_merged(S3_CONFIG, options.get("config_kwargs") or {})
    where = f" (endpoint {endpoint})" if endpoint else ""
    limits = (f"connect_timeout={config.get('connect_timeout')} s, read_timeout={config.get('read_timeout')} s, "
              f"{request_attempts(config)} attempts per request" if str(url).startswith("s3") else "")
    detail = " ".join(f"{type(exc).__name__}: {exc}".split())
    return redact_text(
        f"cannot {what or 'reach'} {url}{where}: the storage endpoint did not answer ({detail})"
        f"{f'; limits: {limits}' if limits else ''}. Check that the endpoint is up and reachable "
        f"(storage_options.client_kwargs.endpoint_url, network, credentials) and rerun: finished "
        f"work stored so far is reused; timeouts are storage_options.config_kwargs")


def as_url(fs, path: str) -> str:
    """A path as returned by ``fs.find``/``fs.ls`` turned back into something ``filesystem_for`` opens."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


def join_url(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])



def read_parquet(path: str, storage_options: dict[str, Any] | None = None):
    """Read a whole Parquet file (local or URL) into a pyarrow table.

    The bytes are read first and parsed from memory, so no pyarrow thread ever calls back into
    a Python file object (small cache files only).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage_errors(path, storage_options, "read"):
        fs, inner = filesystem_for(path, storage_options)
        data = fs.cat_file(inner)
    return pq.read_table(pa.BufferReader(data))


def write_parquet(table, path: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write a pyarrow table to a local path (atomically: temp file + rename) or a URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_remote(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        with storage_errors(path, storage_options, "write"):
            fs, inner = filesystem_for(path, storage_options)
            data = sink.getvalue().to_pybytes()
            pipe_file(fs, inner, data, storage_options)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
