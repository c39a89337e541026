"""The hostile-tenant suite, (a) and (b), through a real ``faas serve`` on SeaweedFS and on a file store.

Tenant A's function tries to (a) read B's staged input and result through the store with
whatever credentials its process can find, and (b) read the service's token file, index and
environment. The service runs as root (as in CI); each tenant's workers run as a Unix user the
test creates (``unix_user``), with the tenant's own S3 key (``store_credentials``), which
SeaweedFS's per-identity permissions limit to ``tenants/<name>/`` of the bucket. The
service's directory is traversable (0755), so what protects its files is their own modes:
the token file 0600 (refused otherwise), the state directory 0700. On a file store, each
tenant's part belongs to its user (0700 directories, 0600 files). (c)-(f) are in
tests/warmpool/test_tenant_workers.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import faas
from tests._s3_servers import S3Server, start_seaweedfs
from tests.faas._service_helpers import running_service
from tests.faas._service_proc import TOKENS, ServiceProc

BUCKET = "faas-hostile"
USERS = {"alice": "faas-hostile-a", "bob": "faas-hostile-b"}
KEYS = {t: (f"{t}-key-{secrets.token_hex(4)}", secrets.token_hex(16)) for t in USERS}


def _keep(data: bytes) -> bytes:
    """B's function: its input is staged by reference, and so is its result."""
    return data[::-1]


def _hostile(endpoint: str, bucket: str, bobs_keys: list[str]) -> dict[str, Any]:
    """A's function: take whatever it can find."""
    import glob

    import boto3

    found: dict[str, Any] = {"whoami": os.getuid()}
    found["env"] = {k: v for k, v in os.environ.items() if k.startswith(("AWS", "FAAS"))}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")  # the credentials it has

    def read(path: str, n: int = -1) -> bytes:
        with open(path, "rb") as f:
            return f.read(n)

    def attempt(what: str, fn: Any) -> None:
        try:
            found[what] = repr(fn())[:200]
        except Exception as exc:
            found[what] = f"refused: {type(exc).__name__}"

    for key in bobs_keys:
        attempt(f"get {key}", lambda key=key: s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    attempt("list bob", lambda: s3.list_objects_v2(Bucket=bucket, Prefix="tenants/bob/").get("Contents"))
    attempt("list all", lambda: s3.list_objects_v2(Bucket=bucket).get("Contents"))
    attempt("own put", lambda: s3.put_object(Bucket=bucket, Key="tenants/alice/probe", Body=b"x")["ETag"])
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = read(cmdline).decode(errors="replace").split("\0")
            if "serve" in argv and "--tokens" in argv:
                pid = cmdline.split("/")[2]
                tokens, state = argv[argv.index("--tokens") + 1], argv[argv.index("--state-dir") + 1]
                found["service"] = {"tokens": tokens, "state": state}
                attempt("read tokens", lambda tokens=tokens: read(tokens))
                attempt("read index", lambda state=state: read(f"{state}/index.sqlite", 64))
                attempt("list state", lambda state=state: os.listdir(state))
                attempt("read environ", lambda pid=pid: read(f"/proc/{pid}/environ"))
                attempt("read memory", lambda pid=pid: read(f"/proc/{pid}/mem", 1))
    return found


def _hostile_files(bobs_paths: list[str], bobs_dir: str) -> dict[str, Any]:
    """A's function on a file store: B's files by path, B's directory, its own part of the store."""
    from runtime import current_store

    found: dict[str, Any] = {"whoami": os.getuid(), "own root": str(getattr(current_store(), "root", ""))}
    for path in [*bobs_paths, bobs_dir]:
        try:
            if os.path.isdir(path):
                found[path] = repr(os.listdir(path))[:100]
            else:
                with open(path, "rb") as f:
                    found[path] = repr(f.read(64))
        except OSError as exc:
            found[path] = f"refused: {type(exc).__name__}"
    current_store().put("probe", b"mine")  # control: its own part is writable
    return found


def _python_for(users: list[str]) -> str | None:
    """An interpreter the created users can run with this project (None: none can)."""
    path = os.pathsep.join(p or os.getcwd() for p in sys.path)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = (
        sys.executable,
        f"/usr/bin/{version}",
        f"/usr/local/bin/{version}",
        shutil.which(version) or "",
    )
    for python in candidates:
        if not python or not os.path.exists(python):
            continue
        entry = pwd.getpwnam(users[0])
        try:
            probe = subprocess.run(
                [python, "-P", "-c", "import warmpool.local.worker, boto3"], user=entry.pw_uid,
                group=entry.pw_gid, extra_groups=[], capture_output=True, cwd="/",
                env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
            )  # fmt: skip
        except OSError:
            continue  # it cannot even execute it
        if probe.returncode == 0:
            return python
    return None


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("identity mapping needs root and useradd (CI runs as root)")
    made = []
    try:
        for name in USERS.values():
            subprocess.run(["userdel", name], capture_output=True)
            subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)
            made.append(name)
        yield USERS
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    identities = [
        {
            "name": tenant,
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": [f"{a}:{BUCKET}/tenants/{tenant}/*" for a in ("Read", "Write", "List")],
        }
        for tenant, (key, secret) in KEYS.items()
    ]
    try:
        server = start_seaweedfs(
            tmp_path_factory.mktemp("hostile-weed"), identities
        )  # its data dir stays 0700
    except LookupError as exc:
        pytest.skip(str(exc))
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    server.stop(kill=True)


@pytest.fixture(scope="module")
def service(
    users: dict[str, str], seaweed: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProc]:
    python = _python_for(list(users.values()))
    if python is None:
        pytest.skip("the created users cannot run this project's Python (it lives in a private directory)")
    # Traversable, as a service directory under /srv or /var/lib would be: its files' own modes protect them.
    root = Path(tempfile.mkdtemp(prefix="faas-hostile-"))
    root.chmod(0o755)
    env = {**seaweed.env()}
    extra: dict[str, list[str]] = {}
    for tenant, (key, secret) in KEYS.items():
        env[f"FAAS_T_{tenant.upper()}_KEY"], env[f"FAAS_T_{tenant.upper()}_SECRET"] = key, secret
        extra[tenant] = [
            f'unix_user = "{users[tenant]}"',
            f'store_credentials = {{access_key_id_env = "FAAS_T_{tenant.upper()}_KEY", '
            f'secret_access_key_env = "FAAS_T_{tenant.upper()}_SECRET"}}',
        ]
    with running_service(
        root / "svc",
        store_url=seaweed.store_url(BUCKET),
        extra_env=env,
        tenant_toml=extra,
        serve_args=["--worker-python", python, "--staging-threshold", "64KiB"],
    ) as svc:
        yield svc
    shutil.rmtree(root, ignore_errors=True)


def test_a_tenant_finds_nothing_of_another_tenant_or_of_the_service(
    service: ServiceProc, seaweed: S3Server
) -> None:
    alice = faas.RemoteClient(service.url, token=TOKENS["alice"])
    bob = faas.RemoteClient(service.url, token=TOKENS["bob"])
    try:
        with contextlib.ExitStack() as stack:
            for key, value in seaweed.env().items():  # the clients stage with the operator's key here
                stack.enter_context(_env(key, value))
            secret = os.urandom(200_000)
            keep = faas.function(name="keep", timeout=120)(_keep).with_client(bob)
            assert keep.remote(secret) == secret[::-1]  # staged in and out under tenants/bob/
            bobs = [
                o["Key"]
                for o in seaweed.client().list_objects_v2(Bucket=BUCKET, Prefix="tenants/bob/")["Contents"]
            ]
            assert len(bobs) >= 2, bobs  # at least its staged input and its result
            hostile = faas.function(name="hostile", timeout=120)(_hostile).with_client(alice)
            found = hostile.remote(seaweed.endpoint_url, BUCKET, bobs)
    finally:
        alice.shutdown()
        bob.shutdown()
    print("what A's function found:", found)  # for the log of a failing run
    assert found["whoami"] == pwd.getpwnam(USERS["alice"]).pw_uid
    # (a) its own key only, and the store refuses everything of B's with it
    assert found["env"].get("AWS_ACCESS_KEY_ID") == KEYS["alice"][0]
    assert not {k for k in found["env"] if k.startswith("FAAS")}, found["env"]
    assert KEYS["bob"][1] not in repr(found) and seaweed.secret_key not in repr(found)
    stolen = {
        k: v for k, v in found.items() if k.startswith(("get ", "list ")) and not v.startswith("refused")
    }
    assert not stolen, stolen
    assert not found["own put"].startswith("refused")  # control: the key works where it may
    # (b) the service's token file, index and environment
    assert "service" in found, "the service process was not found (so (b) proved nothing)"
    for what in ("read tokens", "read index", "list state", "read environ", "read memory"):
        assert found[what].startswith("refused"), (what, found[what])


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@pytest.fixture(scope="module")
def file_service(users: dict[str, str]) -> Iterator[ServiceProc]:
    python = _python_for(list(users.values()))
    if python is None:
        pytest.skip("the created users cannot run this project's Python (it lives in a private directory)")
    root = Path(tempfile.mkdtemp(prefix="faas-hostile-file-"))
    root.chmod(0o755)
    extra = {tenant: [f'unix_user = "{users[tenant]}"'] for tenant in USERS}
    with running_service(
        root / "svc",
        tenant_toml=extra,
        serve_args=["--worker-python", python, "--staging-threshold", "64KiB"],
    ) as svc:
        svc.store.chmod(0o755)  # the store's root is traversable; each tenant's part is its user's alone
        yield svc
    shutil.rmtree(root, ignore_errors=True)


def test_on_a_file_store_each_tenants_part_is_its_users_alone(file_service: ServiceProc) -> None:
    alice = faas.RemoteClient(file_service.url, token=TOKENS["alice"])
    bob = faas.RemoteClient(file_service.url, token=TOKENS["bob"])
    try:
        secret = os.urandom(200_000)
        keep = faas.function(name="keep", timeout=120)(_keep).with_client(bob)
        assert keep.remote(secret) == secret[::-1]
        bobs_dir = file_service.store / "tenants" / "bob"
        bobs = [str(p) for p in bobs_dir.rglob("*") if p.is_file()]
        assert len(bobs) >= 2 and bobs_dir.stat().st_uid == pwd.getpwnam(USERS["bob"]).pw_uid
        assert all(os.stat(p).st_mode & 0o077 == 0 for p in bobs)  # 0600: the user's alone
        hostile = faas.function(name="hostile", timeout=120)(_hostile_files).with_client(alice)
        found = hostile.remote(bobs, str(bobs_dir))
    finally:
        alice.shutdown()
        bob.shutdown()
    print("what A's function found:", found)
    assert found["whoami"] == pwd.getpwnam(USERS["alice"]).pw_uid
    assert found["own root"] == str(file_service.store / "tenants" / "alice")
    leaked = {k: v for k, v in found.items() if k.startswith("/") and not v.startswith("refused")}
    assert not leaked, leaked
    assert (file_service.store / "tenants" / "alice" / "probe").read_bytes() == b"mine"
