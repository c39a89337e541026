"""``faas serve``: run the pool as a long-lived HTTP service."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path
from typing import Any

from faas.service._auth import Authenticator, load_authenticator
from faas.service._core import ServiceCore
from faas.service._malloc import tune_malloc
from faas.service._triggers import TriggerHost
from runtime import ServeConfigError, SubstrateConfigError, cache_dir, default_store_url, store_from_url
from warmpool import SubstrateConfig, SubstrateKind, TenantWorkers, load_substrate_config

log = logging.getLogger("faas.service")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_core(
    *,
    store: str | None = None,
    state_dir: Path | None = None,
    tokens: str | None = None,
    auth: Authenticator | None = None,
    host: str = "127.0.0.1",
    substrate: SubstrateKind | None = None,
    substrate_config: Path | None = None,
    triggers: bool = True,
    tenant_workers: int = 0,
    worker_limits: dict[str, Any] | None = None,
    **pool_options: Any,
) -> ServiceCore:
    """Build (not start) the service core from ``faas serve``'s options.

    Args:
        store: Store URL (default: ``$FAAS_STORE`` or the cache).
        state_dir: Where the invocation index lives.
        tokens: Token file (else ``$FAAS_TOKENS``).
        auth: An authenticator (instead of ``tokens``).
        host: The address the service binds (open access only on loopback).
        substrate: ``local`` or ``globus-compute`` (overrides the config file's kind).
        substrate_config: A TOML/JSON substrate file (options and, for Globus
            Compute, the Parsl provider; see :func:`warmpool.load_substrate_config`).
        triggers: Run the tenants' trigger bindings (see
            :class:`faas.service._triggers.TriggerHost`).
        tenant_workers: Worker processes per active tenant (0: tenants share the
            workers, unless the token file maps a tenant to a ``unix_user``; then 1).
        worker_limits: Limits of each tenant worker (``memory_bytes``, ``cpu_seconds``,
            ``open_files``, ``processes``; see :class:`warmpool.TenantWorkers`).
        pool_options: Substrate options given on the command line.

    Raises:
        ServeConfigError: Open access (no tokens) on an address other than loopback.
        AuthConfigError: The tokens are malformed.
        SubstrateConfigError: The substrate file is unreadable or invalid.
    """
    auth = auth or load_authenticator(tokens)
    if not auth.requires_token and not _loopback(host):
        raise ServeConfigError(
            f"Refusing to serve on {host} without tokens: anyone who can reach it could run code. "
            "Give --tokens FILE (or $FAAS_TOKENS), or bind 127.0.0.1."
        )
    store_obj = store_from_url(store or default_store_url())
    state = state_dir or Path(os.environ.get("FAAS_STATE_DIR") or cache_dir() / "service")
    if substrate_config is not None:
        config = load_substrate_config(substrate_config, kind=substrate)
    elif substrate in (None, "local", "globus-compute"):
        config = SubstrateConfig(kind=substrate or "local")
    else:
        raise SubstrateConfigError(f"Unknown substrate {substrate!r}; expected 'local' or 'globus-compute'.")
    if config.kind == "local":  # engines' answer journals outlive a SIGKILLed service (_journal)
        pool_options.setdefault("answer_dir", Path(state) / "engine-answers")
    isolation = _tenant_workers(auth, config, tenant_workers, worker_limits or {})
    if isolation is not None:
        pool_options["tenant_workers"] = isolation
        _private(tokens, Path(state))
    host_obj = TriggerHost() if triggers else None
    # The token budgets' "minute" window; only tests shorten it.
    minute = os.environ.get("FAAS_BUDGET_MINUTE_SECONDS", "").strip()
    try:
        minute_seconds = float(minute) if minute else 60.0
    except ValueError:
        raise ServeConfigError(
            f"FAAS_BUDGET_MINUTE_SECONDS is not a number of seconds: {minute!r}."
        ) from None
    if not minute_seconds > 0:
        raise ServeConfigError(f"FAAS_BUDGET_MINUTE_SECONDS must be positive, not {minute!r}.")
    return ServiceCore(
        store_obj,
        auth,
        state_dir=state,
        substrate=config,
        triggers=host_obj,
        budget_minute_seconds=minute_seconds,
        **pool_options,
    )


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8470,
    log_level: str = "info",
    access_log: bool = False,
    port_file: Path | None = None,
    **options: Any,
) -> None:
    """Run the service until SIGINT or SIGTERM.

    Unfinished invocations stay in the index when it stops and run again when
    it starts next, under the same ids.

    Args:
        host: Address to bind (default loopback).
        port: Port (0 picks a free one; see ``port_file``).
        log_level: uvicorn's log level.
        access_log: Log each request line (method, path, status; never headers).
        port_file: Write the bound port here once listening (for scripts and tests).
        options: See :func:`build_core`.
    """
    import uvicorn

    from faas.service._app import create_app, front

    tune_malloc()  # before build_core starts the service's threads
    core = build_core(host=host, **options)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it every response waits ~40 ms on Nagle and delayed ACKs.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        front(create_app(core)), log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    if port_file is not None:
        original = server.startup

        async def startup(sockets: list[socket.socket] | None = None) -> None:
            await original(sockets)
            tmp = port_file.with_suffix(".tmp")
            tmp.write_text(str(bound))
            tmp.replace(port_file)  # readers never see a half-written file

        server.startup = startup  # type: ignore[method-assign]
    log.info(
        "faas serve on http://%s:%d (store %s, substrate %s)",
        host, bound, core.store.url(), core.pool.status().get("substrate", "local"),
    )  # fmt: skip
    server.run(sockets=[sock])


def _private(tokens: str | None, state: Path) -> None:
    """Keep the token file and the state directory from the tenants' Unix users.

    The state directory (index, audit log, OpenAI batches) is made 0700. A token file
    that others may read is refused: a function running as a mapped user would read it.

    Raises:
        ServeConfigError: The token file is readable or writable by group or others.
    """
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    if tokens and os.stat(tokens).st_mode & 0o077:
        raise ServeConfigError(
            f"The token file {tokens} is open to other users (mode {os.stat(tokens).st_mode & 0o777:o}); "
            "with per-tenant workers, tenants' code must not read it: chmod 600 it."
        )


def _tenant_workers(
    auth: Authenticator, config: SubstrateConfig, count: int, limits: dict[str, Any]
) -> TenantWorkers | None:
    """Per-tenant workers as the command line and the token file ask (None: shared workers).

    Raises:
        ServeConfigError: Per-tenant workers on a substrate other than the local pool.
        IdentityMappingError: A mapped Unix user does not exist, or the service is not root.
    """
    mapped = any(t.unix_user or t.store_credentials for t in auth.tenants())
    if not (count or mapped or any(v is not None for k, v in limits.items() if k != "python")):
        return None
    if config.kind != "local":
        raise ServeConfigError(
            "Per-tenant workers, worker limits, unix_user and store_credentials run on the local "
            "substrate only; "
            f"this service runs on {config.kind!r}."
        )

    def user_of(tenant: str) -> str | None:  # read when a tenant's workers start: token file changes apply
        return next((t.unix_user for t in auth.tenants() if t.name == tenant), None)

    def env_for(tenant: str) -> dict[str, str]:  # the tenant's own store credentials, never the service's
        found = next((t for t in auth.tenants() if t.name == tenant), None)
        return found.store_env() if found is not None else {}

    isolation = TenantWorkers(workers=max(1, count), user_of=user_of, env_for=env_for, **limits)
    isolation.check([t.name for t in auth.tenants()])
    for tenant in auth.tenants():
        tenant.store_env()  # a credential variable that is not set fails here, not at first use
    return isolation
