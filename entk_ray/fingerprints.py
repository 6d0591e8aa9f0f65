"""Short, stable hashes: how artifacts, caches and manifests are keyed.

Every fingerprint is the first 16 hex characters of a SHA-256. Equal inputs give equal
fingerprints on every machine and process (JSON with sorted keys; lines in order; file bytes);
any change gives another one.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

LENGTH = 16


def digest(value: Any) -> str:
    """Fingerprint of a JSON-able value (dict keys sorted; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:LENGTH]


def digest_lines(lines: Iterable[str]) -> str:
    """Fingerprint of a sequence of text lines (each hashed with a trailing newline)."""
    h = hashlib.sha256()
    for line in lines:
        h.update(f"{line}\n".encode())
    return h.hexdigest()[:LENGTH]


def digest_stream(stream, block: int = 1 << 20) -> str:
    """Full hex SHA-256 of a binary file object, read in ``block``-byte pieces."""
    h = hashlib.sha256()
    for chunk in iter(lambda: stream.read(block), b""):
        h.update(chunk)
    return h.hexdigest()


def file_digest(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """Fingerprint of a file's bytes (a local path or a URL such as ``s3://…``)."""
    from entk_ray.storage import filesystem_for

    fs, inner = filesystem_for(str(path), storage_options)
    with fs.open(inner, "rb") as fh:
        return digest_stream(fh)[:LENGTH]
