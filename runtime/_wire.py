"""Wire models: what travels between caller, pool and worker.

Values (arguments, results, exceptions) travel as bytes written by
:mod:`runtime._serde`; the models themselves are plain pydantic, so they can be
stored as JSON records or pickled across a process pipe.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ErrorKind = Literal["user", "timeout", "worker_lost", "engine_lost", "cancelled", "system"]


class Invocation(BaseModel):
    """One call of a registered function.

    Attributes:
        id: Unique invocation id (hex).
        function_name: Registered function name.
        function_digest: sha256 of the function artifact; the worker verifies it.
        model: Resolved model name the function asks for, or None.
        args: Serialised ``(args, kwargs)`` tuple.
        timeout: Seconds the invocation may run, or None for no limit.
        retries: How many times a lost invocation may be retried.
        attempt: 0 for the first run, then 1, 2, ... for retries.
        submitted_at: Wall-clock submit time (seconds since the epoch).
    """

    model_config = ConfigDict(frozen=True)

    id: str
    function_name: str
    function_digest: str
    model: str | None = None
    args: bytes
    timeout: float | None = None
    retries: int = 0
    attempt: int = 0
    submitted_at: float = Field(default_factory=time.time)


class ErrorInfo(BaseModel):
    """Why an invocation failed.

    Attributes:
        kind: Which part failed: the user's code, the clock, a worker, an engine.
        type_name: Qualified name of the exception type.
        message: ``str()`` of the exception.
        traceback: Formatted remote traceback (empty when not from user code).
        exception: The exception serialised, when it could be; the caller rebuilds it.
    """

    kind: ErrorKind
    type_name: str
    message: str
    traceback: str = ""
    exception: bytes | None = None


class Result(BaseModel):
    """The outcome of one invocation.

    Attributes:
        invocation_id: The invocation this answers.
        value: Serialised return value when it succeeded.
        error: Why it failed, when it did.
        worker_pid: Process that ran it (0 when it never ran).
        worker_host: Host name of that process.
        started_at: Wall-clock start of execution.
        finished_at: Wall-clock end of execution.
        attempt: Which attempt produced this result.
    """

    invocation_id: str
    value: bytes | None = None
    error: ErrorInfo | None = None
    worker_pid: int = 0
    worker_host: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    attempt: int = 0

    @property
    def ok(self) -> bool:
        """Whether the invocation succeeded."""
        return self.error is None
