"""Completion delivery for :class:`faas.RemoteClient`: server-sent event streams over groups of ids.

Submitting hands each pending invocation id (with its future) to a
:class:`Watcher`. A dispatcher thread coalesces ids that arrive close together
(``coalesce`` seconds of quiet, at most ``max_coalesce`` seconds of waiting,
at most ``max_group`` ids) into one group and opens one ``POST /v1/watch``
stream for it, on a thread of its own. Each ``result`` event resolves one
future; ``end`` closes the stream once every id in it has been sent.

Never more than ``max_streams`` streams are open: at the cap, the stream with
the fewest ids left is interrupted and its ids are merged into the new group,
so a long series of single submits costs a bounded number of connections.

A stream that breaks (the service restarts, the connection drops) is reopened
for the ids still pending, with exponential backoff, until
``reconnect_deadline`` seconds pass without a successful connection; then
those futures fail with :class:`ServiceError`. No future is ever dropped.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from httpx_sse import connect_sse
from pydantic import ValidationError

from faas._future import Future
from faas.service._api import FINAL_STATES, InvocationView, ResultView
from runtime import AuthError, FaasError, NotFoundError, PoolClosedError, ServiceError

log = logging.getLogger("faas.remote")

Resolve = Callable[[Future[Any], ResultView], None]
"""Completes a future from a final ResultView."""

ErrorFor = Callable[[httpx.Response], FaasError]
"""Builds the typed error for an error response (the body has been read)."""

Check = Callable[[str], InvocationView]
"""Looks one invocation up (``GET /v1/invocations/{id}``); raises NotFoundError if unknown."""

_FATAL_STATUS = frozenset({400, 401, 403, 404, 413, 422})


class Watcher:
    """Resolves futures of remote invocations from ``/v1/watch`` event streams.

    Args:
        http: The HTTP client for streams (its base URL is the service's, its
            headers carry the token).
        resolve: Completes a future from its final ResultView.
        error_for: Maps an error response to a typed error.
        check: Looks up one invocation; used only when a stream ends without
            sending an id it was asked for.
        coalesce: Seconds of quiet that close a group of new ids.
        max_coalesce: Longest a new id waits for its group to close.
        max_group: Most ids in one stream.
        max_streams: Most streams open at once.
        reconnect_deadline: Seconds a broken stream is retried before its
            futures fail with ServiceError.
        label: The service, for messages (never carries the token).
    """

    def __init__(
        self,
        http: httpx.Client,
        *,
        resolve: Resolve,
        error_for: ErrorFor,
        check: Check,
        coalesce: float = 0.005,
        max_coalesce: float = 0.05,
        max_group: int = 10_000,
        max_streams: int = 16,
        reconnect_deadline: float = 120.0,
        label: str = "the faas service",
    ) -> None:
        self.http = http
        self.resolve = resolve
        self.error_for = error_for
        self.check = check
        self.coalesce = coalesce
        self.max_coalesce = max_coalesce
        self.max_group = max_group
        self.max_streams = max_streams
        self.reconnect_deadline = reconnect_deadline
        self.label = label
        self._cond = threading.Condition()
        self._futures: dict[str, Future[Any]] = {}
        self._incoming: list[str] = []
        self._streams: set[_Stream] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.streams_opened = 0
        """How many stream requests were made (reconnects included), for tests and metrics."""

    def add(self, items: list[tuple[str, Future[Any]]]) -> None:
        """Watch these invocations until their futures are resolved.

        Raises:
            PoolClosedError: The watcher is closed.
        """
        if not items:
            return
        with self._cond:
            if self._closed:
                raise PoolClosedError("This faas remote client has been shut down.")
            for invocation_id, future in items:
                self._futures[invocation_id] = future
                self._incoming.append(invocation_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._dispatch, name="faas-watch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def forget(self, invocation_id: str) -> Future[Any] | None:
        """Stop watching one invocation; returns its future, if it was watched."""
        with self._cond:
            return self._futures.pop(invocation_id, None)

    def pending(self) -> int:
        """How many futures are still waiting for their result."""
        with self._cond:
            return len(self._futures)

    def close(self) -> None:
        """Stop every stream; futures still pending fail with PoolClosedError."""
        with self._cond:
            self._closed = True
            streams = list(self._streams)
            futures, self._futures = self._futures, {}
            self._incoming.clear()
            self._cond.notify_all()
        for stream in streams:
            stream.interrupt()
        for invocation_id, future in futures.items():
            _fail(
                future,
                PoolClosedError(
                    f"The faas client was shut down before invocation {invocation_id} finished; it "
                    "may still run in the service: re-attach with faas.Future.from_id(invocation_id)."
                ),
            )
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for stream in streams:
            stream.thread.join(timeout=5)

    # -- internals -------------------------------------------------------------------------
    def _take_group(self) -> list[str] | None:
        """Wait for new ids and coalesce them into a group (None when closed)."""
        with self._cond:
            while not self._incoming and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            start = time.monotonic()
            seen = len(self._incoming)
            while not self._closed and len(self._incoming) < self.max_group:
                left = start + self.max_coalesce - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(self.coalesce, left))
                if len(self._incoming) == seen:
                    break  # quiet for `coalesce` seconds
                seen = len(self._incoming)
            group = self._incoming[: self.max_group]
            del self._incoming[: self.max_group]
            return group

    def _dispatch(self) -> None:
        while True:
            group = self._take_group()
            if group is None:
                return
            group = self._make_room(group)
            with self._cond:
                if self._closed:
                    return
                group = [i for i in dict.fromkeys(group) if i in self._futures]
                if not group:
                    continue
                stream = _Stream(self, group)
                self._streams.add(stream)
            stream.thread.start()

    def _make_room(self, group: list[str]) -> list[str]:
        """At the stream cap, interrupt the smallest stream and merge its ids into ``group``."""
        for _ in range(4):  # bounded: a stream that cannot be interrupted does not block new ones
            with self._cond:
                if len(self._streams) < self.max_streams or self._closed:
                    break
                victim = min(self._streams, key=lambda s: len(s.remaining))
            victim.interrupt()
            victim.thread.join(timeout=2.0)
        with self._cond:
            room = max(0, self.max_group - len(group))
            group = group + self._incoming[:room]
            del self._incoming[:room]
        return group

    def _deliver(self, view: ResultView) -> bool:
        """Resolve the future of a final result; False if it was not (or no longer) watched."""
        if view.status not in FINAL_STATES:
            return False
        with self._cond:
            future = self._futures.pop(view.id, None)
        if future is None:
            return False
        try:
            self.resolve(future, view)
        except Exception as exc:  # a result that cannot be turned into a value still ends its future
            log.exception("Could not resolve invocation %s", view.id)
            _fail(future, exc)
        return True

    def _fail_ids(self, ids: set[str], error: BaseException) -> None:
        with self._cond:
            futures = [self._futures.pop(i) for i in ids if i in self._futures]
        for future in futures:
            _fail(future, error)

    def _still_watched(self, ids: set[str]) -> set[str]:
        with self._cond:
            gone = [i for i in ids if i in self._futures and self._futures[i].done()]
            for i in gone:  # cancelled by the caller: nothing left to deliver
                self._futures.pop(i, None)
            return {i for i in ids if i in self._futures}

    def _stream_done(self, stream: _Stream, handed_back: set[str]) -> None:
        with self._cond:
            self._streams.discard(stream)
            if handed_back and not self._closed:
                self._incoming.extend(i for i in handed_back if i in self._futures)
                self._cond.notify_all()


class _Stream:
    """One group of ids and the thread that keeps a watch stream open for them."""

    def __init__(self, watcher: Watcher, ids: list[str]) -> None:
        self.watcher = watcher
        self.remaining: set[str] = set(ids)
        self._interrupted = threading.Event()
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()
        self.delivered = False
        self.thread = threading.Thread(target=self._run, name="faas-watch-stream", daemon=True)

    def interrupt(self) -> None:
        """Stop this stream soon; its pending ids go back to the watcher."""
        self._interrupted.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown_socket(response)

    def _run(self) -> None:
        handed_back: set[str] = set()
        try:
            handed_back = self._loop()
        except Exception as exc:  # never lose a future to a bug in here
            log.exception("The watch stream failed")
            self.watcher._fail_ids(self.remaining, ServiceError(f"Watching invocations failed: {exc}"))
        finally:
            self.watcher._stream_done(self, handed_back)

    def _loop(self) -> set[str]:
        w = self.watcher
        delay = 0.05
        broken_since: float | None = None
        last_error = ""
        while True:
            self.remaining = w._still_watched(self.remaining)
            if not self.remaining:
                return set()
            if self._interrupted.is_set():
                return self.remaining
            try:
                outcome = self._open_once()
            except (httpx.HTTPError, ValueError) as exc:  # ValueError: a malformed stream
                outcome = "broken"
                last_error = f"{type(exc).__name__}: {exc}"
            except _Retryable as exc:
                outcome = "broken"
                last_error = str(exc)
            if self._interrupted.is_set():
                return w._still_watched(self.remaining)
            if outcome == "connected":  # it broke after connecting: reconnect soon, not in a hot loop
                broken_since = None
                self._interrupted.wait(delay)
                delay = 0.05 if self.delivered else min(delay * 2, 2.0)
                self.delivered = False
                continue
            if outcome == "ended":
                self._check_unsent()
                broken_since, delay = None, 0.05
                continue
            now = time.monotonic()
            broken_since = broken_since if broken_since is not None else now
            if now - broken_since >= w.reconnect_deadline:
                ids = sorted(w._still_watched(self.remaining))
                w._fail_ids(
                    set(ids),
                    ServiceError(
                        f"Lost contact with {w.label} while waiting for {len(ids)} invocation(s) "
                        f"(first {ids[0] if ids else '-'}) and it did not come back within "
                        f"{w.reconnect_deadline:g} s ({last_error or 'no answer'}); the invocations may "
                        "still run: re-attach later with faas.Future.from_id(invocation_id).",
                        503,
                    ),
                )
                return set()
            self._interrupted.wait(delay)
            delay = min(delay * 2, 2.0)

    def _open_once(self) -> str:
        """Read one stream. Returns ``connected`` (it broke after connecting) or ``ended``."""
        w = self.watcher
        ids = sorted(self.remaining)
        with w._cond:
            w.streams_opened += 1
        with connect_sse(w.http, "POST", "/v1/watch", json={"ids": ids}) as source:
            response = source.response
            if response.status_code != 200:
                response.read()
                error = w.error_for(response)
                if response.status_code == 404 and len(ids) > 1:
                    # The service refuses the whole list for one unknown id: find it, keep the rest.
                    self._check_unsent()
                    raise _Retryable(str(error))
                if response.status_code in _FATAL_STATUS:
                    w._fail_ids(set(ids), error)
                    self.remaining = set()
                    return "ended"
                raise _Retryable(str(error))
            with self._lock:
                self._response = response
            if self._interrupted.is_set():
                return "connected"
            try:
                for event in source.iter_sse():
                    if event.event == "result":
                        view = _parse(event.data)
                        if view is not None and view.id in self.remaining and w._deliver(view):
                            self.remaining.discard(view.id)
                            self.delivered = True
                    elif event.event == "end":
                        return "ended"
            except httpx.HTTPError:
                pass  # the connection broke after it was established: reconnect at once
            finally:
                with self._lock:
                    self._response = None
        return "connected"

    def _check_unsent(self) -> None:
        """The stream ended without some ids: look each up, so none waits forever."""
        w = self.watcher
        for invocation_id in sorted(w._still_watched(self.remaining)):
            try:
                view = w.check(invocation_id)
            except NotFoundError as exc:
                w._fail_ids({invocation_id}, exc)
                self.remaining.discard(invocation_id)
                continue
            except AuthError as exc:
                w._fail_ids({invocation_id}, exc)
                self.remaining.discard(invocation_id)
                continue
            except (FaasError, httpx.HTTPError):
                return  # the service is unwell: the reconnect loop deals with it
            if view.result is not None and w._deliver(view.result):
                self.remaining.discard(invocation_id)


class _Retryable(Exception):
    """A watch request failed in a way that may pass (503, 5xx, 429)."""


def _parse(data: str) -> ResultView | None:
    try:
        return ResultView.model_validate_json(data)
    except ValidationError:
        log.warning("Ignoring a malformed result event from the faas service: %.200s", data)
        return None


def _fail(future: Future[Any], error: BaseException) -> None:
    if not future.done():
        with contextlib.suppress(Exception):
            future.set_exception(error)


def _shutdown_socket(response: httpx.Response) -> None:
    """Wake a thread blocked reading ``response`` (closing the fd from another thread would not)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
