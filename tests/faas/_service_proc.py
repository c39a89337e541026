"""A real ``faas serve`` subprocess for tests: start, kill, restart on the same state."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from runtime import _serde
from runtime._source import bundle_function
from tests.warmpool._pool_helpers import wait_for

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}


class ServiceProc:
    """``python -m faas.cli serve`` on 127.0.0.1 with a free port, its own store and state.

    Args:
        root: Directory for the store, state, token file and logs.
        limits: Per-tenant ``max_inflight``/``max_queued`` for the token file.
        extra_env: Added to the service's environment.
        substrate: ``local`` or ``globus-compute``; the latter is configured through a
            substrate file (as an operator would), on Parsl's LocalProvider at 127.0.0.1.
        store_url: The service's store (default: a directory under ``root``).
        tenants: The token file's tenants and their tokens (default ``TOKENS``).
        admins: Tenants marked ``admin = true`` (they may read every tenant's usage).
        no_internals: Tenants marked ``internals = false`` (no logprobs, hidden states or hook points).
        tenant_toml: Extra TOML lines of a tenant's entry (e.g. ``models = {...}``).
        extra_toml: Appended to the token file (e.g. another ``[[tenants]]`` entry).
        weights: Tenants' fair-share ``weight`` in the token file.
        substrate_options: The substrate file's ``[options]`` (e.g. ``{"fairness": "fcfs"}``);
            a local substrate gets a file only when this is given.
        serve_args: More ``faas serve`` options (e.g. ``["--tenant-workers", "1"]``).
    """

    def __init__(
        self,
        root: Path,
        *,
        limits: dict[str, dict[str, int]] | None = None,
        extra_env: dict[str, str] | None = None,
        substrate: str = "local",
        store_url: str | None = None,
        tenants: dict[str, str] | None = None,
        admins: frozenset[str] = frozenset(),
        no_internals: frozenset[str] = frozenset(),
        tenant_toml: dict[str, list[str]] | None = None,
        extra_toml: str = "",
        weights: dict[str, float] | None = None,
        substrate_options: dict[str, str | int | float] | None = None,
        serve_args: list[str] | None = None,
    ) -> None:
        self.root = root
        self.serve_args = serve_args or []
        self.substrate = substrate
        self.store = root / "store"
        self.store_url = store_url or str(self.store)
        self.state = root / "state"
        self.tokens = root / "tokens.toml"
        self.tokens_of = tenants or TOKENS
        lines = []
        for tenant, token in self.tokens_of.items():
            lines += ["[[tenants]]", f'name = "{tenant}"', f'tokens = ["{token}"]']
            lines += [f"{k} = {v}" for k, v in (limits or {}).get(tenant, {}).items()]
            lines += ["admin = true"] if tenant in admins else []
            lines += ["internals = false"] if tenant in no_internals else []
            lines += (tenant_toml or {}).get(tenant, [])
            lines += [f"weight = {weights[tenant]}"] if tenant in (weights or {}) else []
        self.tokens.write_text("\n".join(lines) + "\n" + extra_toml)
        self.tokens.chmod(0o600)  # as an operator keeps it (refused otherwise with per-tenant workers)
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0
        self.log = root / "service.log"
        self.substrate_args: list[str] = []
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in (substrate_options or {}).items())
        config = root / "substrate.toml"
        if substrate == "globus-compute":
            config.write_text(
                'kind = "globus-compute"\n'
                "[options]\n"
                'address = "127.0.0.1"\n'
                "workers_per_node = 8\n"
                f'run_dir = "{root / "gce-run"}"\n'
                f"{extra}"
                "[provider]\n"
                'type = "LocalProvider"\n'
            )
            self.substrate_args = ["--substrate-config", str(config)]
        elif substrate_options:
            config.write_text(f'kind = "{substrate}"\n[options]\n{extra}')
            self.substrate_args = ["--substrate-config", str(config)]

    def start(self, timeout: float = 60.0) -> ServiceProc:
        """Start the service and wait until it answers /health."""
        port_file = self.root / f"port-{self.starts}"
        env = {**os.environ, **self.extra_env}
        env.pop("FAAS_URL", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "faas.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--port-file",
                    str(port_file),
                    "--store",
                    self.store_url,
                    "--state-dir",
                    str(self.state),
                    "--tokens",
                    str(self.tokens),
                    "--access-log",
                    *self.substrate_args,
                    *self.serve_args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, (
                f"faas serve exited with {proc.returncode}: {self.log.read_text()[-2000:]}"
            )
            return port_file.exists()

        wait_for(up, timeout, "faas serve to listen")
        self.url = f"http://127.0.0.1:{port_file.read_text().strip()}"
        wait_for(lambda: httpx.get(self.url + "/health", timeout=5).status_code == 200, timeout, "/health")
        return self

    def kill(self) -> None:
        """SIGKILL the service (its workers exit when their pipe closes)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop within 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def client(self, tenant: str | None = "alice") -> httpx.Client:
        """An HTTP client carrying ``tenant``'s token (None: no token)."""
        headers = {"Authorization": f"Bearer {self.tokens_of[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def b64(data: bytes) -> str:
    """Standard base64 text, as JSON bodies carry bytes."""
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    """Decode base64 in either alphabet (pydantic writes the URL-safe one)."""
    return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_"))


def register(http: httpx.Client, fn: Callable[..., Any], name: str, **options: Any) -> dict[str, Any]:
    """Register ``fn`` over HTTP (as the remote client does) and return its spec."""
    artifact = _serde.dumps(bundle_function(fn), what=name)
    response = http.post("/v1/functions", json={"name": name, "artifact": b64(artifact), **options})
    assert response.status_code == 200, response.text
    return dict(response.json())


def args(*a: Any, **kw: Any) -> str:
    """Serialised ``(args, kwargs)`` as base64."""
    return b64(_serde.dumps((a, kw), what="arguments"))


def value(view: dict[str, Any]) -> Any:
    """The value of a succeeded ResultView."""
    assert view["status"] == "succeeded", view
    return _serde.loads(unb64(view["value"]), what="result")


def wait_hot(http: httpx.Client, model: str, timeout: float) -> None:
    """Poll ``/v1/models`` until ``model`` is hot (its engine answers)."""

    def hot() -> bool:
        return any(m["id"] == model and m["state"] == "hot" for m in http.get("/v1/models").json()["data"])

    wait_for(hot, timeout, f"{model}'s engine to start")
