"""``faas serve``'s per-tenant workers: the token file's ``unix_user`` and the command line's limits."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import faas
from faas.service._auth import load_authenticator
from faas.service._serve import build_core
from runtime import AuthConfigError, IdentityMappingError, ServeConfigError
from tests.faas._service_helpers import running_service
from tests.faas._service_proc import TOKENS


def token_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(f'[[tenants]]\nname = "alice-lab"\ntokens = ["alice-token-0123456789"]\n{extra}\n')
    path.chmod(0o600)
    return path


def test_unix_user_is_read_and_checked(tmp_path: Path) -> None:
    path = token_file(tmp_path, 'unix_user = "no-such-user-faas-test"')
    [tenant] = load_authenticator(str(path)).tenants()
    assert tenant.unix_user == "no-such-user-faas-test"
    with pytest.raises(IdentityMappingError, match="does not exist"):
        build_core(store=str(tmp_path / "store"), state_dir=tmp_path / "state", tokens=str(path))


def test_bad_unix_user_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="unix_user"):
        load_authenticator(str(token_file(tmp_path, "unix_user = 7")))


def test_tenant_workers_are_built_from_the_command_line(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    core = build_core(
        store=str(tmp_path / "store"), state_dir=tmp_path / "state", tokens=str(path),
        tenant_workers=2, worker_limits={"memory_bytes": 1 << 30, "processes": None},
    )  # fmt: skip
    try:
        tenants = core.pool._workers.tenants  # type: ignore[attr-defined]
        assert tenants.workers == 2 and tenants.memory_bytes == 1 << 30
        assert tenants.user("alice-lab") is None
    finally:
        core.shutdown()


def test_tenant_workers_need_the_local_substrate(tmp_path: Path) -> None:
    with pytest.raises(ServeConfigError, match="local substrate"):
        build_core(
            store=str(tmp_path / "store"), state_dir=tmp_path / "state", tokens=str(token_file(tmp_path)),
            substrate="globus-compute", tenant_workers=1,
        )  # fmt: skip


def whoami(kill: bool = False) -> int:
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def test_faas_serve_runs_each_tenant_in_its_own_workers(tmp_path: Path) -> None:
    with running_service(tmp_path / "svc", serve_args=["--tenant-workers", "1"]) as service:
        alice = faas.RemoteClient(service.url, token=TOKENS["alice"])
        bob = faas.RemoteClient(service.url, token=TOKENS["bob"])
        try:
            fn = faas.function(name="whoami", timeout=60)(whoami)
            a_pid, b_pid = fn.with_client(alice).remote(), fn.with_client(bob).remote()
            assert a_pid != b_pid and service.proc is not None and service.proc.pid not in (a_pid, b_pid)
            assert fn.with_client(alice).remote() == a_pid  # its one worker, again
            with pytest.raises(faas.WorkerLost):
                fn.with_client(alice).remote(True)  # alice kills her own worker
            assert fn.with_client(bob).remote() == b_pid  # bob's worker never noticed
            assert fn.with_client(alice).remote() not in (a_pid, b_pid)  # alice got a new one
        finally:
            alice.shutdown()
            bob.shutdown()


def test_a_token_file_others_may_read_is_refused_with_tenant_workers(tmp_path: Path) -> None:
    path = token_file(tmp_path)
    path.chmod(0o644)
    with pytest.raises(ServeConfigError, match="chmod 600"):
        build_core(
            store=str(tmp_path / "store"), state_dir=tmp_path / "state", tokens=str(path), tenant_workers=1
        )
    path.chmod(0o600)
    core = build_core(
        store=str(tmp_path / "store"), state_dir=tmp_path / "state", tokens=str(path), tenant_workers=1
    )
    try:
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700  # index, audit log: the service's alone
    finally:
        core.shutdown()
