"""End-to-end: what a function prints in a worker shows up in its invocation record's logs."""

from __future__ import annotations

import sys
from typing import Any

import pytest

import faas


@faas.function(timeout=30)
def chatty(n: int) -> int:
    print(f"working on {n}")
    print(f"careful with {n}", file=sys.stderr)
    return n * 2


@faas.function(timeout=30)
def chatty_failure(n: int) -> None:
    print(f"about to fail on {n}")
    raise ValueError(f"bad {n}")


def test_prints_are_in_the_record_logs(module_client: Any) -> None:
    client: faas.Client = module_client
    futures = [chatty.with_client(client).submit(n) for n in range(8)]  # run concurrently in workers
    assert [f.result(timeout=60) for f in futures] == [n * 2 for n in range(8)]
    for n, fut in enumerate(futures):
        record = client.record(fut.invocation_id)
        assert record.logs == f"working on {n}\ncareful with {n}\n"  # each gets only its own output

    failing = chatty_failure.with_client(client).submit(7)
    with pytest.raises(ValueError, match="bad 7"):
        failing.result(timeout=60)
    assert client.record(failing.invocation_id).logs == "about to fail on 7\n"
