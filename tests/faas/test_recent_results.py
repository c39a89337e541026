"""The service's cache of recent results is bounded by count and by bytes."""

from __future__ import annotations

from faas.service._api import ResultView
from faas.service._state import RecentResults
from runtime import ErrorInfo


def test_bounded_by_count_oldest_out() -> None:
    cache = RecentResults(max_items=3, max_bytes=1 << 30)
    for i in range(5):
        cache.put(ResultView(id=f"i{i}", status="succeeded", value=b"x"))
    assert len(cache) == 3 and cache.get("i0") is None and cache.get("i1") is None
    assert cache.get("i4") is not None and cache.get("i4").value == b"x"  # type: ignore[union-attr]


def test_bounded_by_bytes_and_a_replaced_entry_is_not_counted_twice() -> None:
    cache = RecentResults(max_items=1000, max_bytes=3 * (1 << 20))
    big = b"v" * (1 << 20)
    for i in range(10):
        cache.put(ResultView(id=f"b{i}", status="succeeded", value=big))
    assert len(cache) == 2 and cache.bytes <= 3 * (1 << 20)  # two 1 MiB values and their overhead
    before = cache.bytes
    cache.put(ResultView(id="b9", status="succeeded", value=big))  # the same id again
    assert len(cache) == 2 and cache.bytes == before
    error = ErrorInfo(kind="user", type_name="ValueError", message="m" * (2 << 20))
    cache.put(ResultView(id="e", status="failed", error=error))  # a huge error message counts too
    assert cache.get("b8") is None and cache.get("b9") is None and cache.get("e") is not None
    cache.put(ResultView(id="tiny", status="succeeded", value=b""))
    assert len(cache) == 2 and cache.bytes < (2 << 20) + 1024
