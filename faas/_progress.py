"""``faas.gather``: wait for futures, optionally showing where they are (cold start, queued, running)."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Sequence
from typing import Any

from faas._future import Future


def gather(
    futures: Sequence[Future[Any]],
    *,
    progress: bool = False,
    timeout: float | None = None,
    return_exceptions: bool = False,
) -> list[Any]:
    """Wait for ``futures`` and return their results in order.

    Args:
        futures: Futures from ``submit``.
        progress: Show a live progress bar that says how many invocations wait
            on an engine cold start, are queued, running or finished.
        timeout: Seconds to wait for all of them.
        return_exceptions: Put an invocation's exception in the list instead of raising it.

    Raises:
        TimeoutError: Not all finished within ``timeout``.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if progress and futures:
        _show_progress(futures, deadline)
    out: list[Any] = []
    for fut in futures:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            out.append(fut.result(remaining))
        except concurrent.futures.TimeoutError:
            raise
        except Exception as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out


def _show_progress(futures: Sequence[Future[Any]], deadline: float | None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("starting", total=len(futures))
        while True:
            phases = collections.Counter(f.status() for f in futures)
            finished = phases["finished"] + phases["cancelled"]
            parts = [
                f"{phases[p]} {p.replace('_', ' ')}" for p in ("waiting_for_engine", "queued", "running")
            ]
            label = ", ".join(p for p in parts if not p.startswith("0 ")) or "done"
            bar.update(task, completed=finished, description=label)
            if finished == len(futures) or (deadline is not None and time.monotonic() > deadline):
                return
            concurrent.futures.wait(futures, timeout=0.2, return_when=concurrent.futures.ALL_COMPLETED)
