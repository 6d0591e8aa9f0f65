"""Local paths and URLs (``s3://…``) through fsspec: the filesystem helpers every module shares.

``storage_options`` (``Config.storage_options``) are fsspec options for remote URLs, e.g.
``{"client_kwargs": {"endpoint_url": ...}, "key": ..., "secret": ...}`` for s3fs; local paths
ignore them.
"""
from __future__ import annotations

import os
import uuid
from typing import Any


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
    return fsspec.core.url_to_fs(path, **options)


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

    fs, inner = filesystem_for(path, storage_options)
    return pq.read_table(pa.BufferReader(fs.cat_file(inner)))


def write_parquet(table, path: str, storage_options: dict[str, Any] | None = None) -> None:
    """Write a pyarrow table to a local path (atomically: temp file + rename) or a URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if is_remote(path):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        fs, inner = filesystem_for(path, storage_options)
        fs.pipe_file(inner, sink.getvalue().to_pybytes())
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
