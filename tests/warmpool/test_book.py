"""The book's memory stays bounded by what is in flight, not by rate x timeout."""

from __future__ import annotations

import threading

from registry import FunctionSpec
from runtime import Invocation, Result, new_id
from warmpool._book import Book, Entry

SPEC = FunctionSpec(name="f", digest="0" * 64)


def test_finished_deadlines_do_not_pile_up_and_live_ones_still_expire() -> None:
    now = [0.0]
    book: Book[Entry] = Book(threading.RLock(), lambda: now[0], lambda _w: None)
    done: list[str] = []

    def opened(timeout: float) -> Entry:
        inv = Invocation(id=new_id(), function_name="f", function_digest="0" * 64, args=b"", timeout=timeout)
        work = Entry(inv, SPEC, None, lambda r: done.append(r.invocation_id), submitted=now[0])
        with book._lock:
            book.open(work)
        return work

    slow = opened(10_000.0)  # stays in flight throughout
    for i in range(20_000):  # a long day at a steady rate, each finished well before its timeout
        now[0] = i * 0.01
        work = opened(600.0)
        book.finish(work, Result(invocation_id=work.invocation.id))
        assert len(book._deadlines) <= 2 * len(book.works) + 1024
    assert len(done) == 20_000 and book.due() == []
    now[0] = 20_000.0
    [expired] = book.due()  # the one live deadline survived every rebuild
    assert expired is slow
