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
temporary name and are renamed into place; an S3 PUT is atomic per object.

Artifacts are verified, not trusted: every sidecar holds the SHA-256 of the data bytes (of the
``.npy`` file; of the canonical JSON of ``value`` for JSON artifacts), and every load checks it
together with the fingerprint, key, dtype, shape and byte size. A flipped byte, an edited JSON
document, a truncated file or an artifact copied into another fingerprint's folder raises
:class:`CorruptArtifactError`; an artifact that is not there, or vanishes while it is read
(another run's :meth:`Namespace.delete`), raises :class:`MissingArtifactError`. The pipeline
loads through :meth:`Namespace.get_array` / :meth:`Namespace.get_json`, which turn both into
None — after logging a corrupt artifact's key and deleting it — so the caller recomputes it and
the run goes on.

Sidecars and JSON artifacts are written through :func:`entk_ray.redaction.redact`: no
credential reaches the store.

API: ``ArtifactStore(uri, storage_options).namespace(fingerprint)`` gives a :class:`Namespace` with
``has / keys / meta / save_array / load_array / get_array / save_json / load_json / get_json /
delete``; :func:`save_kernels` / :func:`load_kernels` store and find a complete kernel set (K, each
K_e and the embeddings), for any backend.

The store is plain fsspec (s3fs for ``s3://``; ``storage_options`` as in ``Config.storage_options``,
e.g. ``{"client_kwargs": {"endpoint_url": ...}, "key": ..., "secret": ...}``) and holds no open
connections when pickled, so Ray tasks can write to it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import posixpath
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np

from entk_ray.errors import UserInputError
from entk_ray.redaction import redact
from entk_ray.storage import filesystem_for, is_remote, pipe_file, storage_errors

log = logging.getLogger(__name__)

#: 2: sidecars hold ``sha256``. Artifacts of version 1 cannot be verified and are recomputed.
SIDECAR_VERSION = 2


class ArtifactError(UserInputError, RuntimeError):
    """A stored artifact cannot be used: missing, corrupt, or another fingerprint's."""


class MissingArtifactError(ArtifactError):
    """No such artifact (never written, or deleted while it was being read)."""


class CorruptArtifactError(ArtifactError):
    """The artifact's bytes do not match its sidecar (hash, size, dtype, shape, fingerprint)."""


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

    @contextlib.contextmanager
    def _io(self, key: str, what: str) -> Iterator[None]:
        """An unreachable store becomes a StorageError naming the artifact's URL."""
        with storage_errors(f"{self.uri}/{key.strip('/')}", self.store.storage_options, what):
            yield

    # ------------------------------------------------------------------ queries
    def has(self, key: str) -> bool:
        """True when the artifact is complete (its sidecar, written last, exists)."""
        with self._io(key, "look up"):
            return self.store.fs.exists(self._path(key, ".json"))

    def keys(self, prefix: str = "") -> list[str]:
        """Keys of complete artifacts under ``prefix`` (sorted). Files that vanish while the
        folder is listed (another run deleting) are left out."""
        base = posixpath.join(self.store.root, self.fingerprint)
        fs = self.store.fs
        with self._io(prefix or ".", "list"):
            try:
                paths = fs.find(base) if fs.exists(base) else []
            except FileNotFoundError:
                paths = []
        out = []
        for path in paths:
            rel = posixpath.relpath(path, base)
            if rel.endswith(".json") and rel.startswith(prefix.strip("/")):
                out.append(rel[:-len(".json")])
        return sorted(out)

    def meta(self, key: str) -> dict[str, Any]:
        """The sidecar of an artifact (header fields and ``meta``), checked to be this one's."""
        return self._sidecar(key)[0]

    def _sidecar(self, key: str) -> tuple[dict[str, Any], bytes]:
        try:
            with self._io(key, "read"):
                raw = self.store.fs.cat_file(self._path(key, ".json"))
        except FileNotFoundError as exc:
            raise MissingArtifactError(f"no artifact {key!r} in {self.uri}") from exc
        try:
            doc = json.loads(raw.decode())
            if not isinstance(doc, dict):
                raise ValueError(f"a JSON {type(doc).__name__}, not an object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri}: unreadable sidecar ({exc})") from exc
        if doc.get("fingerprint") != self.fingerprint or doc.get("key") != key.strip("/"):
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri} belongs to fingerprint "
                                       f"{doc.get('fingerprint')!r} key {doc.get('key')!r}")
        if not doc.get("sha256"):
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri} has no content hash (written by an "
                                       f"older entk_ray, sidecar version {doc.get('version')}): it cannot be verified")
        return doc, raw

    # ------------------------------------------------------------------ arrays
    def save_array(self, key: str, array: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Store ``array`` as ``<key>.npy`` and commit it with its sidecar (holding the data's SHA-256)."""
        array = np.asarray(array)
        if array.dtype == object:
            raise TypeError(f"artifact {key!r}: object arrays cannot be stored")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        data = buf.getvalue()
        with self._io(key, "write"):
            self._write(self._path(key, ".npy"), data)
            self._write(self._path(key, ".json"), self._header(
                key, meta, kind="array", dtype=array.dtype.str, shape=list(array.shape), nbytes=len(data),
                sha256=hashlib.sha256(data).hexdigest()))

    def load_array(self, key: str, mmap: bool = False) -> np.ndarray:
        """The stored array, verified against its sidecar (hash, fingerprint, dtype, shape, size).

        Raises :class:`MissingArtifactError` or :class:`CorruptArtifactError`."""
        doc, _ = self._sidecar(key)
        if doc.get("kind") != "array":
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri} is not an array")
        path = self._path(key, ".npy")
        fs = self.store.fs
        try:
            with self._io(key, "read"):
                if mmap and not self.store.is_remote:
                    with fs.open(path, "rb") as fh:
                        sha, size = _sha256_stream(fh)
                    array = np.load(path, mmap_mode="r", allow_pickle=False)
                else:
                    data = fs.cat_file(path)
                    sha, size = hashlib.sha256(data).hexdigest(), len(data)
                    if sha == doc["sha256"]:
                        array = np.load(io.BytesIO(data), allow_pickle=False)
        except FileNotFoundError as exc:
            raise MissingArtifactError(f"artifact {key!r} in {self.uri} has no data file (deleted?)") from exc
        except (ValueError, EOFError, OSError) as exc:
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri} is unreadable: {exc}") from exc
        if size != doc.get("nbytes") or sha != doc["sha256"]:
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri}: its data ({size} B, sha256 {sha[:12]}…) "
                                       f"do not match its sidecar ({doc.get('nbytes')} B, {doc['sha256'][:12]}…)")
        if array.dtype.str != doc.get("dtype") or list(array.shape) != doc.get("shape"):
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri} does not match its sidecar "
                                       f"({array.dtype.str} {list(array.shape)} vs {doc.get('dtype')} {doc.get('shape')})")
        return array

    def get_array(self, key: str, mmap: bool = False) -> np.ndarray | None:
        """:meth:`load_array`, or None when the artifact is missing or corrupt (see :meth:`_recover`)."""
        try:
            return self.load_array(key, mmap=mmap)
        except ArtifactError as exc:
            return self._recover(key, exc)

    # ------------------------------------------------------------------ JSON documents
    def save_json(self, key: str, value: Any, meta: dict[str, Any] | None = None) -> None:
        """Store a JSON-serializable value (sweep results, manifests) as ``<key>.json``."""
        value = redact(value)
        doc = json.loads(self._header(key, meta, kind="json", sha256=_json_sha256(value)))
        doc["value"] = value
        with self._io(key, "write"):
            self._write(self._path(key, ".json"), json.dumps(doc, sort_keys=True).encode())

    def load_json(self, key: str) -> Any:
        """The stored value, verified against the hash in its document. Raises like :meth:`load_array`."""
        doc, _ = self._sidecar(key)
        if doc.get("kind") != "json" or "value" not in doc:
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri} is not a JSON document")
        if _json_sha256(doc["value"]) != doc["sha256"]:
            raise CorruptArtifactError(f"artifact {key!r} in {self.uri}: its value does not match its sha256 "
                                       f"(edited after it was written?)")
        return doc["value"]

    def get_json(self, key: str) -> Any | None:
        """:meth:`load_json`, or None when the artifact is missing or corrupt (see :meth:`_recover`)."""
        try:
            return self.load_json(key)
        except ArtifactError as exc:
            return self._recover(key, exc)

    def _recover(self, key: str, exc: ArtifactError) -> None:
        """A missing artifact is simply absent; a corrupt one is logged with its key and deleted,
        so the caller recomputes it and the next save replaces it."""
        if isinstance(exc, CorruptArtifactError):
            log.warning("discarding artifact %r of %s and recomputing it: %s", key, self.uri, exc)
            self.delete_key(key)
        return None

    # ------------------------------------------------------------------ housekeeping
    def delete(self, prefix: str) -> int:
        """Remove every artifact whose key starts with ``prefix`` (sidecars first). Returns a count."""
        keys = self.keys(prefix)
        for key in keys:
            self.delete_key(key)
        if not self.store.is_remote:  # object stores have no folders to leave behind
            self._remove_empty_folders({posixpath.dirname(self._path(key, "")) for key in keys})
        return len(keys)

    def _remove_empty_folders(self, folders: set[str]) -> None:
        """Remove each folder a deletion emptied, and its parents up to this namespace's own folder."""
        top = posixpath.join(self.store.root, self.fingerprint)
        fs = self.store.fs
        for folder in sorted(folders, key=len, reverse=True):  # deepest first
            while folder.startswith(top + "/"):
                try:
                    if fs.ls(folder, detail=False):
                        break
                    fs.rmdir(folder)
                except (FileNotFoundError, OSError):
                    break
                folder = posixpath.dirname(folder)

    def delete_key(self, key: str) -> None:
        """Remove one artifact (its sidecar first); what is already gone is not an error."""
        fs = self.store.fs
        with self._io(key, "delete"):
            for suffix in (".json", ".npy"):
                path = self._path(key, suffix)
                with contextlib.suppress(FileNotFoundError):
                    if fs.exists(path):
                        fs.rm(path)

    def _header(self, key: str, meta: dict[str, Any] | None, **fields) -> bytes:
        doc = {"version": SIDECAR_VERSION, "fingerprint": self.fingerprint, "key": key.strip("/"),
               "created": time.time(), "meta": redact(meta or {}), **fields}
        return json.dumps(doc, sort_keys=True).encode()

    def _write(self, path: str, data: bytes) -> None:
        fs = self.store.fs
        if self.store.is_remote:
            pipe_file(fs, path, data, self.store.storage_options)  # one PUT: atomic
            return
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)  # rename: readers never see half a file

    def __repr__(self) -> str:
        return f"Namespace({self.uri!r})"


def _json_sha256(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys), as stored and as read back."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _sha256_stream(fh, block: int = 1 << 22) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: fh.read(block), b""):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


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
    """``(K, {name: K_e}, {split: embeddings})`` when all of them are stored, verified, with the
    shapes the split ``sizes`` imply (``sizes`` has ``"train"`` and every evaluation set), else
    None (a corrupt one is logged and discarded: see :meth:`Namespace.get_array`)."""
    keys = ["kernels/train", *(f"kernels/{safe_name(e)}" for e in eval_names),
            *(f"embeddings/{safe_name(s)}" for s in sizes)]
    if not all(ns.has(k) for k in keys):
        return None
    n = sizes["train"]
    train = ns.get_array("kernels/train")
    evals = {e: ns.get_array(f"kernels/{safe_name(e)}") for e in eval_names}
    embeddings = {s: ns.get_array(f"embeddings/{safe_name(s)}") for s in sizes}
    if train is None or any(v is None for v in (*evals.values(), *embeddings.values())):
        return None
    if train.shape != (n, n) or any(evals[e].shape != (sizes[e], n) for e in eval_names) \
            or any(embeddings[s].shape[0] != sizes[s] for s in sizes):
        return None
    return train, evals, embeddings
