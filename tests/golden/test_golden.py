"""Golden wire and pickle artifacts written by an earlier version must still load (see README.md).

The files under ``data/`` were written once by ``make_golden`` and are never
regenerated: they stand for function artifacts, staged values, results and
records already stored in users' object stores. Classes are compared by their
public names (``faas.WorkerLost``), so these tests keep passing after a module
moves as long as the old module path stays importable (an alias), which is
what ``test_module_paths_in_pickles_are_importable`` checks.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import io
import json
import pickle
import platform
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import faas
import registry
import runtime
from faas._future import rebuild_error
from runtime import _serde
from tests.golden._golden import DATA, describe, load_manifest, pickle_globals, pickle_stream, resolve

MANIFEST = load_manifest()
PICKLES: list[dict[str, Any]] = MANIFEST["pickles"]
RECORDS: list[dict[str, Any]] = MANIFEST["records"]
STORE_ROOT: str = MANIFEST["store_root"]
IDS: dict[str, str] = MANIFEST["ids"]

# Functions pickled by value carry CPython bytecode, which only the Python minor
# version that wrote them can load (runtime._serde records it in the header).
same_python = pytest.mark.skipif(
    ".".join(platform.python_version_tuple()[:2]) != ".".join(MANIFEST["python"].split(".")[:2]),
    reason=f"the golden function artifacts hold Python {MANIFEST['python']} bytecode",
)

# Where each JSON record's reader lives today. JSON carries no module paths, so
# after a move only this table changes; the field names in the files may not.
READERS: dict[str, str] = {
    "Invocation": "runtime.Invocation",
    "Result": "runtime.Result",
    "ErrorInfo": "runtime.ErrorInfo",
    "StagedRef": "runtime.StagedRef",
    "ProvenanceRecord": "runtime.ProvenanceRecord",
    "InvocationRecord": "runtime.InvocationRecord",
    "RequestRecord": "runtime._records.RequestRecord",
    "ResultRecord": "runtime._records.ResultRecord",
    "FunctionSpec": "registry.FunctionSpec",
    "ModelSpec": "registry.ModelSpec",
    "TriggerBinding": "registry.TriggerBinding",
    "Claim": "faas.triggers._state.Claim",
    "Dispatch": "warmpool._runner.Dispatch",
    "InvocationView": "faas.service._api.InvocationView",
    "SubmitRequest": "faas.service._api.SubmitRequest",
}
PLAIN_JSON = {"alias", "done", "dead", "retry", "cloud_dispatch", "staged-bytes"}

# Module paths of this project that stored pickles name (module:qualname; "module:" is a
# module cloudpickle imports by name). Every one must stay importable after a move.
WIRE_NAMES = {
    "faas:",
    "faas._function:Function",
    "faas._gc_cloud:GlobusComputeConfigError",
    "faas._gc_cloud:run_cloud_invocation",
    "registry._bindings:BindingError",
    "registry._bindings:UnknownBindingError",
    "registry._registry:UnknownFunctionError",
    "runtime._errors:AuthError",
    "runtime._errors:EngineError",
    "runtime._errors:EngineLost",
    "runtime._errors:FaasError",
    "runtime._errors:FunctionDefinitionError",
    "runtime._errors:IntegrityError",
    "runtime._errors:InvocationCancelled",
    "runtime._errors:InvocationError",
    "runtime._errors:InvocationTimeout",
    "runtime._errors:ModeNotAllowedError",
    "runtime._errors:NotFoundError",
    "runtime._errors:ObjectExists",
    "runtime._errors:ObjectNotFound",
    "runtime._errors:PoolClosedError",
    "runtime._errors:QuotaExceededError",
    "runtime._errors:RemoteError",
    "runtime._errors:SerializationError",
    "runtime._errors:ServiceError",
    "runtime._errors:StoreAuthError",
    "runtime._errors:StoreError",
    "runtime._errors:SubmitError",
    "runtime._errors:UnknownModelError",
    "runtime._errors:WorkerLost",
    "runtime._model:Model",
    "runtime._model:UnsupportedFeatureError",
    "runtime._model_results:ChatResult",
    "runtime._model_results:GenerateResult",
    "runtime._objectref:ObjectRef",
    "runtime._objectref:_object_ref",
    "runtime._outputs:Outputs",
    "runtime._source:FunctionBundle",
    "runtime._staging:_ref_from_json",
    "warmpool._gce_task:run_invocation",
    "warmpool._replica:BackPressureError",
}
OURS = ("faas", "runtime", "registry", "warmpool")

# RemoteError(type_name, message, traceback) pickles as RemoteError(str(self)), which
# its __init__ refuses: it never loaded. rebuild_error still turns it into a RemoteError.
NEVER_LOADED = {"RemoteError"}


def _entries(what: str) -> list[dict[str, Any]]:
    return [p for p in PICKLES if p["what"] == what]


def _id(entry: dict[str, Any]) -> str:
    return str(entry["file"]).rsplit("/", 1)[-1][:40]


def _read(rel: str) -> bytes:
    return (DATA / rel).read_bytes()


def _function_spec(name: str) -> registry.FunctionSpec:
    return registry.FunctionSpec.model_validate_json(
        _read(f"store/registry/functions/{name}/versions/000001.json")
    )


@pytest.fixture
def store(tmp_path: Path) -> runtime.LocalStore:
    """A copy of the golden store (tests write to it)."""
    root = tmp_path / "store"
    shutil.copytree(DATA / "store", root)
    return runtime.LocalStore(root)


def _at(store: runtime.LocalStore, rel: str) -> str:
    """A golden record's JSON with the store root it names pointed at ``store``."""
    return _read(rel).decode().replace(STORE_ROOT, str(store.root))


# -- the files and the module paths they embed ------------------------------------------------


def test_manifest_lists_every_golden_file() -> None:
    on_disk = {str(p.relative_to(DATA)) for p in DATA.rglob("*") if p.is_file()}
    listed = {e["file"] for e in PICKLES + RECORDS} | {"manifest.json", "values/result_marker.tpmr"}
    assert on_disk == listed
    assert len(_entries("function")) == 3
    assert len(_entries("exception")) >= 30


@pytest.mark.parametrize("entry", PICKLES, ids=_id)
def test_module_paths_in_pickles_are_importable(entry: dict[str, Any]) -> None:
    """Every global a golden pickle names resolves as the unpickler would look it up."""
    stream = pickle_stream(_read(entry["file"]), entry["format"])
    found = sorted(f"{m}:{q}" for m, q in pickle_globals(stream))
    assert found == entry["globals"], "the file or the scanner changed"
    _assert_resolvable(found)


def _assert_resolvable(names: list[str]) -> None:
    finder = pickle.Unpickler(io.BytesIO(b""))
    missing = []
    for name in names:
        module, _, qualname = name.partition(":")
        try:
            if qualname:
                finder.find_class(module, qualname)
            else:
                importlib.import_module(module)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    assert not missing, "stored pickles name these; keep an alias at the old path: " + "; ".join(missing)


def _embedded_pickles(node: Any) -> list[bytes]:
    """runtime._serde blobs inside a JSON record (base64 bytes fields: args, value, exception, inline)."""
    if isinstance(node, dict):
        return [b for v in node.values() for b in _embedded_pickles(v)]
    if isinstance(node, list):
        return [b for v in node for b in _embedded_pickles(v)]
    if isinstance(node, str) and node.startswith("VFBNRg"):  # base64 of b"TPMF\x01"
        return [base64.urlsafe_b64decode(node)]
    return []


@pytest.mark.parametrize("entry", [r for r in RECORDS if r["model"] not in PLAIN_JSON], ids=_id)
def test_pickles_inside_json_records_name_importable_paths(entry: dict[str, Any]) -> None:
    for blob in _embedded_pickles(json.loads(_read(entry["file"]))):
        assert blob[:4] == b"TPMF"
        _assert_resolvable(sorted(f"{m}:{q}" for m, q in pickle_globals(blob[_serde.HEADER_LEN :])))


def test_wire_names_of_this_project() -> None:
    """The project's module paths that stored artifacts name: the list a move must keep importable."""
    ours = {g for e in PICKLES for g in e["globals"] if g.split(":")[0].split(".")[0] in OURS}
    assert ours == WIRE_NAMES


# -- pickles load as the public classes, with their fields --------------------------------------


@pytest.mark.parametrize("entry", _entries("exception"), ids=_id)
def test_exception_pickles_load_as_their_public_class(entry: dict[str, Any]) -> None:
    data = _read(entry["file"])
    if entry["class_name"] in NEVER_LOADED:
        with pytest.raises(faas.SerializationError):
            _serde.loads(data)
        return
    loaded = _serde.loads(data)
    if entry["class"] is None:  # a user's class, pickled by value
        assert type(loaded).__name__ == entry["class_name"]
        assert isinstance(loaded, ValueError)
    else:
        assert type(loaded) is resolve(entry["class"])
    assert describe(loaded) == entry["expect"]
    assert str(loaded) == entry["message"]


@pytest.mark.parametrize("entry", _entries("exception"), ids=_id)
def test_rebuild_error_gives_the_public_class(entry: dict[str, Any]) -> None:
    info = runtime.ErrorInfo(
        kind=entry["kind"],
        type_name=entry["type_name"],
        message=entry["message"],
        exception=_read(entry["file"]),
    )
    info = runtime.ErrorInfo.model_validate_json(info.model_dump_json())  # as it arrives from a record
    rebuilt = rebuild_error(info)
    if entry["class"] is None:
        assert type(rebuilt).__name__ == entry["class_name"] and isinstance(rebuilt, ValueError)
    else:
        assert type(rebuilt) is resolve(entry["class"])
    if entry["class_name"] in NEVER_LOADED:
        assert isinstance(rebuilt, faas.RemoteError) and rebuilt.type_name == entry["type_name"]
    else:
        assert str(rebuilt) == entry["message"]
    # A reader that cannot unpickle it (exception=None) still gets the kind's class.
    fallback = rebuild_error(info.model_copy(update={"exception": None}))
    expected = {
        "timeout": faas.InvocationTimeout,
        "worker_lost": faas.WorkerLost,
        "engine_lost": faas.EngineLost,
        "cancelled": faas.InvocationCancelled,
        "user": faas.RemoteError,
    }.get(entry["kind"])
    if expected is not None:
        assert type(fallback) is expected


def test_recorded_user_error_rebuilds_with_its_remote_traceback() -> None:
    info = runtime.ErrorInfo.model_validate_json(_read("records/ErrorInfo.json"))
    assert (info.kind, info.type_name, info.message) == ("user", "__main__.TooShort", "no words")
    rebuilt = rebuild_error(info)
    assert type(rebuilt).__name__ == "TooShort" and isinstance(rebuilt, ValueError)
    assert 'File "user_script.py", line' in rebuilt.remote_traceback  # type: ignore[attr-defined]
    assert any("user_script.py" in note for note in rebuilt.__notes__)


@pytest.mark.parametrize("entry", _entries("value"), ids=_id)
def test_value_pickles_load_as_their_public_class(entry: dict[str, Any]) -> None:
    loaded = _serde.loads(_read(entry["file"]))
    assert type(loaded) is resolve(entry["class"])
    got, expect = describe(loaded), entry["expect"]
    if isinstance(got, dict) and isinstance(expect, dict):
        # Optional fields added since the artifact was written load at their default (None).
        added = {k: v for k, v in got.items() if k not in expect}
        assert all(v is None for v in added.values()), added
        got = {k: v for k, v in got.items() if k in expect}
    assert got == expect


def test_object_refs_and_refs_load_equal() -> None:
    ref = _serde.loads(_read("values/ObjectRef.tpmf"))
    assert ref == faas.ObjectRef(
        "inbox", "in/golden.txt", etag="golden-etag", size=len(MANIFEST["trigger"]["text"])
    )
    (args, kwargs) = _serde.loads(_read("values/args_trigger.tpmf"))
    assert args == (ref,) and kwargs == {}
    put = _serde.loads(_read("values/Ref.tpmf"))  # outside resolving(): the reference itself
    assert isinstance(put, faas.Ref) and put.key.startswith("staging/") and put.staged.encoding == "pickle"


def test_trigger_report_is_plain_data() -> None:
    """The service reads workers' trigger reports with loads_data, which refuses any class."""
    report = _serde.loads_data(_read("values/report.tpmf"))
    assert report["state"] == "written" and report["key"] == "out/golden.txt.out"
    assert report["bytes"] == len(MANIFEST["trigger"]["text"])


def test_staged_values_resolve_from_the_golden_store(store: runtime.LocalStore) -> None:
    from runtime._staging import load_staged, unstage_value

    (args, kwargs) = unstage_value(store, _read("values/args_refs.tpmf"))
    assert args == ({"table": [[1, 2], [3, 4]], "label": "golden"}, b"\x07" * 1100)
    assert kwargs == {"where": _serde.loads(_read("values/ObjectRef.tpmf"))}
    marker = _read("values/result_marker.tpmr")
    assert marker[:4] == b"TPMR"
    assert unstage_value(store, marker) == {"text": "golden " * 40}
    for entry in _entries("staged") + [r for r in RECORDS if r["model"] == "staged-bytes"]:
        ref = runtime.StagedRef.model_validate(entry["ref"])
        assert "staging/" + ref.sha256 == ref.key == entry["file"].removeprefix("store/")
        assert load_staged(store, ref) is not None
    put = _serde.loads(_read("values/Ref.tpmf"))
    assert put.load(store) == args[0]


# -- function artifacts through the registry -----------------------------------------------------


class _StubModel:
    """Stands in for the engine handle: records what the function asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def generate(self, prompt: str, params: dict[str, Any]) -> Any:
        self.asked.append((prompt, params))
        return type("Answer", (), {"text": f"<{params['max_new_tokens']} tokens>"})()


@same_python
def test_function_artifacts_load_through_the_registry_and_run(store: runtime.LocalStore) -> None:
    reg = registry.Registry(store)
    names = [s.name for s in reg.list_functions()]
    assert names == ["convert", "summarise", "word-count"]
    for name in names:
        spec = reg.get_function(name)
        assert spec == reg.get_function(f"{name}@1") == reg.get_function(spec.digest) == _function_spec(name)
        assert spec.module == "__main__"
    count = reg.load_function(reg.get_function("word-count").digest)
    assert count("a b c") == {"words": 3, "chars": 5}
    with pytest.raises(ValueError, match="no words") as raised:
        count("   ")
    assert type(raised.value).__name__ == "TooShort"
    assert inspect.getsourcefile(count) == "user_script.py"  # the bundle restored its file name

    summarise_spec = reg.get_function("summarise")
    assert (summarise_spec.model, summarise_spec.model_param, summarise_spec.timeout) == (
        "golden-llama@1",
        "model",
        30,
    )
    summarise = reg.load_function(summarise_spec.digest)
    assert inspect.signature(summarise).parameters["model"].annotation is faas.Model
    model = _StubModel()
    assert summarise(model, "the sky") == "<2 tokens>"
    assert model.asked == [("golden: the sky", {"max_new_tokens": 2, "temperature": 0})]

    convert = reg.load_function(reg.get_function("convert").digest)
    params = inspect.signature(convert).parameters
    assert params["obj"].annotation is faas.ObjectRef and params["out"].annotation is faas.Outputs
    assert isinstance(convert.__globals__["counter"], faas.Function)
    assert reg.get_model("golden-llama").modes == ["generate", "logprobs"]


def test_a_tampered_artifact_is_refused(store: runtime.LocalStore) -> None:
    digest = registry.Registry(store).get_function("word-count").digest
    path = store.root / "registry/artifacts" / digest
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(faas.IntegrityError):
        registry.Registry(store).load_function(digest)


@same_python
def test_trigger_invocation_runs_in_a_worker(store: runtime.LocalStore) -> None:
    """The golden trigger invocation, run by the worker-side runner: output written, report returned."""
    from warmpool._runner import Dispatch, Runner

    text = MANIFEST["trigger"]["text"]
    (store.root / "inbox/in").mkdir(parents=True)
    (store.root / "inbox/in/golden.txt").write_text(text)
    invocation = runtime.Invocation.model_validate_json(_at(store, "records/Invocation_trigger.json"))
    assert invocation.output is not None
    result = Runner().run(Dispatch(invocation=invocation))
    assert result.ok, result.error
    assert result.value is not None
    assert _serde.loads_data(result.value)["state"] == "written"
    out = store.root / "outbox/out"
    assert (out / "golden.txt.out").read_text() == text.upper()
    assert (out / "golden.txt/counts.json").read_text() == "[('chars', 19), ('words', 3)]"


@same_python
def test_globus_compute_tasks_load_by_name_and_run(store: runtime.LocalStore, monkeypatch: Any) -> None:
    """The SDK-serialised cloud task runs the golden invocation; the engine task reads a Dispatch."""
    pytest.importorskip("globus_compute_sdk")
    from globus_compute_sdk.serialize import ComputeSerializer

    serde = ComputeSerializer()
    cloud_task = serde.deserialize(_read("gc/run_cloud_invocation.txt").decode())
    engine_task = serde.deserialize(_read("gc/run_invocation.txt").decode())
    assert (cloud_task.__name__, engine_task.__name__) == ("run_cloud_invocation", "run_invocation")

    answer = cloud_task(_at(store, "records/Invocation.json"), _read("records/cloud_dispatch.json").decode())
    result = runtime.Result.model_validate_json(answer)
    assert result.ok, result.error
    assert result.value is not None
    assert _serde.loads(result.value) == {"words": 3, "chars": 18}

    for name in ("FAAS_ENGINE_URL", "FAAS_ENGINE_URLS", "FAAS_ENGINE_ERROR"):
        monkeypatch.delenv(name, raising=False)
    answer = engine_task(_at(store, "records/Dispatch.json"))  # a model but no engine in this "block"
    failed = runtime.Result.model_validate_json(answer)
    assert failed.invocation_id == IDS["engine"]
    assert failed.error is not None and failed.error.kind == "engine_lost"


# -- JSON records -----------------------------------------------------------------------------------


def _keys_kept(golden: Any, dumped: Any) -> bool:
    """Every key of the golden JSON is still there after a round trip (recursively)."""
    if isinstance(golden, dict):
        return isinstance(dumped, dict) and all(
            k in dumped and _keys_kept(v, dumped[k]) for k, v in golden.items()
        )
    if isinstance(golden, list):
        return (
            isinstance(dumped, list) and len(golden) == len(dumped) and all(map(_keys_kept, golden, dumped))
        )
    return True


@pytest.mark.parametrize("entry", [r for r in RECORDS if r["model"] not in PLAIN_JSON], ids=_id)
def test_json_records_validate_and_round_trip(entry: dict[str, Any]) -> None:
    cls: type[BaseModel] = resolve(READERS[entry["model"]])
    text = _read(entry["file"])
    record = cls.model_validate_json(text)
    again = record.model_dump_json(**entry.get("dump", {}))
    assert cls.model_validate_json(again) == record
    assert _keys_kept(json.loads(text), json.loads(again)), "a field of the stored record was dropped"


def test_invocation_records_in_the_golden_store(store: runtime.LocalStore) -> None:
    from faas._provenance import read_provenance
    from runtime._staging import unstage_value

    records = runtime.RecordStore(store)
    ok = records.get(IDS["ok"])
    assert (ok.status, ok.function_name, ok.worker_host) == ("succeeded", "word-count", "golden-host")
    assert ok.result is not None and unstage_value(store, ok.result.to_wire()) == {"words": 3, "chars": 18}
    assert ok.args is not None and unstage_value(store, ok.args.to_wire()) == (("hello golden world",), {})
    failed = records.get(IDS["user_error"])
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.type_name == "__main__.TooShort"
    assert type(rebuild_error(failed.error)).__name__ == "TooShort"
    provenance = read_provenance(store, IDS["ok"])
    assert provenance.function.name == "word-count" and provenance.determinism.reproducible
    refs = records.request(IDS["refs"])
    assert refs is not None and len(refs.args.refs) == 2
    (args, _) = unstage_value(store, refs.args.to_wire())
    assert args[1] == b"\x07" * 1100


def test_provenance_of_an_engine_call() -> None:
    record = runtime.ProvenanceRecord.model_validate_json(_read("records/ProvenanceRecord.json"))
    assert record.model is not None and record.model.name == "golden-llama"
    assert record.engine_calls[0].path == "/generate" and record.completion_tokens == 2
    assert record.determinism.greedy


def test_trigger_state_in_the_golden_store(store: runtime.LocalStore) -> None:
    from faas.triggers._state import TriggerState, event_from

    binding = registry.Bindings(store).get("golden-binding")
    dedup = MANIFEST["trigger"]["dedup_ids"]
    ok_id, bad_id = dedup["in/golden.txt"], dedup["in/bad.txt"]
    # The dedup id is wire too: a different formula would process every object again.
    assert binding.dedup_id("inbox", "in/golden.txt", '"golden-etag"') == ok_id
    assert binding.dedup_id("inbox", "in/bad.txt", "bad-etag") == bad_id
    assert binding.matches("in/golden.txt") and binding.output_key("in/golden.txt") == "out/golden.txt.out"

    state = TriggerState(store, binding.name)
    assert state.attempts() == {ok_id: 1, bad_id: 1}
    claim = state.read_claim(ok_id, 1)
    assert claim is not None and (claim.state, claim.runner, claim.key) == (
        "claimed",
        "golden-runner",
        "in/golden.txt",
    )
    failed = state.read_claim(bad_id, 1)
    assert failed is not None and failed.state == "failed" and failed.error is not None
    assert state.done_ids() == {ok_id} and state.is_settled(ok_id) and state.is_settled(bad_id)
    done = state.read_done(ok_id)
    assert done is not None
    assert (done["state"], done["output_key"], done["invocation_id"]) == (
        "done",
        "out/golden.txt.out",
        IDS["trigger"],
    )
    assert event_from(done["event"]) == claim.event("retry")
    (dead,) = state.dead_letters()
    assert dead["id"] == bad_id and dead["error"]["type"] == "TooShort"
    assert event_from(dead["event"]).key == "in/bad.txt"
    (retry,) = state.retries()
    assert retry["id"] == bad_id and event_from(retry["event"]) == event_from(dead["event"])


def test_plain_json_shapes() -> None:
    """Records without a model: their keys are what today's readers look up."""
    for entry in RECORDS:
        if entry["model"] == "alias":
            assert set(json.loads(_read(entry["file"]))) == {"version"}
    dispatch = json.loads(_read("records/cloud_dispatch.json"))
    assert set(dispatch) == {
        "store",
        "model_name",
        "model_param",
        "model_param_index",
        "model_modes",
        "timeout",
    }
