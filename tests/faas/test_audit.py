"""The audit log's hash chain, ``faas audit``, and token expiry and reloads (no service needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import faas
from faas.service._audit import AuditLog, read, verify
from faas.service._auth import ReloadingTokenAuth, TokenAuth, token_digest

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"


def written(tmp_path: Path, n: int = 5) -> Path:
    log = AuditLog(tmp_path / "audit.jsonl", clock=iter(range(1000, 2000)).__next__)
    for i in range(n):
        log.append("internals.use", "alice", invocation=f"inv{i}", modes=["internals_read"])
    return log.path


def run_audit(state: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "faas.cli", "audit", "--state-dir", str(state), "--tail", "3"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_the_chain_verifies_and_continues_across_reopening(tmp_path: Path) -> None:
    path = written(tmp_path, 3)
    AuditLog(path).append("tokens.revoked", "operator", token="sha256:0123456789ab")
    report = verify(path)
    assert report.ok and report.entries == 4
    assert [e["seq"] for e in read(path)] == [1, 2, 3, 4]
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("edit", ["detail", "delete", "swap", "rehash-one"])
def test_a_hand_edited_entry_is_detected(tmp_path: Path, edit: str) -> None:
    path = written(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    if edit == "detail":
        entry["detail"]["invocation"] = "someone-else"
        lines[2] = json.dumps(entry)
    elif edit == "delete":
        del lines[2]
    elif edit == "swap":
        lines[2], lines[3] = lines[3], lines[2]
    else:  # an editor who recomputes the edited line's own hash still breaks the next link
        from faas.service._audit import _hash

        entry["actor"] = "mallory"
        entry["hash"] = _hash(entry)
        lines[2] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    report = verify(path)
    assert not report.ok and report.bad_line == (4 if edit == "rehash-one" else 3), report
    assert report.entries == report.bad_line - 1
    done = run_audit(tmp_path)
    assert done.returncode == 1 and "NOT VERIFIED" in done.stderr


def test_faas_audit_prints_and_verifies(tmp_path: Path) -> None:
    written(tmp_path)
    done = run_audit(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "5 entries, hash chain verified" in done.stderr
    assert len(done.stdout.splitlines()) == 3 and "internals.use" in done.stdout


def test_tokens_expire_and_a_reload_revokes_and_reports(tmp_path: Path) -> None:
    now = [1_000_000.0]
    path = tmp_path / "tokens.toml"
    path.write_text(
        '[[tenants]]\nname = "alice"\n'
        f'tokens = [{{token = "{ALICE}", expires = 1970-01-12T13:46:50Z}}]\n'  # 1,000,010
        '[[tenants]]\nname = "bob"\n'
        f'tokens = ["{token_digest(BOB)}"]\n'
    )
    auth = ReloadingTokenAuth(path, check_every=0.0, clock=lambda: now[0])
    changes: list[tuple[str, dict[str, object]]] = []
    auth.listen(lambda action, detail: changes.append((action, detail)))
    tenant = auth.authenticate(ALICE)
    assert tenant is not None and tenant.name == "alice"
    now[0] = 1_000_010.0
    assert auth.authenticate(ALICE) is None  # expired
    assert auth.authenticate(BOB) is not None
    path.write_text(f'revoked = ["{token_digest(BOB)}"]\n' + path.read_text())
    assert auth.authenticate(BOB) is None
    assert changes == [("tokens.revoked", {"token": token_digest(BOB)[:19]})]
    path.write_text("this is not toml [")
    assert auth.authenticate(ALICE) is None and auth.refresh(force=True) is False  # old table kept
    assert [t.name for t in auth.tenants()] == ["alice", "bob"]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (f'[{{token = "{ALICE}", expires = 2027-01-01T00:00:00}}]', "without a zone"),
        (f'[{{token = "{ALICE}", expires = "soon"}}]', "bad 'expires'"),
        ("[{expires = 1}]", "neither a string"),
        (f'["{ALICE}"]\nrevoked = []', "unknown keys"),
    ],
)
def test_bad_token_entries_are_config_errors(tmp_path: Path, tokens: str, message: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f'[[tenants]]\nname = "alice"\ntokens = {tokens}\n')
    with pytest.raises(faas.AuthConfigError, match=message):
        TokenAuth.from_file(path)
    path.write_text(f'revoked = ["nope"]\n[[tenants]]\nname = "alice"\ntokens = ["{ALICE}"]\n')
    with pytest.raises(faas.AuthConfigError, match=r"64 hex digits|not hex"):
        TokenAuth.from_file(path)


def test_an_alias_move_the_service_resolves_is_audited(tmp_path: Path) -> None:
    from faas.service._audit import AuditedModels
    from registry import ModelSpec, Registry
    from runtime import LocalStore

    store = LocalStore(tmp_path / "store")
    operator = Registry(store)
    operator.register_model(ModelSpec(name="sci", version="1"))
    operator.register_model(ModelSpec(name="sci", version="2"), alias=None)
    log = AuditLog(tmp_path / "audit.jsonl")
    models = AuditedModels(store, log)
    assert models.get_model("sci").version == "1"
    assert models.get_model("sci@2").version == "2"  # pinned: never a move
    operator.set_model_alias("sci", "latest", "2")
    assert models.get_model("sci").version == "2"
    [moved] = [e for e in read(log.path) if e["action"] == "model.alias"]
    assert moved["detail"] == {"model": "sci", "alias": "latest", "old": "1", "new": "2"}
    assert verify(log.path).ok


def test_a_changed_grant_is_an_audited_tenant_change(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    entry = f'[[tenants]]\nname = "alice"\ntokens = ["{ALICE}"]\n'
    path.write_text(entry + 'models = {"tiny-llama" = ["generate"]}\n')
    auth = ReloadingTokenAuth(path, check_every=0.0)
    changes: list[tuple[str, dict[str, object]]] = []
    auth.listen(lambda action, detail: changes.append((action, detail)))
    path.write_text(entry + 'models = {"tiny-llama" = ["generate", "logprobs"]}\n')
    assert auth.refresh(force=True)
    [(action, detail)] = changes
    assert action == "tenants.changed" and detail["models"] == {"tiny-llama": ["generate", "logprobs"]}
