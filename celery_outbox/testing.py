"""Local DynamoDB for tests, demos and benchmarks.

Two ways to get a DynamoDB endpoint on a laptop or a CI machine:

* :class:`DynamoDBLocal` runs AWS's own emulator (Java 17) from the npm
  package ``amplify-dynamodb-simulator``, which bundles it. The package is
  fetched once with ``npm pack`` into a cache folder.
* :class:`MotoServer` runs moto's DynamoDB in a thread of this process: no
  Java, fast start, but more lenient than DynamoDB in places.

Both expose ``endpoint_url`` and work as context managers. Run
``python -m celery_outbox.testing install`` to fetch DynamoDB Local ahead of
time (CI does).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["DynamoDBLocal", "MotoServer", "free_port", "install_dynamodb_local"]

SIMULATOR_PACKAGE = "amplify-dynamodb-simulator@2.9.30"
DEFAULT_DIR = Path(
    os.environ.get(
        "DYNAMODB_LOCAL_DIR",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "celery_outbox"
        / "dynamodb-local",
    )
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_credentials() -> None:
    """Set dummy AWS credentials and region unless real ones are set."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def install_dynamodb_local(target: Path = DEFAULT_DIR) -> Path:
    """Fetch DynamoDB Local into ``target`` once; return the jar's folder.

    Raises:
        RuntimeError: npm is missing or the package has no emulator.
    """
    jar = target / "DynamoDBLocal.jar"
    if jar.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "DynamoDB Local needs npm to fetch the package "
            f"{SIMULATOR_PACKAGE}; install Node.js and npm"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [npm, "pack", SIMULATOR_PACKAGE, "--silent"],
            cwd=tmp,
            check=True,
            stdout=subprocess.PIPE,
        )
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as archive:
            members = [m for m in archive.getmembers() if "/emulator/" in m.name]
            archive.extractall(tmp, members=members, filter="data")
        emulator = Path(tmp) / "package" / "emulator"
        if not (emulator / "DynamoDBLocal.jar").exists():
            raise RuntimeError(f"{SIMULATOR_PACKAGE} holds no DynamoDBLocal.jar")
        if target.exists():
            shutil.rmtree(target)
        emulator.rename(target)
    return target


def _wait_http(url: str, deadline_s: float, proc: subprocess.Popen[Any] | None) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers, if only with an error: it is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered at {url} within {deadline_s} s")


class _Service:
    """A server the tests start and stop; ``with`` does both."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class DynamoDBLocal(_Service):
    """AWS's DynamoDB Local, in memory, on a free port (needs Java 17).

    Args:
        port: the port to listen on; a free one by default.
        directory: where the jar is; fetched there if missing.
    """

    def __init__(self, port: int | None = None, directory: Path = DEFAULT_DIR) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DynamoDBLocal:
        """Start the emulator and wait until it answers."""
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("DynamoDB Local needs Java 17 or newer on PATH")
        folder = install_dynamodb_local(self.directory)
        self._proc = subprocess.Popen(
            [
                java,
                "-Xmx1g",
                # On a small machine shared with the processes under test,
                # the serial collector and the quick (C1) compiler leave
                # more CPU to them: a third less for the outbox's writes
                # (measured on 2 cores; docs/performance.md).
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-Djava.library.path=DynamoDBLocal_lib",
                "-jar",
                "DynamoDBLocal.jar",
                "-inMemory",
                "-port",
                str(self.port),
            ],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_http(self.endpoint_url, 60, self._proc)
        return self

    @property
    def pid(self) -> int | None:
        """The emulator's process id while it runs (benchmarks read its CPU)."""
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        """Stop the emulator (its in-memory tables are gone)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None


class _OneAtATime:
    """A WSGI app that serves one request at a time.

    moto's server answers each request in a thread of its own and checks a
    write's condition and applies it in separate steps, so two conditional
    writes racing for one item can both succeed. DynamoDB makes each
    conditional write atomic; serving requests one by one restores that.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        with self.lock:
            return list(self.app(environ, start_response))


class MotoServer(_Service):
    """moto's AWS server in a thread of this process, on a free port.

    Requests are served one at a time, so conditional writes are atomic as
    on DynamoDB (see :class:`_OneAtATime`).
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> MotoServer:
        """Start the server and wait until it answers."""
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:  # pragma: no cover - depends on extras
            raise RuntimeError(
                "moto is not installed; pip install 'celery_outbox[embedded]'"
            ) from exc
        fake_credentials()
        # werkzeug logs every request at INFO; a caller that wants them can
        # lower the level again.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(
            ip_address="127.0.0.1", port=self.port, verbose=False
        )
        self._server.start()
        wsgi = self._server._server  # werkzeug's server; it calls .app per request
        wsgi.app = _OneAtATime(wsgi.app)
        _wait_http(self.endpoint_url, 30, None)
        return self

    def stop(self) -> None:
        """Stop the server."""
        if self._server is not None:
            self._server.stop()
            self._server = None


def main(argv: list[str] | None = None) -> int:
    """``python -m celery_outbox.testing install|serve``."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["install"]:
        print(install_dynamodb_local())
        return 0
    if args[:1] == ["serve"]:
        port = int(args[1]) if len(args) > 1 else 8000
        # SIGTERM (kill, a supervisor) must stop Java too, as Ctrl-C does.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with DynamoDBLocal(port) as local:
            print(
                f"DynamoDB Local at {local.endpoint_url}; Ctrl-C stops it", flush=True
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
    print(
        "usage: python -m celery_outbox.testing install | serve [PORT]",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
