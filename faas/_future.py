"""``faas.Future``: a ``concurrent.futures.Future`` that knows its invocation id."""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import Generic, TypeVar

from runtime import _serde
from runtime._errors import (
    EngineError,
    EngineLost,
    FaasError,
    InvocationCancelled,
    InvocationError,
    InvocationTimeout,
    RemoteError,
    WorkerLost,
)
from runtime._wire import ErrorInfo, Result

T = TypeVar("T")

_KIND_ERRORS: dict[str, type[InvocationError]] = {
    "timeout": InvocationTimeout,
    "worker_lost": WorkerLost,
    "engine_lost": EngineLost,
    "cancelled": InvocationCancelled,
}


class Future(concurrent.futures.Future[T], Generic[T]):
    """The eventual result of one invocation.

    It is a ``concurrent.futures.Future``: ``result(timeout)``, ``exception()``,
    ``add_done_callback()``, ``concurrent.futures.wait/as_completed`` and
    ``asyncio.wrap_future`` all work.

    Attributes:
        invocation_id: The invocation's id, stable across retries.
    """

    def __init__(
        self,
        invocation_id: str,
        canceller: Callable[[str], bool] | None = None,
        phase: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.invocation_id = invocation_id
        self._canceller = canceller
        self._phase = phase

    def status(self) -> str:
        """Where the invocation is now.

        Returns:
            ``"waiting_for_engine"`` (its model's engine is cold-starting),
            ``"queued"``, ``"running"``, ``"cancelled"`` or ``"finished"``.
        """
        if self.cancelled():
            return "cancelled"
        if self.done():
            return "finished"
        phase = self._phase(self.invocation_id) if self._phase is not None else None
        return phase or "queued"

    def __repr__(self) -> str:
        return f"<faas.Future {self.invocation_id} state={self._state.lower()}>"  # type: ignore[attr-defined]

    def cancel(self) -> bool:
        """Cancel the invocation, also when it is already running.

        Returns:
            False if it had already finished, else True.
        """
        if self.done():
            return False
        if self._canceller is not None:
            self._canceller(self.invocation_id)
        return super().cancel()

    def _resolve(self, result: Result) -> None:
        """Complete this future from a Result (called once, by the pool)."""
        if self.done():
            return
        try:
            if result.ok:
                value = _serde.loads(result.value or b"", what=f"result of invocation {self.invocation_id}")
                self.set_result(value)
            else:
                assert result.error is not None
                self.set_exception(rebuild_error(result.error))
        except FaasError as exc:  # the result itself could not be read back
            if not self.done():
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled concurrently


def rebuild_error(info: ErrorInfo) -> BaseException:
    """Turn an ErrorInfo back into an exception for the caller.

    A user exception is rebuilt as its own type when it unpickles, with the
    remote traceback attached as a note and as ``remote_traceback``; otherwise
    it becomes a :class:`RemoteError` naming the type.
    """
    exc: BaseException | None = None
    if info.exception is not None:
        try:
            loaded = _serde.loads(info.exception, what="remote exception")
            if isinstance(loaded, BaseException):
                exc = loaded
        except FaasError:
            exc = None
    if info.kind == "user":
        if exc is None:
            return RemoteError(info.type_name, info.message, info.traceback)
        if info.traceback:
            exc.add_note(f"Remote traceback:\n{info.traceback}")
            with contextlib.suppress(AttributeError):
                exc.remote_traceback = info.traceback  # type: ignore[attr-defined]
        return exc
    if exc is not None and isinstance(exc, (FaasError, TimeoutError)):
        return exc
    cls = _KIND_ERRORS.get(info.kind, EngineError if "Engine" in info.type_name else InvocationError)
    return cls(info.message)
