"""The client protocol: what ``faas.Function`` and ``faas.Future`` need of a client.

Three clients implement it without inheriting from it: the embedded
:class:`faas.Client`, :class:`faas.RemoteClient` (a ``faas serve`` service) and
:class:`faas.GlobusComputeCloudClient`. The same user code runs against each;
``tests/faas/test_client_contract.py`` runs one contract suite over all of them.

This module imports no concrete client: the process-wide default client is
reached through :func:`default_client`, whose provider
(``faas.clients._default.get_client``) installs itself when ``faas`` is imported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from runtime import FaasError

if TYPE_CHECKING:
    from typing import Self

    from faas._function import Function
    from faas._future import Future
    from registry import FunctionSpec, ModelSpec
    from runtime import Model, ObjectStore, Ref

Calls = Sequence[tuple[tuple[Any, ...], dict[str, Any]]]
"""One ``(args, kwargs)`` per invocation, as ``submit_many`` takes them."""


@runtime_checkable
class FaasClient(Protocol):
    """Registers functions and runs their invocations somewhere.

    An operation a client cannot perform raises :class:`UnsupportedOperationError`.
    """

    if TYPE_CHECKING:
        # For type checkers only: on Python 3.11 ``isinstance`` against a runtime
        # protocol evaluates every member with hasattr, and the remote client's
        # ``store`` asks the service for the tenant's session.
        @property
        def store(self) -> ObjectStore:
            """Where large arguments, results and ``put`` objects live."""
            ...

    def __enter__(self) -> Self:
        """The client itself; the ``with`` block shuts it down."""
        ...

    def __exit__(self, *exc: object) -> None:
        """Shut the client down."""
        ...

    def register(self, function: Function[Any]) -> FunctionSpec:
        """Register ``function`` (once per client) and return its spec."""
        ...

    def submit(self, function: Function[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        """Validate, register and start one invocation; return its future.

        Raises:
            SubmitError: The arguments do not fit, cannot be pickled, or the
                model is unknown (nothing runs).
        """
        ...

    def submit_many(self, function: Function[Any], calls: Calls) -> list[Future[Any]]:
        """Start one invocation per ``(args, kwargs)``, all checked first; futures in input order."""
        ...

    def call(
        self,
        function: Function[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None = None,
    ) -> Any:
        """Run one invocation and return its value (what ``.remote`` does)."""
        ...

    def attach(self, invocation_id: str) -> Future[Any]:
        """A future for an earlier invocation, by id (``faas.Future.from_id``).

        Raises:
            NotFoundError: No such invocation.
        """
        ...

    def put(self, obj: Any) -> Ref:
        """Upload ``obj`` once and return a reference to pass to invocations."""
        ...

    def logs(self, invocation_id: str) -> str:
        """What the invocation wrote to stdout and stderr (empty until it has run)."""
        ...

    def status(self) -> dict[str, Any]:
        """Where the client sends work and how it is doing (always has ``counters``)."""
        ...

    def cancel(self, invocation_id: str) -> bool:
        """Cancel an invocation by id; whether it was stopped."""
        ...

    def list_functions(self) -> list[FunctionSpec]:
        """The latest version of each registered function."""
        ...

    def list_models(self) -> list[ModelSpec]:
        """The models invocations may name."""
        ...

    def model_handle(self, ref: str) -> Model:
        """A handle on an engine of model ``ref`` in this process's reach (``Function.local``)."""
        ...

    def shutdown(self) -> None:
        """Stop the client; invocations pending in it fail or keep running as the client documents."""
        ...


_provider: Callable[[], FaasClient] | None = None
_provider_lock = threading.Lock()


def provide_default_client(provider: Callable[[], FaasClient]) -> None:
    """Install what :func:`default_client` calls (done once by ``faas.clients._default``)."""
    global _provider
    with _provider_lock:
        _provider = provider


def default_client() -> FaasClient:
    """The process-wide default client (``faas.get_client()``).

    Raises:
        FaasError: No provider is installed (``faas`` itself was not imported).
    """
    with _provider_lock:
        provider = _provider
    if provider is None:
        raise FaasError(
            "No default faas client is available because the faas package was not imported; "
            "import faas, or pass a client explicitly."
        )
    return provider()
