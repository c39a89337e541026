"""Bad input through the Python API, stores, serialised bytes, configs and the trigger event parser.

Every case asserts the typed error and that nothing was left behind in the
store (no invocation record, no staged object, no registry entry).
"""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import faas
import runtime
from faas.service._auth import load_authenticator
from faas.triggers import parse_message
from registry import ModelSpec, Registry
from runtime import LocalStore, dumps, loads, loads_data
from tests.badinput._state import durable_files


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    c = faas.Client(store=str(tmp_path_factory.mktemp("badpy")), workers=1)
    yield c
    c.shutdown()


@pytest.fixture
def unchanged(client: faas.Client) -> Iterator[None]:
    root = Path(client.store.config()["options"]["root"])
    before = durable_files(root)
    yield
    assert durable_files(root) == before, "a refused call left something in the store"


@faas.function()
def add(a: int, b: int) -> int:
    return a + b


# -- decorator options --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {"timeout": -1},
        {"timeout": 0},
        {"timeout": float("nan")},
        {"retries": -1},
        {"retries": "3"},
        {"retries": 1.5},
        {"priority": "urgent"},
        {"model": 7},
        {"name": ""},
        {"name": "."},
        {"name": ".."},
        {"name": "fé"},
        {"name": "a" * 129},
        {"name": "a/b"},
        {"name": "f\n"},
    ],
    ids=lambda o: "-".join(f"{k}={str(v)[:8]}" for k, v in o.items()),
)
def test_bad_decorator_options_are_definition_errors(options: dict[str, Any]) -> None:
    with pytest.raises(faas.FunctionDefinitionError):
        faas.function(**options)(lambda x: x)


def test_decorating_a_non_function_is_a_definition_error() -> None:
    with pytest.raises(faas.FunctionDefinitionError):
        faas.function()(42)  # type: ignore[call-overload]


def test_a_model_without_a_model_parameter_is_a_definition_error() -> None:
    with pytest.raises(faas.FunctionDefinitionError, match=r"faas\.Model"):
        faas.function(model="tiny-llama")(lambda x: x)


# -- call arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call_args", "call_kwargs"),
    [((1,), {}), ((1, 2, 3), {}), ((1,), {"c": 2}), ((), {"a": 1, "b": 2, "z": 0})],
)
def test_wrong_call_arguments_are_submit_errors(
    client: faas.Client, unchanged: None, call_args: tuple[Any, ...], call_kwargs: dict[str, Any]
) -> None:
    with pytest.raises(faas.SubmitError, match="Bad arguments for add"):
        add.with_client(client).submit(*call_args, **call_kwargs)


def test_unpicklable_argument_is_a_serialization_error(client: faas.Client, unchanged: None) -> None:
    with pytest.raises(faas.SerializationError, match="cannot be serialised"):
        add.with_client(client).submit(1, threading.Lock())


def test_unknown_model_is_refused_before_anything_runs(client: faas.Client, unchanged: None) -> None:
    @faas.function(model="no-such-model")
    def ask(model: faas.Model, q: str) -> str:
        return q

    with pytest.raises(faas.UnknownModelError):
        ask.with_client(client).submit("hi")


# -- sampling parameters and model specs -----------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": -1},
        {"temperature": float("nan")},
        {"temperature": -0.5},
        {"top_p": 2},
        {"top_k": "ten"},
        {"stop": 5},
        {"bogus": 1},
    ],
    ids=lambda p: next(iter(p)),
)
def test_bad_sampling_parameters_are_refused(params: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):  # a ValueError: refused before any request is built
        faas.SamplingParams(**params)


@pytest.mark.parametrize(
    "spec",
    [
        {"modes": ["generate", "telepathy"]},
        {"modes": "generate"},
        {"max_replicas": -1},
        {"engine": "quantum"},
    ],
    ids=["unknown-mode", "modes-not-a-list", "negative-replicas", "unknown-engine"],
)
def test_bad_model_specs_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ModelSpec(name="m", version="1", **spec)


@pytest.mark.parametrize("name", ["../m", "", "m/x", "é"])
def test_model_names_that_are_paths_are_never_registered(tmp_path: Path, name: str) -> None:
    reg = Registry(LocalStore(tmp_path))
    with pytest.raises(faas.SubmitError, match="Invalid model name"):
        reg.register_model(ModelSpec(name=name, version="1"))
    assert not list((tmp_path / "registry/models").glob("*/versions/*")) or [
        p.parent.parent.name for p in (tmp_path / "registry/models").glob("*/versions/*")
    ] == ["tiny-llama"]


# -- store URLs and configs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/path",
        "s3://",
        "s3:///prefix",
        "s3://Bad Bucket!/p",
        "s3://bucket/p?bogus=1",
        "s3://bucket/p?retries=many",
        "gopher:x",
        "s3://ab/p",
    ],
)
def test_invalid_store_urls_are_store_config_errors(url: str, tmp_path: Path) -> None:
    with pytest.raises(faas.StoreConfigError):
        faas.Client(store=url)
    with pytest.raises(ValueError):  # still a ValueError for callers that caught that
        runtime.store_from_url(url)


@pytest.mark.parametrize(
    "config", [{"kind": "ftp"}, {}, {"kind": "file", "options": {}}, {"kind": "s3", "options": {"x": 1}}]
)
def test_invalid_store_configs_are_store_config_errors(config: dict[str, Any]) -> None:
    with pytest.raises(faas.StoreConfigError):
        runtime.store_from_config(config)


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "a//b", "a\udcff", "k" * 256, ""])
def test_object_keys_that_escape_or_cannot_be_encoded_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "s")
    with pytest.raises(ValueError):
        store.put(key, b"x")
    assert not (tmp_path / "x").exists() and not any((tmp_path / "s").rglob("*"))


# -- invocation ids -------------------------------------------------------------------------------------
@pytest.mark.parametrize("invocation_id", ["", ".", "..", "../../registry/x", "a/b", "x" * 129, "\udcff"])
def test_reattaching_to_a_path_is_not_found(client: faas.Client, invocation_id: str) -> None:
    with pytest.raises(faas.NotFoundError):
        faas.Future.from_id(invocation_id, client=client)


# -- serialised bytes ----------------------------------------------------------------------------------
class _Boom:
    """Unpickling this creates the marker file: what a hostile pickle does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _framed(payload: bytes) -> bytes:
    """A header and a *valid* digest around any payload (as an attacker with the format would write)."""
    import hashlib
    import sys

    head = b"TPMF" + bytes([1, sys.version_info.major, sys.version_info.minor])
    return head + hashlib.sha256(payload).digest() + payload


def test_malformed_pickle_with_a_valid_header_and_digest_is_a_serialization_error() -> None:
    with pytest.raises(faas.SerializationError, match="cannot be deserialised"):
        loads(_framed(b"\x80\x05this is not a pickle"))


def test_malicious_pickle_with_a_wrong_digest_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = bytearray(_framed(pickle.dumps(_Boom(str(marker)))))
    data[10] ^= 0xFF  # the digest no longer matches
    with pytest.raises(faas.IntegrityError):
        loads(bytes(data))
    assert not marker.exists()
    loads(_framed(pickle.dumps(_Boom(str(marker)))))  # control: the same bytes, validly framed, do run
    assert marker.exists()


def test_malicious_pickle_read_as_data_is_never_run(tmp_path: Path) -> None:
    """Where the service reads bytes a function could forge (trigger reports), a digest is not enough."""
    marker = tmp_path / "pwned"
    with pytest.raises(faas.SerializationError, match="Plain data was expected"):
        loads_data(_framed(pickle.dumps(_Boom(str(marker)))))
    assert not marker.exists()


def test_forged_artifact_under_a_registered_digest_is_never_unpickled(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    reg = Registry(store)
    blob = dumps(lambda: "ran")
    from registry import FunctionSpec

    spec = reg.register_function(blob, FunctionSpec(name="f", digest=runtime.digest_of(blob)))
    marker = tmp_path / "pwned"
    forged = _framed(pickle.dumps(_Boom(str(marker))))  # its own header digest is valid
    (store.root / "registry/artifacts" / spec.digest).write_bytes(forged)
    with pytest.raises(faas.IntegrityError):
        Registry(store).load_function(spec.digest)
    assert not marker.exists()


# -- config and token files --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "not toml [[[",
        '[[tenants]]\nname = "a"\ntokens = ["short"]\n',
        '[[tenants]]\nname = "../x"\ntokens = []\n',
        '[[tenants]]\nname = "a"\ntokens = "one-long-token-string"\n',
        '{"tenants": 5}',
        "\xff\xfe",
    ],
    ids=["not-toml", "short-token", "path-name", "tokens-not-list", "json-wrong-type", "binary"],
)
def test_malformed_token_files_are_auth_config_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / ("tokens.json" if text.startswith("{") else "tokens.toml")
    path.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe\x00")
    with pytest.raises(faas.AuthConfigError):
        load_authenticator(str(path))


def test_serve_with_a_bad_store_url_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from faas.cli._main import app

    state = tmp_path / "state"
    result = CliRunner().invoke(
        app, ["serve", "--store", "ftp://x/y", "--state-dir", str(state), "--port", "0"]
    )
    assert result.exit_code == 2, result.output
    assert "Unsupported store URL" in result.output and not state.exists()


@pytest.mark.parametrize(
    "argv", [["--arg", "no-equals"], ["--arg", "1x=2"], ["--json", "{bad"], ["--json", "[1]"]]
)
def test_bad_cli_arguments_exit_2(argv: list[str]) -> None:
    from typer.testing import CliRunner

    from faas.cli._main import app

    env = {"FAAS_URL": "http://127.0.0.1:9"}  # never reached: the arguments are checked first
    result = CliRunner().invoke(app, ["invoke", "f", *argv], env=env)
    assert result.exit_code == 2, result.output


# -- the trigger event parser (bounded fuzz) ---------------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
_key = (
    st.sampled_from(["in/a.txt", "../x", "a/../../b", "", "/abs", "a//b", "%2E%2E/x", "k" * 1100]) | st.text()
)
_record = st.fixed_dictionaries(
    {
        "eventName": st.sampled_from(["ObjectCreated:Put", "ObjectRemoved:Delete"]) | _json,
        "eventTime": st.sampled_from(["2026-01-01T00:00:00Z", "bad", 1e308, float("nan")]) | _json,
        "s3": st.fixed_dictionaries({"bucket": st.fixed_dictionaries({"name": _json}), "object": _json})
        | st.fixed_dictionaries(
            {
                "bucket": st.fixed_dictionaries({"name": st.just("in")}),
                "object": st.fixed_dictionaries({"key": _key, "eTag": st.text(max_size=8), "size": _json}),
            }
        )
        | _json,
    }
)
_message = st.one_of(
    st.builds(lambda r: json.dumps({"Records": r}), st.lists(_record | _json, max_size=3)),
    st.builds(lambda m: json.dumps({"Type": "Notification", "Message": m}), st.text(max_size=50)),
    st.builds(json.dumps, _json),
    st.text(max_size=100),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=_message)
def test_trigger_event_parser_never_raises_and_yields_only_usable_keys(body: str) -> None:
    events = parse_message(body)
    for event in events:
        assert isinstance(event.bucket, str) and event.bucket and event.etag
        assert (
            ".." not in event.key.split("/")
            and not event.key.startswith("/")
            and "" not in event.key.split("/")
        )
        assert event.size is None or (isinstance(event.size, int) and event.size >= 0)


def test_notification_keys_with_dotdot_are_dropped() -> None:
    for key in ("../../etc/passwd", "in/%2E%2E/%2E%2E/x", "in//x", "in/\x00"):
        record = {
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "in"}, "object": {"key": key, "eTag": "e", "size": 1}},
        }
        assert parse_message(json.dumps({"Records": [record]})) == [], key


def test_deeply_nested_sns_envelopes_do_not_recurse_without_bound() -> None:
    body = json.dumps({"Records": []})
    for _ in range(10):  # each envelope escapes the last: the body doubles
        body = json.dumps({"Type": "Notification", "Message": body})
    assert parse_message(body) == []
    assert parse_message("[" * 100_000) == []  # too deep for json: ignored, not a crash
