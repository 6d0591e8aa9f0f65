"""A real local S3 endpoint for tests: ``moto_server`` in a subprocess.

Usage (a fixture in the test module; the process is always stopped, also on errors)::

    from s3_server import MotoS3Server

    @pytest.fixture(scope="module")
    def s3():
        with MotoS3Server() as server:
            yield server

    def test_x(s3):
        fs = s3.filesystem()
        s3.make_bucket("my-bucket")
        options = s3.storage_options  # pass to fsspec / s3fs / entk_ray

The server listens on 127.0.0.1 on a free port, accepts the dummy credentials
``testing``/``testing`` and keeps everything in memory. ``moto_server`` is looked up beside the
running Python interpreter first (the project's virtual environment), then on ``PATH``.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DUMMY_KEY = "testing"
STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the test process dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def moto_server_executable() -> str:
    beside_python = Path(sys.executable).parent / "moto_server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("moto_server")
    if found is None:
        raise RuntimeError("moto_server not found: install the dev extra (moto[server])")
    return found


class MotoS3Server:
    """Start ``moto_server`` on a free local port; stop it on ``stop()`` / context exit / interpreter exit.

    On Linux the server also gets SIGTERM if the test process is killed outright.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self.port = port or free_port()
        self.endpoint_url = f"http://{host}:{self.port}"
        self._process: subprocess.Popen | None = None

    # ---- lifecycle
    def start(self) -> "MotoS3Server":
        if self._process is not None:
            return self
        self._process = subprocess.Popen(
            [moto_server_executable(), "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "AWS_ACCESS_KEY_ID": DUMMY_KEY, "AWS_SECRET_ACCESS_KEY": DUMMY_KEY},
            preexec_fn=_die_with_parent,
        )
        atexit.register(self.stop)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with code {self._process.returncode} during startup")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answers: it is up
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer on {self.endpoint_url} within {STARTUP_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> "MotoS3Server":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # ---- clients
    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this endpoint (pass as ``storage_options``)."""
        return {
            "key": DUMMY_KEY,
            "secret": DUMMY_KEY,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def filesystem(self):
        """A fresh (uncached) ``s3fs.S3FileSystem`` talking to this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (≥ 3 characters) and return ``s3://name``."""
        if len(name) < 3:
            raise ValueError(f"S3 bucket names need at least 3 characters, got {name!r}")
        self.filesystem().mkdir(name)
        return f"s3://{name}"


class PausableProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (host, port) that can stop answering.

    While it forwards, clients see the target. :meth:`pause` makes it a server that accepts
    connections but never answers (requests are held, nothing comes back), as a hung or
    partitioned endpoint does; :meth:`resume` forwards again (connections from before are dropped,
    so no request held during the pause reaches the target late). With ``target=None`` it is
    paused for good: an endpoint that never answers.
    """

    def __init__(self, target: tuple[str, int] | None = None):
        import threading

        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._forwarding = threading.Event()
        if target is not None:
            self._forwarding.set()
        self._generation = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def pause(self) -> None:
        self._generation += 1
        self._forwarding.clear()

    def resume(self) -> None:
        if self.target is None:
            raise RuntimeError("a proxy without a target never answers")
        self._generation += 1
        self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        for sock in [self._listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "PausableProxy":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client, self._generation), daemon=True).start()

    def _serve(self, client: socket.socket, generation: int) -> None:
        import threading

        self._forwarding.wait()  # paused: hold the connection, answer nothing
        if self._closed or generation != self._generation or self.target is None:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        self._sockets.append(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst, generation), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                self._forwarding.wait()
                if self._closed or generation != self._generation:
                    break  # paused meanwhile: this connection is dead to its client
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.close()
            except OSError:
                pass
