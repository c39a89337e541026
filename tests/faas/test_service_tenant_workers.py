"""``faas serve``'s per-tenant workers: the token file's ``unix_user`` and the command line's limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from faas.service._auth import load_authenticator
from faas.service._serve import build_core
from runtime import AuthConfigError, IdentityMappingError, ServeConfigError


def token_file(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(f'[[tenants]]\nname = "alice-lab"\ntokens = ["alice-token-0123456789"]\n{extra}\n')
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
