"""How a trigger runner starts attempts: the :class:`Submitter` protocol and its embedded implementation.

A runner hands every claimed object version to a submitter, by the binding's
stored function digest (the function is never pickled again), with an
:class:`runtime._wire.OutputTarget`: the worker writes the output inside the
invocation and the attempt's future resolves to the worker's report of that
write (see :func:`runtime._outputs.write_output`), or raises the attempt's
error. :class:`ClientSubmitter` submits to an embedded pool (``faas triggers
run``); :class:`faas.service._triggers.CoreSubmitter` submits through the
service core of ``faas serve``, under its tenant's quotas.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any, Protocol

from registry import FunctionSpec, TriggerBinding
from runtime import FaasError, OutputTarget, SubmitError

if TYPE_CHECKING:
    from faas.clients._embedded import Client


class AttemptFailed(FaasError):
    """A trigger attempt's invocation failed (as the service reports it, without its pickled exception).

    Attributes:
        type_name: The exception's type name (without its module).
        remote_traceback: The traceback the worker formatted, if any.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name.rsplit(".", 1)[-1]
        self.remote_traceback = remote_traceback


class AttemptFuture(concurrent.futures.Future[Any]):
    """The future of one trigger attempt, named by its invocation's id.

    Args:
        invocation_id: The id of the attempt's invocation.
    """

    def __init__(self, invocation_id: str) -> None:
        super().__init__()
        self.invocation_id = invocation_id


class Submitter(Protocol):
    """Starts trigger attempts; implementations do not inherit from it."""

    def submit(
        self, binding: TriggerBinding, args: bytes, *, attempt: str, output: OutputTarget
    ) -> concurrent.futures.Future[Any]:
        """Start one attempt of ``binding``'s function on one object version.

        Args:
            binding: The binding; its ``function_digest`` names the function.
            args: The serialised ``((ref,), {})``.
            attempt: Names the attempt (binding, object version, attempt number)
                uniquely and stably: a durable submitter derives the invocation
                id from it, so the runner finds the same invocation again after
                a restart instead of starting another.
            output: Where the worker writes the output.

        Returns:
            A future carrying ``invocation_id``; its result is the worker's
            report of the output write.

        Raises:
            BackPressureError: No room now (also QuotaExceededError); try later.
            PoolClosedError: Shutting down.
            SubmitError: The attempt was refused (it counts as failed).
        """
        ...


class ClientSubmitter:
    """Submits trigger attempts to an embedded :class:`faas.Client`'s pool.

    The embedded pool does not outlive the runner, so every attempt is a new
    invocation under a fresh id (``attempt`` is not needed).

    Args:
        client: The embedded client.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self._specs: dict[str, FunctionSpec] = {}
        self._lock = threading.Lock()

    def submit(
        self, binding: TriggerBinding, args: bytes, *, attempt: str, output: OutputTarget
    ) -> concurrent.futures.Future[Any]:
        """Submit one attempt (see :class:`Submitter`)."""
        spec = self._spec(binding.function_digest)
        model = self.client.resolve_model(spec.model) if spec.model else None
        if model is not None and "@" not in (spec.model or ""):
            model = self.client.pool.prefer_warm(model)  # an alias moved: warm the new version first
        return self.client.submit_spec(spec, model, args, output=output)

    def _spec(self, digest: str) -> FunctionSpec:
        with self._lock:
            spec = self._specs.get(digest)
        if spec is None:
            try:
                spec = self.client.registry.get_function(digest)
            except (LookupError, ValueError) as exc:
                raise SubmitError(f"The bound function {digest[:12]}... is not registered: {exc}") from None
            with self._lock:
                self._specs[digest] = spec
        return spec
