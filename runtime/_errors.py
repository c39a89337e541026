"""The exception hierarchy shared by every package.

They live in ``runtime`` because it is the lowest package; ``faas`` re-exports them.

```
FaasError
├── SubmitError                 bad input, raised before any work is done
│   ├── UnknownModelError       the model name or version is not registered
│   ├── SerializationError      an argument or function cannot be pickled
│   ├── FunctionDefinitionError the decorated object is not a usable function
│   └── QuotaExceededError      the tenant's in-flight or queue quota is full
├── InvocationError             an invocation ran (or tried to) and failed
│   ├── RemoteError             the user's function raised; carries its traceback
│   ├── InvocationTimeout       the invocation ran past its timeout
│   ├── WorkerLost              the worker process running it died
│   │   └── WorkerStartError    worker processes die while starting; carries their stderr
│   ├── EngineLost              the model engine died and retries ran out
│   └── InvocationCancelled     the caller cancelled it
├── ModeNotAllowedError         the model's access policy forbids that mode (no request sent)
├── EngineError                 the engine refused a request or failed to start
├── PoolClosedError             the pool is shut down
├── IntegrityError              bytes do not match their recorded digest
├── ServiceError                the pool service answered with an error
│   ├── AuthError               missing or wrong bearer token (HTTP 401)
│   └── NotFoundError           no such function or invocation for this tenant (HTTP 404)
└── StoreError                  the object store failed
    ├── ObjectNotFound          no object under that key
    ├── ObjectExists            a commit-once write found the key taken
    └── StoreAuthError          the store rejected the credentials (never retried)
```
"""

from __future__ import annotations


class FaasError(Exception):
    """Base class of every error raised by tpm-faas."""


class SubmitError(FaasError, ValueError):
    """Bad input detected at submit time; nothing was run."""


class UnknownModelError(SubmitError, LookupError):
    """The named model (or model version) is not registered."""


class SerializationError(SubmitError):
    """A value or function could not be serialised or deserialised."""


class FunctionDefinitionError(SubmitError, TypeError):
    """The decorated object cannot be used as a faas function."""


class QuotaExceededError(SubmitError):
    """The tenant has as many invocations in flight or queued as its quota allows."""


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


class ModeNotAllowedError(FaasError, PermissionError):
    """The model's access policy does not allow this mode; nothing reached the engine."""


class EngineError(FaasError):
    """An engine refused a request, answered badly, or failed to start."""


class PoolClosedError(FaasError, RuntimeError):
    """The pool has been shut down and accepts no more work."""


class IntegrityError(FaasError):
    """Stored bytes do not match the digest recorded for them."""


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


class NotFoundError(ServiceError, LookupError):
    """The service has no such function or invocation for this tenant."""
