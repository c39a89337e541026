"""``faas.Future``: a ``concurrent.futures.Future`` that knows its invocation id."""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from faas.clients._protocol import default_client
from runtime import (
    EngineError,
    EngineLost,
    ErrorInfo,
    FaasError,
    InvocationCancelled,
    InvocationError,
    InvocationTimeout,
    NotFoundError,
    RemoteError,
    Result,
    WorkerLost,
    is_marker,
)
from runtime import loads as serde_loads

_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")  # what an invocation id can look like (never a path)

if TYPE_CHECKING:
    from faas.clients._protocol import FaasClient

T = TypeVar("T")

Loader = Callable[[bytes], Any]

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

    A result above the staging threshold arrives as a reference; ``result()``
    downloads and verifies it (once) in the calling thread, so a large result
    never holds up the pool. If that read fails, ``result()`` raises the
    StoreError or IntegrityError (``exception()`` still reports None: the
    invocation itself succeeded).

    A future from a pipelined submit (``RemoteClient.submit``) is made before
    the service has named its invocation; reading ``invocation_id`` then waits
    for the submit's batch to be answered, and raises the service's refusal if
    it was refused.

    Attributes:
        invocation_id: The invocation's id, stable across retries.
    """

    def __init__(
        self,
        invocation_id: str | None,
        canceller: Callable[[str], bool] | None = None,
        phase: Callable[[str], str | None] | None = None,
        loader: Loader | None = None,
    ) -> None:
        super().__init__()
        self._id = invocation_id
        self._named = None if invocation_id is not None else threading.Event()
        self._canceller = canceller
        self._phase = phase
        self._loader = loader

    @property
    def invocation_id(self) -> str:
        """The invocation's id (waits for a pipelined submit to be answered).

        Raises:
            SubmitError: The service refused the submit (its own subclass, as
                ``result()`` raises it too).
            ServiceError: The submit could not be sent.
        """
        if self._id is None and self._named is not None:
            self._named.wait()
        if self._id is None:
            error = self.exception(0)
            raise error if error is not None else InvocationError("This future's invocation has no id.")
        return self._id

    def _name(self, invocation_id: str) -> None:
        """Give a pipelined submit's future the id the service chose (once)."""
        self._id = invocation_id
        if self._named is not None:
            self._named.set()

    def _refuse(self, error: BaseException) -> None:
        """Fail a pipelined submit's future: the service refused it or could not be reached."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.set_exception(error)
        if self._named is not None:
            self._named.set()

    @classmethod
    def from_id(cls, invocation_id: str, *, client: FaasClient | None = None) -> Future[Any]:
        """Re-attach to an invocation by id, from any process using the same service or store.

        Args:
            invocation_id: The id of a future from an earlier ``submit``.
            client: Any faas client (default: ``faas.get_client()``, which talks
                to ``$FAAS_URL`` when set).

        Raises:
            NotFoundError: No such invocation (for this tenant).
            UnsupportedOperationError: The client cannot follow that invocation.
        """
        if (
            not isinstance(invocation_id, str)
            or not _ID.fullmatch(invocation_id)
            or invocation_id in (".", "..")
        ):
            raise NotFoundError(f"No invocation {str(invocation_id)[:80]!r}: not an invocation id.", 404)
        return (client or default_client()).attach(invocation_id)

    def result(self, timeout: float | None = None) -> T:
        """Wait for the invocation and return its value (fetching a staged one).

        Raises:
            TimeoutError: Not done within ``timeout`` seconds.
            Exception: The invocation's error, or why a staged result could not be read.
        """
        value = super().result(timeout)
        if isinstance(value, _Staged):
            return value.get()  # type: ignore[no-any-return]
        return value

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
        name = self._id or ("(submit refused)" if self.done() else "(submitting)")
        return f"<faas.Future {name} state={self._state.lower()}>"  # type: ignore[attr-defined]

    def cancel(self) -> bool:
        """Cancel the invocation, also when it is already running.

        Returns:
            False if it had already finished, else True.
        """
        if self.done():
            return False
        if self._canceller is not None:
            try:
                invocation_id = self.invocation_id  # a pipelined submit: waits for its answer
            except FaasError:
                return False  # refused, so never started: the future holds why
            self._canceller(invocation_id)
        return super().cancel()

    def _resolve(self, result: Result) -> None:
        """Complete this future from a Result (called once, by the pool)."""
        if self.done():
            return
        try:
            if result.ok:
                data = result.value or b""
                if self._loader is not None and is_marker(data):
                    self.set_result(_Staged(data, self._loader))  # type: ignore[arg-type]
                elif self._loader is not None:
                    self.set_result(self._loader(data))
                else:
                    self.set_result(serde_loads(data, what=f"result of invocation {self.invocation_id}"))
            else:
                assert result.error is not None
                self.set_exception(rebuild_error(result.error))
        except FaasError as exc:  # the result itself could not be read back
            if not self.done():
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled concurrently


class _Staged:
    """A staged result, fetched on the first ``result()`` call (thread-safe, once)."""

    def __init__(self, data: bytes, loader: Loader) -> None:
        self._data, self._loader = data, loader
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def get(self) -> Any:
        with self._lock:
            if not self._done:
                try:
                    self._value = self._loader(self._data)
                except FaasError as exc:
                    self._error = exc
                self._done = True
        if self._error is not None:
            raise self._error
        return self._value


def rebuild_error(info: ErrorInfo) -> BaseException:
    """Turn an ErrorInfo back into an exception for the caller.

    A user exception is rebuilt as its own type when it unpickles, with the
    remote traceback attached as a note and as ``remote_traceback``; otherwise
    it becomes a :class:`RemoteError` naming the type.
    """
    exc: BaseException | None = None
    if info.exception is not None:
        try:
            loaded = serde_loads(info.exception, what="remote exception")
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
