"""Per-thread capture of stdout/stderr (runtime._capture) and its use in execute()."""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import _serde
from runtime._capture import Capture, capturing, install
from runtime._execute import execute
from runtime._records import RecordStore
from runtime._store_factory import store_from_url
from runtime._wire import Invocation


@contextlib.contextmanager
def real_streams() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Fresh sys.stdout/sys.stderr inside the block (restored after), so passthrough can be read.

    Swapped in the test body, not a fixture: pytest puts its own capture back between phases.
    """
    saved = sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved


def test_concurrent_threads_each_get_only_their_own_output() -> None:
    with real_streams() as (out, err):
        texts = _run_concurrently(16, 200)
    assert out.getvalue() == "" and err.getvalue() == ""  # nothing leaked to the real streams
    for i, text in texts.items():
        expected = "".join(f"thread {i} line {j}\nthread {i} err {j}\n" for j in range(200))
        assert text == expected


def _run_concurrently(n: int, lines: int) -> dict[int, str]:
    """``n`` threads each capture while printing ``lines`` lines to stdout and stderr."""
    n, lines = 16, 200
    barrier = threading.Barrier(n)
    texts: dict[int, str] = {}

    def work(i: int) -> None:
        with capturing() as capture:
            barrier.wait(timeout=30)  # every thread captures at the same time
            for j in range(lines):
                print(f"thread {i} line {j}")
                print(f"thread {i} err {j}", file=sys.stderr)
        texts[i] = capture.text()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(texts) == n
    return texts


def test_other_threads_pass_through() -> None:
    inside = threading.Event()
    release = threading.Event()
    captured: list[str] = []

    def invocation() -> None:
        with capturing() as capture:
            print("mine")
            inside.set()
            release.wait(timeout=30)
        captured.append(capture.text())

    with real_streams() as (out, err):
        t = threading.Thread(target=invocation)
        t.start()
        assert inside.wait(timeout=30)
        print("from the main thread")
        print("main err", file=sys.stderr)
        sys.stdout.flush()
        release.set()
        t.join(timeout=30)
    assert captured == ["mine\n"]
    assert out.getvalue() == "from the main thread\n"
    assert err.getvalue() == "main err\n"


def test_threads_started_by_the_function_are_not_captured() -> None:
    with real_streams() as (out, _), capturing() as capture:
        print("own")
        child = threading.Thread(target=print, args=("child",))
        child.start()
        child.join(timeout=30)
    assert capture.text() == "own\n"
    assert out.getvalue() == "child\n"


def test_limit_keeps_the_head_and_notes_the_rest() -> None:
    with capturing(limit_bytes=10) as capture:
        print("0123456789abcdef")  # 17 bytes with the newline
        print("more")
    text = capture.text()
    assert text.startswith("0123456789\n[faas: 12 more bytes of output were dropped")
    assert capture.truncated and capture.dropped_bytes == 12


def test_limit_never_splits_a_character() -> None:
    cap = Capture(limit_bytes=3)
    cap.write("aé€")  # 1 + 2 + 3 bytes: the euro sign does not fit
    assert cap.text().startswith("aé\n[faas: 3 more bytes")
    with pytest.raises(ValueError, match="limit must be >= 0"):
        Capture(-1)


def test_nested_capture_restores_the_outer_one() -> None:
    with capturing() as outer:
        print("a")
        with capturing() as inner:
            print("b")
        print("c")
    assert (outer.text(), inner.text()) == ("a\nc\n", "b\n")


def test_install_is_idempotent_and_rewraps_replaced_streams() -> None:
    with real_streams():
        install()
        first = sys.stdout
        install()
        assert sys.stdout is first
        replacement = io.StringIO()
        sys.stdout = replacement
        with capturing() as capture:
            print("x")
        print("y")
    assert capture.text() == "x\n"
    assert replacement.getvalue() == "y\n"


def _printing(n: int) -> int:
    print(f"value {n}")
    print("warning", file=sys.stderr)
    return n


def _raising() -> None:
    print("before the error")
    raise ValueError("boom")


def _invocation(fn_name: str, args: tuple[object, ...]) -> Invocation:
    return Invocation(id="i1", function_name=fn_name, function_digest="d", args=_serde.dumps((args, {})))


def test_execute_fills_logs_on_success_and_on_error() -> None:
    ok = execute(_invocation("printing", (3,)), _printing)
    assert ok.ok and ok.logs == "value 3\nwarning\n"
    failed = execute(_invocation("raising", ()), _raising)
    assert failed.error is not None and failed.error.kind == "user"
    assert failed.logs == "before the error\n"


def test_records_carry_logs(tmp_path: Path) -> None:
    records = RecordStore(store_from_url(tmp_path.as_uri()))
    inv = _invocation("printing", (5,))
    records.write_request(inv)
    assert records.get(inv.id).logs == ""
    records.write_result(execute(inv, _printing))
    assert records.result(inv.id) is not None
    assert records.get(inv.id).logs == "value 5\nwarning\n"
