"""The worker-side trigger output write (commit-once, guarded replacement) and plain-data reports."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from runtime import _serde
from runtime._errors import SerializationError
from runtime._outputs import current_etag, write_output
from runtime._store import LocalStore
from runtime._wire import OutputTarget


def target(tmp_path: Path, etag: str) -> OutputTarget:
    data = LocalStore(tmp_path / "data")
    return OutputTarget(
        store=data.config(), bucket=str(data.root), key="out/a.txt.out", base="out/a.txt",
        done_key="triggers/bindings/b/done/x", source=data.config(), source_key="in/a.txt", source_etag=etag,
    )  # fmt: skip


def put_input(tmp_path: Path, text: str) -> str:
    path = tmp_path / "data" / "in" / "a.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    etag = current_etag(LocalStore(tmp_path / "data"), "in/a.txt")
    assert etag is not None
    return etag


def test_an_output_is_written_once_and_a_rerun_finds_it(tmp_path: Path) -> None:
    faas_store = LocalStore(tmp_path / "faas")
    t = target(tmp_path, put_input(tmp_path, "v1"))
    first = write_output(t, "V1", faas_store)
    assert first["state"] == "written" and first["bytes"] == 2
    assert write_output(t, "V1", faas_store) == {**first, "state": "existing"}  # a replayed invocation
    assert write_output(t, None, faas_store) == {"state": "none"}
    assert (tmp_path / "data/out/a.txt.out").read_text() == "V1"


def test_other_bytes_replace_only_while_nobody_committed_and_the_input_is_current(tmp_path: Path) -> None:
    faas_store = LocalStore(tmp_path / "faas")
    t = target(tmp_path, put_input(tmp_path, "v1"))
    write_output(t, "V1", faas_store)
    assert write_output(t, "v1 again", faas_store)["state"] == "replaced"  # an older attempt's output
    os.utime(tmp_path / "data/in/a.txt", ns=(1, 1))  # the input changed since this version was listed
    assert write_output(t, "late", faas_store) == {"state": "superseded"}
    (tmp_path / "data/in/a.txt").unlink()
    assert write_output(t, "late", faas_store) == {"state": "deleted"}
    faas_store.put(t.done_key, b"{}")
    assert write_output(t, "late", faas_store) == {"state": "done_elsewhere"}
    assert (tmp_path / "data/out/a.txt.out").read_text() == "v1 again"


def test_an_unwritable_value_is_the_function_s_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON-able"):
        write_output(target(tmp_path, "e"), object(), None)


def test_plain_data_loads_but_classes_are_refused_before_lookup() -> None:
    report = {"state": "written", "key": "k", "sha256": "0" * 64, "bytes": 3, "list": [1, 2.5, None, True]}
    assert _serde.loads_data(_serde.dumps(report)) == report
    with pytest.raises(SerializationError, match=r"collections\.OrderedDict"):
        _serde.loads_data(_serde.dumps(collections.OrderedDict(a=1)))
