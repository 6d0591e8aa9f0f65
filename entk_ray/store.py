"""Fingerprinted artifacts on a local folder or ``s3://``: kernel blocks, K, K_e, embeddings, sweeps.

Why: the features are the expensive stage (hours of GPU time on Living-17). Every artifact is
stored under the fingerprint of everything that determines it (weights hash, parameter subset S,
dataset manifest and transform, storage dtype, p, seeds: :func:`entk_ray.backends.run_fingerprint`),
so a rerun with the same fingerprint picks up finished pieces and computes only what is missing,
while a changed setting lands in a different namespace and can never read stale work.

Layout (one folder per fingerprint; every artifact is a data file plus a JSON sidecar)::

    <root>/<fingerprint>/_fingerprint.json         the parts the fingerprint hashes (for humans)
    <root>/<fingerprint>/<key>.npy                 an array (numpy .npy: dtype + shape + bytes)
    <root>/<fingerprint>/<key>.json                its sidecar: fingerprint, key, dtype, shape,
                                                   byte size, creation time, free-form ``meta``
    <root>/<fingerprint>/<key>.json                (JSON artifacts: a document with the same
                                                   header fields and the payload under ``value``)

Keys are ``/``-separated relative paths, e.g. ``blocks/train/r0-256_c256-512`` or
``kernels/train``. The data file is written first and the sidecar last, so a sidecar is the
commit marker: :meth:`Namespace.has` is true only for complete artifacts, and a crash mid-write
leaves at worst an orphaned data file that the next save overwrites. Local writes go to a
temporary name and are renamed into place; an S3 PUT is atomic per object. Loads check that the
sidecar's fingerprint, dtype, shape and byte size match, so a file copied into the wrong folder
or cut short is rejected (:class:`ArtifactError`) instead of silently reused.

API: ``ArtifactStore(uri, storage_options).namespace(fingerprint)`` gives a :class:`Namespace` with
``has / keys / meta / save_array / load_array / save_json / load_json / delete``;
:func:`save_kernels` / :func:`load_kernels` store and find a complete kernel set (K, each K_e and
the embeddings), for any backend.

The store is plain fsspec (s3fs for ``s3://``; ``storage_options`` as in ``Config.storage_options``,
e.g. ``{"client_kwargs": {"endpoint_url": ...}, "key": ..., "secret": ...}``) and holds no open
connections when pickled, so Ray tasks can write to it.
"""
from __future__ import annotations

import io
import json
import posixpath
import time
import uuid
from typing import Any

import numpy as np

from entk_ray.storage import filesystem_for, is_remote

SIDECAR_VERSION = 1


class ArtifactError(RuntimeError):
    """A stored artifact is missing, incomplete or belongs to another fingerprint."""


def default_store_uri(out_dir: str, artifact_store: str | None) -> str:
    """``artifact_store`` if set, else ``<out_dir>/artifacts`` (the StoreConfig convention)."""
    return artifact_store or posixpath.join(str(out_dir), "artifacts")


class ArtifactStore:
    """A root folder (local path or ``s3://bucket/prefix``) holding one namespace per fingerprint."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        if not uri:
            raise ValueError("artifact store uri must not be empty")
        self.uri = str(uri).rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        self._fs = None

    @classmethod
    def from_config(cls, cfg) -> ArtifactStore:
        """The store named by ``cfg.store`` (``artifact_store`` or ``<out_dir>/artifacts``)."""
        return cls(default_store_uri(cfg.store.out_dir, cfg.store.artifact_store), cfg.storage_options)

    # fsspec filesystems hold sockets/threads: build lazily, never pickle.
    def __getstate__(self):
        return {"uri": self.uri, "storage_options": self.storage_options, "_fs": None}

    @property
    def is_remote(self) -> bool:
        return is_remote(self.uri)

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._root = filesystem_for(self.uri, self.storage_options)
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - resolves _root
        return self._root

    def namespace(self, fingerprint: str, parts: dict[str, Any] | None = None) -> Namespace:
        """The artifacts of one fingerprint. ``parts`` (what was hashed) is recorded once, for humans."""
        if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
            raise ValueError(f"fingerprint must be a plain non-empty name, got {fingerprint!r}")
        ns = Namespace(self, fingerprint)
        if parts is not None and not ns.has("_fingerprint"):
            ns.save_json("_fingerprint", parts)
        return ns

    def fingerprints(self) -> list[str]:
        """Fingerprints with at least one artifact."""
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.root, detail=False)
                      if self.fs.isdir(p))

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"


class Namespace:
    """Artifacts keyed by name inside one fingerprint's folder (see the module docstring)."""

    def __init__(self, store: ArtifactStore, fingerprint: str):
        self.store = store
        self.fingerprint = fingerprint

    @property
    def uri(self) -> str:
        return f"{self.store.uri}/{self.fingerprint}"

    def _path(self, key: str, suffix: str) -> str:
        key = key.strip("/")
        if not key or ".." in key.split("/"):
            raise ValueError(f"artifact key must be a relative path, got {key!r}")
        return posixpath.join(self.store.root, self.fingerprint, key + suffix)

    # ------------------------------------------------------------------ queries
    def has(self, key: str) -> bool:
        """True when the artifact is complete (its sidecar, written last, exists)."""
        return self.store.fs.exists(self._path(key, ".json"))

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of complete artifacts under ``prefix`` (sorted)."""
        base = posixpath.join(self.store.root, self.fingerprint)
        fs = self.store.fs
        if not fs.exists(base):
            return []
        out = []
        for path in fs.find(base):
            rel = posixpath.relpath(path, base)
            if rel.endswith(".json") and rel.startswith(prefix.strip("/")):
                out.append(rel[:-len(".json")])
        return sorted(out)

    def meta(self, key: str) -> dict[str, Any]:
        """The sidecar of an artifact (header fields and ``meta``)."""
        try:
            with self.store.fs.open(self._path(key, ".json"), "rb") as fh:
                doc = json.loads(fh.read().decode())
        except FileNotFoundError as exc:
            raise ArtifactError(f"no artifact {key!r} in {self.uri}") from exc
        if doc.get("fingerprint") != self.fingerprint or doc.get("key") != key.strip("/"):
            raise ArtifactError(f"artifact {key!r} in {self.uri} belongs to fingerprint "
                                f"{doc.get('fingerprint')!r} key {doc.get('key')!r}")
        return doc

    # ------------------------------------------------------------------ arrays
    def save_array(self, key: str, array: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Store ``array`` as ``<key>.npy`` and commit it with its sidecar."""
        array = np.asarray(array)
        if array.dtype == object:
            raise TypeError(f"artifact {key!r}: object arrays cannot be stored")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        data = buf.getvalue()
        self._write(self._path(key, ".npy"), data)
        self._write(self._path(key, ".json"), self._header(key, meta, kind="array", dtype=array.dtype.str,
                                                           shape=list(array.shape), nbytes=len(data)))

    def load_array(self, key: str, mmap: bool = False) -> np.ndarray:
        """The stored array, after checking its sidecar (fingerprint, dtype, shape, size)."""
        doc = self.meta(key)
        if doc.get("kind") != "array":
            raise ArtifactError(f"artifact {key!r} in {self.uri} is not an array")
        path = self._path(key, ".npy")
        fs = self.store.fs
        try:
            if mmap and not self.store.is_remote:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
                size = fs.size(path)
            else:
                with fs.open(path, "rb") as fh:
                    data = fh.read()
                size = len(data)
                array = np.load(io.BytesIO(data), allow_pickle=False)
        except (FileNotFoundError, ValueError, EOFError) as exc:
            raise ArtifactError(f"artifact {key!r} in {self.uri} is unreadable: {exc}") from exc
        if size != doc["nbytes"] or array.dtype.str != doc["dtype"] or list(array.shape) != doc["shape"]:
            raise ArtifactError(f"artifact {key!r} in {self.uri} does not match its sidecar "
                                f"({array.dtype.str} {list(array.shape)} {size} B vs {doc['dtype']} "
                                f"{doc['shape']} {doc['nbytes']} B)")
        return array

    # ------------------------------------------------------------------ JSON documents
    def save_json(self, key: str, value: Any, meta: dict[str, Any] | None = None) -> None:
        """Store a JSON-serializable value (sweep results, manifests) as ``<key>.json``."""
        doc = json.loads(self._header(key, meta, kind="json"))
        doc["value"] = value
        self._write(self._path(key, ".json"), json.dumps(doc, sort_keys=True).encode())

    def load_json(self, key: str) -> Any:
        doc = self.meta(key)
        if doc.get("kind") != "json":
            raise ArtifactError(f"artifact {key!r} in {self.uri} is not a JSON document")
        return doc["value"]

    # ------------------------------------------------------------------ housekeeping
    def delete(self, prefix: str) -> int:
        """Remove every artifact whose key starts with ``prefix`` (sidecars first). Returns a count."""
        keys = self.keys(prefix)
        fs = self.store.fs
        for key in keys:
            fs.rm(self._path(key, ".json"))
            data = self._path(key, ".npy")
            if fs.exists(data):
                fs.rm(data)
        return len(keys)

    def _header(self, key: str, meta: dict[str, Any] | None, **fields) -> bytes:
        doc = {"version": SIDECAR_VERSION, "fingerprint": self.fingerprint, "key": key.strip("/"),
               "created": time.time(), "meta": meta or {}, **fields}
        return json.dumps(doc, sort_keys=True).encode()

    def _write(self, path: str, data: bytes) -> None:
        fs = self.store.fs
        if self.store.is_remote:
            fs.pipe_file(path, data)  # one PUT: atomic
            return
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)  # rename: readers never see half a file

    def __repr__(self) -> str:
        return f"Namespace({self.uri!r})"


# --------------------------------------------------------------------------------------------
# Kernel sets: what any backend stores once its kernels are complete
# --------------------------------------------------------------------------------------------
def safe_name(split: str) -> str:
    """A split name usable in artifact keys (``ood:optdigits`` → ``ood-optdigits``)."""
    return split.replace(":", "-").replace("/", "-")


def save_kernels(ns: Namespace, train: np.ndarray, evals: dict[str, np.ndarray],
                 embeddings: dict[str, np.ndarray]) -> None:
    """Store K (``kernels/train``), each K_e (``kernels/<set>``) and every split's penultimate
    embeddings (``embeddings/<split>``). K goes last: its presence marks the set complete."""
    for name, emb in embeddings.items():
        ns.save_array(f"embeddings/{safe_name(name)}", emb, meta={"split": name})
    for name, kernel in evals.items():
        ns.save_array(f"kernels/{safe_name(name)}", kernel, meta={"split": name})
    ns.save_array("kernels/train", train, meta={"split": "train"})


def load_kernels(ns: Namespace, sizes: dict[str, int], eval_names: list[str]):
    """``(K, {name: K_e}, {split: embeddings})`` when all of them are stored with the shapes the
    split ``sizes`` imply (``sizes`` has ``"train"`` and every evaluation set), else None."""
    keys = ["kernels/train", *(f"kernels/{safe_name(e)}" for e in eval_names),
            *(f"embeddings/{safe_name(s)}" for s in sizes)]
    if not all(ns.has(k) for k in keys):
        return None
    n = sizes["train"]
    train = ns.load_array("kernels/train")
    evals = {e: ns.load_array(f"kernels/{safe_name(e)}") for e in eval_names}
    embeddings = {s: ns.load_array(f"embeddings/{safe_name(s)}") for s in sizes}
    if train.shape != (n, n) or any(evals[e].shape != (sizes[e], n) for e in eval_names) \
            or any(embeddings[s].shape[0] != sizes[s] for s in sizes):
        return None
    return train, evals, embeddings
