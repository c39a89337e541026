"""The service index: the commit point of results, first result wins, replay lists."""

from __future__ import annotations

from pathlib import Path

from faas.service._index import Index
from runtime import new_id
from runtime._wire import Invocation


def _invocations(n: int) -> list[Invocation]:
    return [Invocation(id=new_id(), function_name="f", function_digest="0" * 64, args=b"x") for _ in range(n)]


def test_first_result_wins_and_replay_lists(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite")
    a, b, c = _invocations(3)
    index.add("alice", [a, b, c], batch="batch1")
    assert [r.id for r in index.unfinished()] == [a.id, b.id, c.id]
    assert index.finish_many([(a.id, "succeeded", '{"first": 1}'), (b.id, "failed", "{}")]) == [True, True]
    # A second result for a finished id changes nothing.
    assert index.finish_many([(a.id, "failed", '{"second": 2}'), (c.id, "succeeded", "{}")]) == [False, True]
    row = index.get(a.id)
    assert row is not None and row.state == "succeeded" and row.result == '{"first": 1}'
    assert [r.id for r in index.unfinished()] == []
    assert {r.id for r in index.unrecorded()} == {a.id, b.id, c.id}
    index.mark_recorded([a.id, b.id])
    assert [r.id for r in index.unrecorded()] == [c.id]
    row = index.get(a.id)
    assert row is not None and row.recorded == 1 and row.result is None
    assert [r.id for r in index.batch("batch1")] == [a.id, b.id, c.id]
    index.close()
    # Everything above survives a reopen (what a restart sees).
    again = Index(tmp_path / "index.sqlite")
    assert [r.id for r in again.unrecorded()] == [c.id]
    assert [r.id for r in again.list("alice", state="failed")] == [b.id]
    assert again.list("bob") == []
    again.close()
