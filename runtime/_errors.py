"""The exception hierarchy shared by every package.

They live in ``runtime`` because it is the lowest package; ``faas`` re-exports them.

```
FaasError
├── SubmitError                 bad input, raised before any work is done
│   ├── UnknownModelError       the model name or version is not registered
│   ├── UnknownAdapterError     the LoRA adapter name, alias or version is not registered
│   ├── UnknownFunctionError    no function under that name, version or digest
│   ├── SerializationError      an argument or function cannot be pickled
│   ├── FunctionDefinitionError the decorated object is not a usable function
│   ├── QuotaExceededError      the tenant's in-flight or queue quota is full
│   │   └── BudgetExceededError the tenant used its token budget for a window; carries retry_after
│   ├── BackPressureError       the model's queue is full (retry later)
│   ├── BindingError            a trigger binding is malformed
│   ├── UnknownBindingError     no trigger binding under that name
│   └── PayloadTooLargeError    a request or inline value is over a size limit (HTTP 413): stage it
├── InvocationError             an invocation ran (or tried to) and failed
│   ├── RemoteError             the user's function raised; carries its traceback
│   ├── InvocationTimeout       the invocation ran past its timeout
│   ├── WorkerLost              the worker process running it died
│   │   └── WorkerStartError    worker processes die while starting; carries their stderr
│   ├── EngineLost              the model engine died and retries ran out
│   ├── InvocationCancelled     the caller cancelled it
│   └── ResourceLimitError      a worker limit ended it (memory, CPU, files, processes); carries limit
├── ModeNotAllowedError         the model's access policy forbids that mode (no request sent)
│   └── MissingScopeError       the tenant's token lacks the scope the mode needs (``internals``)
├── EngineError                 the engine refused a request or failed to start
│   └── UnsupportedFeatureError the engine lacks a feature the request used (e.g. the CPU engine)
├── UnsupportedOperationError   this client cannot do that operation (e.g. .local() remotely)
├── PoolClosedError             the pool is shut down
├── IntegrityError              bytes do not match their recorded digest
├── WeightsError                model weights cannot be staged (no manifest, cache too small)
├── ServiceError                the pool service answered with an error
│   ├── AuthError               missing or wrong bearer token (HTTP 401)
│   │   └── ForbiddenError      a valid token that may not do what it asked (HTTP 403)
│   └── NotFoundError           no such function or invocation for this tenant (HTTP 404)
├── StoreError                  the object store failed
│   ├── ObjectNotFound          no object under that key
│   ├── ObjectExists            a commit-once write found the key taken
│   └── StoreAuthError          the store rejected the credentials (never retried)
└── ConfigError                 a configuration cannot work; raised before anything starts
    ├── AuthConfigError         the service's token file is malformed
    ├── ServeConfigError        ``faas serve`` was asked for something unsafe or impossible
    ├── SubstrateConfigError    a substrate file is unreadable or names what does not exist
    ├── EndpointRenderError     a model cannot be rendered as a Globus Compute endpoint config
    ├── PlacementError          the scheduler's environment does not describe a multi-node block
    ├── GlobusComputeConfigError the Globus Compute cloud backend is not configured
    ├── StoreConfigError        a store URL or config names no usable store (scheme, bucket, option)
    └── IdentityMappingError    a tenant's mapped Unix user does not exist, or the pool cannot switch users
```

Every class lives here, whatever package raises it, so that this one tree is the
whole story; ``faas`` re-exports them all. Errors cross processes pickled (in a
Result's ``ErrorInfo``), so their module path is wire format: the modules that
used to define some of them import them from here, which keeps old pickles loading.
"""

from __future__ import annotations

from typing import Any


class FaasError(Exception):
    """Base class of every error raised by tpm-faas."""


class SubmitError(FaasError, ValueError):
    """Bad input detected at submit time; nothing was run."""


class UnknownFunctionError(SubmitError, LookupError):
    """No function is registered under that name, version or digest."""


class BackPressureError(SubmitError):
    """The model's queue is full; the invocation was not accepted (retry later)."""


class BindingError(SubmitError):
    """A trigger binding is malformed; it was not stored and nothing runs."""


class UnknownBindingError(SubmitError, LookupError):
    """No trigger binding is stored under that name."""


class UnknownModelError(SubmitError, LookupError):
    """The named model (or model version) is not registered."""


class UnknownAdapterError(SubmitError, LookupError):
    """The named LoRA adapter (alias or version) is not registered for the model."""


class SerializationError(SubmitError):
    """A value or function could not be serialised or deserialised."""


class FunctionDefinitionError(SubmitError, TypeError):
    """The decorated object cannot be used as a faas function."""


class PayloadTooLargeError(SubmitError):
    """A request body or an inline value is over the service's size limit (HTTP 413); stage large values."""


class InvalidParameterError(SubmitError):
    """One field of a request is missing or malformed; nothing was accepted.

    Attributes:
        param: The field's name (dotted for nested fields), or None for the whole body.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross processes pickled
        return (type(self), (str(self), self.param))


class QuotaExceededError(SubmitError):
    """The tenant has as many invocations in flight or queued as its quota allows."""


class BudgetExceededError(QuotaExceededError):
    """The tenant has used its token budget for a window; nothing was accepted.

    Attributes:
        retry_after: Seconds until the window has room again (the HTTP ``Retry-After``).
    """

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross processes pickled
        return (type(self), (str(self), self.retry_after))


class InvocationError(FaasError):
    """An invocation failed after it was accepted."""


class RemoteError(InvocationError):
    """The user's function raised an exception that could not be rebuilt locally.

    Attributes:
        type_name: Qualified name of the remote exception type.
        remote_traceback: The formatted traceback from the worker.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}\n\nRemote traceback:\n{remote_traceback}")
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[Any, ...]:  # pickled in results: rebuild with all three arguments
        return (type(self), (self.type_name, self.remote_message, self.remote_traceback))


class InvocationTimeout(InvocationError, TimeoutError):
    """The invocation ran longer than its timeout."""


class WorkerLost(InvocationError):
    """The worker process running the invocation died."""


class WorkerStartError(WorkerLost):
    """Worker processes exit before they are ready, so no invocation can run.

    The pool stops starting workers (no restart loop) and fails pending and new
    invocations with this error; its message names the cause (the worker's exit
    code and the end of its stderr). Fix the environment and start a new pool.
    """


class EngineLost(InvocationError):
    """The model engine serving the invocation died and no retry was left."""


class InvocationCancelled(InvocationError):
    """The invocation was cancelled."""


class ResourceLimitError(InvocationError):
    """The function hit a resource limit of its worker process, and its invocation was ended.

    A pool that isolates tenants (``Pool(tenant_workers=...)``, ``faas serve
    --tenant-workers``) runs each tenant's functions in worker processes with
    limits: memory (address space), CPU seconds per invocation, open files and
    processes. A function that goes past one gets this error instead of taking
    the machine; its worker is replaced, other tenants' invocations are not
    touched, and it is never retried (it would only hit the limit again).

    Attributes:
        limit: Which limit: ``memory``, ``cpu``, ``open_files`` or ``processes``.
    """

    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross processes pickled
        return (type(self), (str(self), self.limit))


class ModeNotAllowedError(FaasError, PermissionError):
    """The model's access policy does not allow this mode; nothing reached the engine."""


class MissingScopeError(ModeNotAllowedError):
    """The tenant's token lacks the scope this mode needs (``internals``); nothing reached the engine."""


class EngineError(FaasError):
    """An engine refused a request, answered badly, or failed to start."""


class EngineRejectedError(EngineError):
    """The engine refused a request as malformed (HTTP 4xx); retrying it unchanged cannot help."""


class UnsupportedFeatureError(EngineRejectedError, NotImplementedError):
    """The engine does not implement a feature the request asked for; nothing was generated.

    The CPU engine raises it for SGLang features it lacks (constrained decoding, penalties,
    input logprobs, ...); SGLang implements them.
    """


class UnsupportedOperationError(FaasError, NotImplementedError):
    """A client cannot do what was asked of it (nothing was sent or run).

    Attributes:
        client: The client's class name, e.g. ``"RemoteClient"``.
        operation: The operation, e.g. ``"model_handle"``.
        reason: Why, and what to do instead.
    """

    def __init__(self, client: str, operation: str, reason: str) -> None:
        super().__init__(f"{client} does not support {operation}: {reason}")
        self.client = client
        self.operation = operation
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross processes pickled
        return (type(self), (self.client, self.operation, self.reason))


class ModelNotReadyError(FaasError):
    """The model has no ready engine yet; one is starting, and nothing was accepted.

    Attributes:
        retry_after: Seconds until it should be ready (the HTTP ``Retry-After``).
    """

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:  # errors cross processes pickled
        return (type(self), (str(self), self.retry_after))


class PoolClosedError(FaasError, RuntimeError):
    """The pool has been shut down and accepts no more work."""


class IntegrityError(FaasError):
    """Stored bytes do not match the digest recorded for them."""


class WeightsError(FaasError):
    """A model's weights cannot be staged: no manifest at their URI, or the node's cache cannot hold them."""


class StoreError(FaasError):
    """The object store failed to complete an operation."""


class ObjectNotFound(StoreError, KeyError):
    """No object exists under the requested key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "object not found"


class ObjectExists(StoreError):
    """A commit-once write found an object already under the key."""


class StoreAuthError(StoreError):
    """The object store rejected the credentials or denied access.

    Raised at once, without retries: bad keys do not get better by asking again.
    """


class ServiceError(FaasError):
    """The pool service answered with an error.

    Attributes:
        status_code: The HTTP status (0 when the service could not be reached).
    """

    def __init__(self, message: str, status_code: int = 0) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthError(ServiceError, PermissionError):
    """The service rejected the request's bearer token (or there was none)."""


class ForbiddenError(AuthError):
    """The token is valid, but its tenant may not do what it asked (HTTP 403).

    For example, reading another tenant's usage without an admin token.
    """


class NotFoundError(ServiceError, LookupError):
    """The service has no such function or invocation for this tenant."""


class ConfigError(FaasError, ValueError):
    """A configuration cannot work; nothing was started."""


class AuthConfigError(ConfigError):
    """The token file or ``$FAAS_TOKENS`` is malformed."""


class ServeConfigError(ConfigError):
    """``faas serve`` was asked for something unsafe or impossible."""


class SubstrateConfigError(ConfigError):
    """A substrate configuration file is missing, malformed or names something that does not exist."""


class EndpointRenderError(ConfigError):
    """A model spec and the options cannot be turned into an endpoint config."""


class PlacementError(ConfigError):
    """The scheduler environment does not describe a consistent multi-node block."""


class GlobusComputeConfigError(ConfigError):
    """The Globus Compute cloud backend is not configured so that it can work; nothing was sent."""


class StoreConfigError(ConfigError):
    """A store URL or ``{kind, options}`` config names no usable store (scheme, bucket, option)."""


class IdentityMappingError(ConfigError):
    """A tenant is mapped to a Unix user its workers cannot run as.

    The user does not exist, or the pool does not run as root (only root can
    start processes as another user). Raised before anything runs for that tenant.
    """
