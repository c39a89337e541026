"""Capture what an invocation prints, per thread, in a worker that runs many at once.

A worker process runs several invocations concurrently in threads, so
redirecting ``sys.stdout`` for one of them would steal the others' output.
Instead :func:`capturing` installs (once per process, again only if someone
replaced the streams since) a routing proxy on ``sys.stdout`` and
``sys.stderr``: a write from a thread that is inside ``capturing()`` goes to
that invocation's buffer; a write from any other thread passes through to the
stream the proxy wraps.

Limits:

- Output from threads the user function starts itself is not captured: those
  threads are not inside ``capturing()``, so their writes pass through to the
  worker's own stdout/stderr.
- Writes straight to file descriptors 1 and 2 (``os.write``, C extensions,
  subprocesses) bypass ``sys.stdout`` and are not captured either.
- Each invocation keeps at most ``limit_bytes`` (UTF-8) of output: the head is
  kept and a note at the end says how much was dropped.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

DEFAULT_LIMIT_BYTES = 1024 * 1024
"""Output kept per invocation unless ``capturing()`` is given another limit."""

_local = threading.local()
_install_lock = threading.Lock()


class Capture:
    """The output one invocation printed (stdout and stderr interleaved, in order).

    Args:
        limit_bytes: Bytes (UTF-8) kept; later output is counted, not kept.
    """

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> None:
        if limit_bytes < 0:
            raise ValueError(f"The capture limit must be >= 0 bytes; got {limit_bytes}.")
        self.limit_bytes = limit_bytes
        self._parts: list[str] = []
        self._kept = 0
        self.dropped_bytes = 0

    def write(self, text: str) -> None:
        """Append ``text``, keeping no more than the limit."""
        if not text:
            return
        if self.dropped_bytes:
            self.dropped_bytes += len(text.encode("utf-8", "replace"))
            return
        data = text.encode("utf-8", "replace")
        room = self.limit_bytes - self._kept
        if len(data) <= room:
            self._parts.append(text)
            self._kept += len(data)
            return
        head = data[:room].decode("utf-8", "ignore")  # never split a character
        kept = len(head.encode("utf-8"))
        self._parts.append(head)
        self._kept += kept
        self.dropped_bytes += len(data) - kept

    @property
    def truncated(self) -> bool:
        """Whether some output was dropped."""
        return self.dropped_bytes > 0

    def text(self) -> str:
        """What was captured, with a note at the end if output was dropped.

        Lone surrogates (text decoded from bytes that were not UTF-8) come back
        as backslash escapes: the log must survive a UTF-8 JSON record.
        """
        out = utf8_safe("".join(self._parts))
        if self.dropped_bytes:
            sep = "" if not out or out.endswith("\n") else "\n"
            out += (
                f"{sep}[faas: {self.dropped_bytes} more bytes of output were dropped; "
                f"an invocation's log keeps its first {self.limit_bytes} bytes]\n"
            )
        return out


def utf8_safe(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode (lone surrogates) as backslash escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class _Router:
    """Stands in for ``sys.stdout``/``sys.stderr``: routes a capturing thread's writes to its Capture."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    @property
    def wrapped(self) -> TextIO:
        """The stream other threads' writes go to."""
        return self._stream

    def write(self, text: str) -> int:
        capture: Capture | None = getattr(_local, "capture", None)
        if capture is None:
            return self._stream.write(text)
        capture.write(text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if getattr(_local, "capture", None) is None:
            self._stream.flush()

    def isatty(self) -> bool:
        if getattr(_local, "capture", None) is not None:
            return False
        return self._stream.isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, fileno, buffer, ...
        return getattr(self._stream, name)


def install() -> None:
    """Put the routing proxy on ``sys.stdout`` and ``sys.stderr`` (idempotent)."""
    with _install_lock:
        if not isinstance(sys.stdout, _Router) and sys.stdout is not None:
            sys.stdout = _Router(sys.stdout)  # type: ignore[assignment]
        if not isinstance(sys.stderr, _Router) and sys.stderr is not None:
            sys.stderr = _Router(sys.stderr)  # type: ignore[assignment]


@contextmanager
def capturing(limit_bytes: int = DEFAULT_LIMIT_BYTES) -> Iterator[Capture]:
    """Capture what this thread writes to ``sys.stdout``/``sys.stderr`` inside the block.

    Other threads' output is unaffected. Nested blocks capture into the
    innermost one and restore the outer one on exit.

    Args:
        limit_bytes: Bytes kept (UTF-8); the rest is counted and noted.

    Yields:
        The Capture; read ``capture.text()`` after (or during) the block.
    """
    capture = Capture(limit_bytes)
    install()
    previous: Capture | None = getattr(_local, "capture", None)
    _local.capture = capture
    try:
        yield capture
    finally:
        _local.capture = previous


__all__ = ["DEFAULT_LIMIT_BYTES", "Capture", "capturing", "install"]
