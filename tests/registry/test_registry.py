from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from registry import FunctionSpec, ModelSpec, Registry, UnknownFunctionError
from runtime import IntegrityError, LocalStore, UnknownModelError, dumps, loads
from runtime._serde import digest_of


def _spec(blob: bytes, name: str = "f", **kw: object) -> FunctionSpec:
    return FunctionSpec(name=name, digest=digest_of(blob), **kw)  # type: ignore[arg-type]


def test_register_resolve_versions(tmp_path: Path) -> None:
    reg = Registry(LocalStore(tmp_path))
    b1 = dumps(lambda x: x + 1)
    b2 = dumps(lambda x: x + 2)
    s1 = reg.register_function(b1, _spec(b1))
    assert s1.version == 1
    assert reg.register_function(b1, _spec(b1)).version == 1  # same artifact, same options
    s2 = reg.register_function(b2, _spec(b2))
    assert s2.version == 2
    assert reg.get_function("f").digest == s2.digest
    assert reg.get_function("f@latest").version == 2
    assert reg.get_function("f@1").digest == s1.digest
    assert reg.get_function(s1.digest).version == 1
    assert reg.load_function(s1.digest)(1) == 2
    # Another registry on the same store sees the same functions.
    other = Registry(LocalStore(tmp_path))
    assert [s.ref for s in other.list_functions()] == ["f@2"]
    with pytest.raises(UnknownFunctionError):
        reg.get_function("f@9")
    with pytest.raises(UnknownFunctionError):
        reg.get_function("nope")


def test_tampered_artifact_is_not_unpickled(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    reg = Registry(store)
    blob = dumps(lambda: "ran")
    spec = reg.register_function(blob, _spec(blob))
    key = f"registry/artifacts/{spec.digest}"
    data = bytearray(store.get(key))
    data[-1] ^= 1
    store.put(key, bytes(data))
    with pytest.raises(IntegrityError):
        Registry(store).load_function(spec.digest)
    # A hostile artifact whose own header digest is valid: unpickling it would create the marker.
    marker = tmp_path / "unpickled"
    hostile = dumps(_Touch(str(marker)))
    (store.root / key).write_bytes(hostile)
    with pytest.raises(IntegrityError):
        Registry(store).load_function(spec.digest)
    assert not marker.exists()
    loads(hostile)  # control: the same bytes do run when nothing checks them against the spec
    assert marker.exists()


class _Touch:
    """Unpickling this creates a file: it shows whether anything was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


def test_models_builtin_registered_and_aliases(tmp_path: Path) -> None:
    reg = Registry(LocalStore(tmp_path))
    assert reg.get_model("tiny-llama").ref == "tiny-llama@1"
    reg.register_model(ModelSpec(name="m", version="1", model_path="/w1"))
    reg.register_model(ModelSpec(name="m", version="2", model_path="/w2"), alias=None)
    assert reg.get_model("m").version == "1"
    assert reg.get_model("m@2").model_path == "/w2"
    reg.set_model_alias("m", "latest", "2")
    assert reg.get_model("m").version == "2"
    with pytest.raises(UnknownModelError, match="m@7"):
        reg.get_model("m@7")
    with pytest.raises(UnknownModelError, match="tiny-llama"):
        reg.get_model("gpt-17")


def test_model_versions_lists_every_version_with_its_aliases(tmp_path: Path) -> None:
    reg = Registry(LocalStore(tmp_path))
    assert [(s.ref, a) for s, a in reg.model_versions()] == [("tiny-llama@1", ["latest"])]
    reg.register_model(ModelSpec(name="sci", version="1"))
    reg.register_model(ModelSpec(name="sci", version="2"))
    reg.set_model_alias("sci", "stable", "1")
    assert [(s.ref, a) for s, a in reg.model_versions()] == [
        ("sci@1", ["stable"]),
        ("sci@2", ["latest"]),
        ("tiny-llama@1", ["latest"]),
    ]
    reg.register_model(ModelSpec(name="tiny-llama", version="2"))  # a stored latest shadows the built-in's
    assert dict((s.ref, a) for s, a in reg.model_versions())["tiny-llama@1"] == []


def test_concurrent_registrations_of_one_artifact_resolve_by_digest(tmp_path: Path) -> None:
    """Whoever sees a registered version can resolve its digest, even mid-race (a built-in's first use)."""
    import threading
    import time

    class SlowStore(LocalStore):
        """Each write takes a few ms (as on S3), which widens the window between a registration's writes."""

        def put(self, key: str, data: bytes, **kw: Any) -> Any:
            time.sleep(0.003)
            return super().put(key, data, **kw)

    blob = dumps(lambda x: x * 3)
    failures: list[BaseException] = []
    for attempt in range(5):
        reg = Registry(SlowStore(tmp_path / str(attempt)))

        def register_and_resolve(delay: float, reg: Registry = reg) -> None:
            time.sleep(delay)  # staggered arrivals: some find a registration half written
            try:
                spec = reg.register_function(blob, _spec(blob))
                assert reg.get_function(spec.digest).digest == spec.digest
            except BaseException as exc:  # collected: an assert in a thread would vanish
                failures.append(exc)

        threads = [threading.Thread(target=register_and_resolve, args=(i * 0.002,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert failures == []
