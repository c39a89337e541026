"""Write the golden wire and pickle artifacts into ``tests/golden/data/`` from the current code.

Run once, commit the output, and never regenerate it casually (see README.md):
``python -m tests.golden.make_golden --force`` replaces goldens that stand for
artifacts already stored in users' object stores.

What it writes:

- ``store/``: a LocalStore as the system lays it out: three registered function
  artifacts (from ``user_script.py``, run as ``__main__``), their specs, a model
  spec, a trigger binding, staged objects (``pickle`` and ``bytes`` encodings),
  invocation records with provenance, and a trigger binding's claims, done
  marker, dead letter and retry request.
- ``errors/*.tpmf``: the exception pickles that ``ErrorInfo.exception`` carries.
- ``values/*``: values as they travel (arguments, results, ObjectRef, Ref,
  GenerateResult, ChatResult, a staged-value marker).
- ``records/*.json``: JSON of the wire models not already in ``store/``.
- ``gc/*.txt``: the Globus Compute task functions as their serializer sends them.
- ``manifest.json``: what each file is, the public class it must load as, its
  fields, and the ``(module, qualname)`` globals each pickle names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.golden._golden import DATA, describe, pickle_globals, pickle_stream

HERE = Path(__file__).resolve().parent
SCRIPT = "user_script.py"
T0 = 1_750_000_000.0
STORE_ROOT = "/golden/store"
"""Written where records name the store's root; tests put their copy of ``store/`` there."""

ID_OK = "901d0000000000000000000000000001"
ID_USER_ERROR = "901d0000000000000000000000000002"
ID_ENGINE = "901d0000000000000000000000000003"
ID_TRIGGER = "901d0000000000000000000000000004"
ID_REFS = "901d0000000000000000000000000005"
TRIGGER_TEXT = "hello golden world\n"


def _run_user_script() -> dict[str, Any]:
    """Run ``user_script.py`` as ``__main__`` from this directory, as ``python user_script.py`` would."""
    code = compile((HERE / SCRIPT).read_text(), SCRIPT, "exec", dont_inherit=True)  # no __future__ here
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": SCRIPT}
    exec(code, namespace)
    return namespace


def _store_config(sub: str = "") -> dict[str, Any]:
    return {"kind": "file", "options": {"root": STORE_ROOT + (f"/{sub}" if sub else "")}}


def _exceptions(user: dict[str, Any]) -> list[tuple[str, str | None, BaseException]]:
    """``(ErrorInfo kind, public module, exception)``; module None: a user class pickled by value."""
    import faas
    import registry
    import warmpool

    return [
        ("worker_lost", "faas", faas.WorkerLost("The worker died (exit -9).")),
        ("engine_lost", "faas", faas.EngineLost("The engine is unreachable.")),
        ("timeout", "faas", faas.InvocationTimeout("Ran past its timeout of 5 s.")),
        ("cancelled", "faas", faas.InvocationCancelled("The invocation was cancelled.")),
        ("system", "faas", faas.InvocationError("Failed.")),
        ("system", "warmpool", warmpool.BackPressureError("The queue is full.")),
        ("system", "faas", faas.BindingError("Binding 'b' is malformed.")),
        ("system", "registry", registry.UnknownBindingError("No binding 'b'.")),
        ("system", "registry", registry.UnknownFunctionError("No function 'f'.")),
        ("system", "faas", faas.UnknownModelError("Unknown model 'm'.")),
        ("user", "faas", faas.UnsupportedFeatureError("No regex.")),
        ("user", "faas", faas.ModeNotAllowedError("No encode.")),
        ("user", "faas", faas.EngineError("The engine answered 500.")),
        ("system", "faas", faas.IntegrityError("Digest mismatch.")),
        ("system", "faas", faas.StoreError("The store failed.")),
        ("user", "faas", faas.ObjectNotFound("No object 'k'.")),
        ("system", "faas", faas.ObjectExists("'k' is taken.")),
        ("system", "faas", faas.StoreAuthError("Access denied.")),
        ("system", "faas", faas.SerializationError("Cannot pickle.")),
        ("user", "faas", faas.SubmitError("Bad input.")),
        ("system", "faas", faas.QuotaExceededError("Quota full.")),
        ("user", "faas", faas.FunctionDefinitionError("Not a function.")),
        ("system", "faas", faas.PoolClosedError("The pool is closed.")),
        ("system", "faas", faas.FaasError("Something failed.")),
        ("user", "faas", faas.ServiceError("Unavailable.", 503)),
        ("user", "faas", faas.AuthError("Bad token.", 401)),
        ("user", "faas", faas.NotFoundError("No such id.", 404)),
        ("user", "faas", faas.GlobusComputeConfigError("Not configured.")),
        ("user", "faas", faas.RemoteError("mod.Bad", "bad", "Traceback: ...")),
        ("user", "builtins", ValueError("a user ValueError")),
        ("user", None, user["TooShort"]("no words")),
    ]


class Golden:
    """Collects the golden files and their manifest entries while they are written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pickles: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []

    def write(self, rel: str, data: bytes) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rel

    def pickle(self, rel: str, fmt: str, what: str, data: bytes | None = None, **entry: Any) -> None:
        """Record a pickle (writing ``data`` to ``rel`` first, unless the system wrote it there)."""
        if data is not None:
            self.write(rel, data)
        stream = pickle_stream((self.root / rel).read_bytes(), fmt)
        found = sorted(f"{m}:{q}" for m, q in pickle_globals(stream))  # "module:" is a module
        self.pickles.append({"file": rel, "format": fmt, "what": what, **entry, "globals": found})

    def record(self, rel: str, model: str, text: str | None = None, **entry: Any) -> None:
        """Record a JSON record (writing ``text`` to ``rel`` first, unless the system wrote it there)."""
        if text is not None:
            self.write(rel, text.encode())
        self.records.append({"file": rel, "model": model, **entry})


def generate(root: Path) -> None:
    """Write every golden artifact under ``root``."""
    import faas
    from faas.clients._gc_cloud import run_cloud_invocation
    from faas.service._api import InvocationView, ResultView, SubmitRequest
    from faas.triggers._buckets import ObjectEvent
    from faas.triggers._state import Claim, TriggerState
    from faas.triggers._work import Committer
    from registry import Bindings, ModelSpec, Registry, TriggerBinding
    from runtime import _serde
    from runtime._execute import error_info, execute
    from runtime._model_results import ChatResult, GenerateResult
    from runtime._policy import call_record
    from runtime._records import RecordStore
    from runtime._staging import Ref, stage_args, stage_object, stage_value
    from runtime._store import LocalStore
    from runtime._wire import Invocation, OutputTarget, Result
    from warmpool import build_provenance
    from warmpool._runner import Dispatch
    from warmpool.globus_compute.task import run_invocation

    golden = Golden(root)
    store = LocalStore(root / "store")
    reg = Registry(store)

    # -- function artifacts: exactly as a client registers them (Function.bundle, register_function) --
    with contextlib.chdir(HERE):  # bundle_function records the source file's path as the function names it
        user = _run_user_script()
        functions = {
            "word-count": user["counter"],
            "summarise": faas.function(model="golden-llama@1", timeout=30, name="summarise")(
                user["summarise"]
            ),
            "convert": faas.function(name="convert", retries=1)(user["convert"]),
        }
        specs = {}
        for name, fn in functions.items():
            artifact, spec = fn.bundle()
            specs[name] = reg.register_function(artifact, spec.model_copy(update={"created_at": T0}))
    for name, spec in specs.items():
        rel = f"store/registry/artifacts/{spec.digest}"
        golden.pickle(rel, "tpmf", "function", name=name, digest=spec.digest, qualname=spec.qualname)
        golden.record(f"store/registry/functions/{name}/versions/000001.json", "FunctionSpec")
        golden.record(f"store/registry/digests/{spec.digest}.json", "FunctionSpec")
        golden.record(f"store/registry/functions/{name}/aliases/latest.json", "alias")

    model = reg.register_model(
        ModelSpec(
            name="golden-llama", version="1", engine="cpu", engine_args={"context_length": 256},
            min_replicas=1, max_replicas=2, modes=["generate", "logprobs"], weights_digest="ab" * 32,
        )
    )  # fmt: skip
    golden.record("store/registry/models/golden-llama/versions/1.json", "ModelSpec")
    golden.record("store/registry/models/golden-llama/aliases/latest.json", "alias")

    binding = Bindings(store).put(
        TriggerBinding(
            name="golden-binding", function="convert", function_version=specs["convert"].version,
            function_digest=specs["convert"].digest, storage="file", bucket="inbox", prefix="in/",
            suffix=".txt", output_prefix="out/", output_bucket="outbox", created_at=T0,
        )
    )  # fmt: skip
    golden.record("store/registry/triggers/golden-binding.json", "TriggerBinding")

    # -- staged values (faas.put, spilled arguments, a staged return value) and values on the wire --
    put_ref = Ref(
        stage_object(store, {"table": [[1, 2], [3, 4]], "label": "golden"}, what="value passed to faas.put")
    )
    put_staged = put_ref.staged.model_dump(mode="json")
    golden.pickle("store/" + put_ref.key, "pickle", "staged", ref=put_staged)
    where = faas.ObjectRef("inbox", "in/golden.txt", etag="golden-etag", size=len(TRIGGER_TEXT))
    refs_args, refs = stage_args(  # the faas.put Ref, a spilled bytes argument, an ObjectRef: inline
        store, (put_ref, b"\x07" * 1100), {"where": where}, threshold=1024, what="'word-count'"
    )
    spilled = next(r for r in refs if r.encoding == "bytes")
    golden.records.append(
        {"file": "store/" + spilled.key, "model": "staged-bytes", "ref": spilled.model_dump(mode="json")}
    )
    marker = stage_value(store, {"text": "golden " * 40}, 64, what="return value of 'word-count'")
    golden.write("values/result_marker.tpmr", marker)
    staged_result = marker[4:]
    ref_json = json.loads(staged_result)
    golden.pickle("store/" + ref_json["key"], "pickle", "staged", ref=ref_json)

    trigger_args = _serde.dumps(((where,), {}), what="trigger arguments of 'golden-binding'")

    # -- invocations, run for real where they can be, and their records --
    records = RecordStore(store)
    wc = specs["word-count"]

    def invocation(spec_name: str, id: str, args: bytes, **kw: Any) -> Invocation:
        spec = specs[spec_name]
        inv = spec.invocation(
            args, model=kw.pop("model", None), store=_store_config(), stage_threshold=None, id=id, **kw
        )
        return inv.model_copy(update={"submitted_at": T0})

    def fixed(result: Result, spec_name: str, inv: Invocation, model_spec: Any = None) -> Result:
        result = result.model_copy(
            update={
                "worker_pid": 4242,
                "worker_host": "golden-host",
                "started_at": T0 + 1,
                "finished_at": T0 + 2,
            }
        )
        result.provenance = build_provenance(inv, specs[spec_name], model_spec, result).model_dump(
            mode="json"
        )
        return result

    inv_ok = invocation("word-count", ID_OK, _serde.dumps((("hello golden world",), {})))
    fn = reg.load_function(wc.digest)
    result_ok = fixed(execute(inv_ok, fn, store=store), "word-count", inv_ok)
    assert result_ok.ok, result_ok.error
    inv_err = invocation("word-count", ID_USER_ERROR, _serde.dumps((("   ",), {})))
    result_err = fixed(execute(inv_err, fn, store=store), "word-count", inv_err)
    assert result_err.error is not None and result_err.error.kind == "user", result_err
    for inv, res in ((inv_ok, result_ok), (inv_err, result_err)):
        records.write_request(inv)
        records.write_result(res)
        golden.record(
            f"store/invocations/{inv.id}/request.json", "RequestRecord", dump={"exclude_none": True}
        )
        golden.record(f"store/invocations/{inv.id}/result.json", "ResultRecord", dump={"exclude_none": True})
    golden.record("records/Invocation.json", "Invocation", inv_ok.model_dump_json())
    golden.record("records/Result.json", "Result", result_ok.model_dump_json())
    golden.record("records/Result_user_error.json", "Result", result_err.model_dump_json())
    assert result_err.error is not None
    golden.record("records/ErrorInfo.json", "ErrorInfo", result_err.error.model_dump_json())
    golden.record("records/InvocationRecord.json", "InvocationRecord", records.get(ID_OK).model_dump_json())

    inv_engine = invocation("summarise", ID_ENGINE, _serde.dumps((("the sky",), {"n": 2})), model=model.ref)
    body = {"text": "golden: the sky", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    body["rid"] = f"inv-{ID_ENGINE}-0-0"
    answer = {"text": " is", "meta_info": {"prompt_tokens": 4, "completion_tokens": 2, "e2e_latency": 0.01}}
    call = {**call_record("/generate", body, answer, T0 + 1), "wall_seconds": 0.02}
    result_engine = Result(
        invocation_id=ID_ENGINE, value=_serde.dumps(" is blue"), attempt=0, engine_calls=[call],
        queue_seconds=0.5, cold_start_seconds=12.0,
        engine={"kind": "cpu", "version": "0.1.0", "args": {"context_length": 256}, "url": "http://127.0.0.1:30000"},
    )  # fmt: skip
    result_engine = fixed(result_engine, "summarise", inv_engine, model)
    golden.record("records/Result_engine.json", "Result", result_engine.model_dump_json())
    golden.record("records/ProvenanceRecord.json", "ProvenanceRecord", json.dumps(result_engine.provenance))
    dispatch = Dispatch(
        invocation=inv_engine, model_name=model.ref, model_param="model", model_param_index=0,
        model_modes=frozenset(model.modes), deadline=T0 + 30,
    )  # fmt: skip
    golden.record("records/Dispatch.json", "Dispatch", dispatch.model_dump_json())
    cloud_dispatch = {  # as GlobusComputeCloudClient builds it for run_cloud_invocation
        "store": None, "model_name": None, "model_param": wc.model_param,
        "model_param_index": wc.model_param_index, "model_modes": None, "timeout": wc.timeout,
    }  # fmt: skip
    golden.record("records/cloud_dispatch.json", "cloud_dispatch", json.dumps(cloud_dispatch))

    # The trigger invocation: the worker writes the output; its result is the report.
    state = TriggerState(store, binding.name)
    dedup = binding.dedup_id(binding.bucket, where.key, "golden-etag")
    output = OutputTarget(
        store=_store_config("outbox"), bucket="outbox", key=binding.output_key(where.key),
        base=binding.output_prefix + binding.relative_name(where.key), done_key=state.done_key(dedup),
        source=_store_config("inbox"), source_key=where.key, source_etag="golden-etag",
    )  # fmt: skip
    inv_trigger = invocation("convert", ID_TRIGGER, trigger_args, output=output)
    golden.record("records/Invocation_trigger.json", "Invocation", inv_trigger.model_dump_json())
    with tempfile.TemporaryDirectory(prefix="faas-golden-live-") as live_dir:
        # Run it where the records say the store is (STORE_ROOT), as the tests will.
        live = LocalStore(live_dir)
        (live.root / "inbox/in").mkdir(parents=True)
        (live.root / "inbox/in/golden.txt").write_text(TRIGGER_TEXT)
        inv_live = Invocation.model_validate_json(inv_trigger.model_dump_json().replace(STORE_ROOT, live_dir))
        ran = execute(inv_live, reg.load_function(binding.function_digest), store=live)
        assert ran.ok and ran.value is not None, ran.error
        assert (live.root / "outbox" / output.key).read_text() == TRIGGER_TEXT.upper()
    golden.record(
        "records/Result_trigger.json", "Result", fixed(ran, "convert", inv_trigger).model_dump_json()
    )

    inv_refs = invocation("word-count", ID_REFS, refs_args, refs=refs)
    golden.record("records/Invocation_refs.json", "Invocation", inv_refs.model_dump_json())
    records.write_request(inv_refs)
    golden.record(f"store/invocations/{ID_REFS}/request.json", "RequestRecord", dump={"exclude_none": True})
    golden.record("records/StagedRef.json", "StagedRef", put_ref.staged.model_dump_json())

    # -- trigger state: claims, a done marker, a dead letter, a retry request (as the runner writes them)
    committer = Committer("golden-runner", lambda: T0 + 5)
    event = ObjectEvent(binding.bucket, where.key, "golden-etag", len(TRIGGER_TEXT), T0, origin="listing")
    run = SimpleNamespace(binding=binding, state=state)
    item = SimpleNamespace(
        id=dedup, event=event, attempt=1, failures=0, started=T0 + 1,
        future=SimpleNamespace(invocation_id=ID_TRIGGER), claimed=False, claimed_at=0.0,
    )  # fmt: skip
    assert committer.claim(run, item) is True  # type: ignore[arg-type]
    assert committer.commit(run, item, _serde.loads(ran.value))[0] == "done"  # type: ignore[arg-type]
    bad = ObjectEvent(binding.bucket, "in/bad.txt", "bad-etag", 0, T0, origin="notification")
    bad_id = binding.dedup_id(binding.bucket, bad.key, bad.etag)
    bad_item = SimpleNamespace(id=bad_id, event=bad, attempt=1, failures=0, claimed=False, claimed_at=0.0)
    assert committer.claim(run, bad_item) is True  # type: ignore[arg-type]
    error = {"type": "TooShort", "message": "no words", "traceback": "Traceback (most recent call last): ..."}
    failed = Claim(
        id=bad_id, attempt=1, runner="golden-runner", state="failed", failures=1, claimed_at=T0 + 5,
        updated_at=T0 + 6, bucket=bad.bucket, key=bad.key, etag=bad.etag, size=bad.size,
        event_time=bad.event_time, origin=bad.origin, error=error,
    )  # fmt: skip
    state.update_claim(failed)
    bad_item.failures = 1
    dead = committer.dead_letter(run, bad_item, error, T0 + 6)  # type: ignore[arg-type]
    state.request_retry(dead)
    prefix = f"store/triggers/bindings/{binding.name}"
    golden.record(f"{prefix}/seen/{dedup}", "Claim")
    golden.record(f"{prefix}/seen/{bad_id}", "Claim")
    golden.record(f"{prefix}/done/{dedup}", "done")
    golden.record(f"{prefix}/dead/{bad_id}.json", "dead")
    golden.record(f"{prefix}/retry/{bad_id}.json", "retry")

    # -- the service's HTTP contract (client and service may run different versions) --
    view = InvocationView(
        id=ID_USER_ERROR, status="failed", function_name="word-count", function_digest=wc.digest,
        submitted_at=T0, finished_at=T0 + 2,
        result=ResultView(id=ID_USER_ERROR, status="failed", error=result_err.error),
    )  # fmt: skip
    golden.record("records/InvocationView.json", "InvocationView", view.model_dump_json())
    submit = SubmitRequest(function="convert@1", args=trigger_args, refs=[put_ref.staged], wait=1.5)
    golden.record("records/SubmitRequest.json", "SubmitRequest", submit.model_dump_json())

    # -- value and exception pickles --
    generate_result = GenerateResult.from_json(
        {
            "text": " world",
            "output_ids": [11, 12],
            "meta_info": {
                "id": "golden-1", "finish_reason": {"type": "length", "length": 2}, "prompt_tokens": 3,
                "completion_tokens": 2, "e2e_latency": 0.01,
                "output_token_logprobs": [[-0.5, 11, None], [-1.25, 12, None]],
            },
        }
    )  # fmt: skip
    chat_result = ChatResult("hi", "stop", 5, 1, matched_stop=2, tokens=["hi"], response={"id": "c-1"})
    values: list[tuple[str, str, Any, bytes]] = [
        ("ObjectRef", "faas.ObjectRef", where, _serde.dumps(where)),
        ("Ref", "faas.Ref", put_ref, _serde.dumps(put_ref)),
        ("args_trigger", "builtins.tuple", ((where,), {}), trigger_args),
        ("args_refs", "builtins.tuple", None, refs_args),
        ("report", "builtins.dict", None, ran.value),
        ("GenerateResult", "faas.GenerateResult", generate_result, _serde.dumps(generate_result)),
        ("ChatResult", "faas.ChatResult", chat_result, _serde.dumps(chat_result)),
    ]
    for stem, cls, original, data in values:
        expect = describe(original if original is not None else _serde.loads(data))
        golden.pickle(f"values/{stem}.tpmf", "tpmf", "value", data, **{"class": cls, "expect": expect})
    for kind, module, exc in _exceptions(user):
        stem = type(exc).__name__
        info = error_info(exc, kind, with_traceback=False)
        assert info.exception is not None, stem
        cls = f"{module}.{stem}" if module else None
        entry = {"class": cls, "class_name": stem, "kind": kind, "type_name": info.type_name}
        entry.update(message=info.message, expect=describe(exc))
        golden.pickle(f"errors/{stem}.tpmf", "tpmf", "exception", info.exception, **entry)

    # -- the Globus Compute task functions, as their serializers send them (by module and name) --
    from globus_compute_sdk.serialize import ComputeSerializer, DillCode

    engine_serde = ComputeSerializer(strategy_code=DillCode())  # warmpool.globus_compute._engine.ModelEngine
    cloud_serde = ComputeSerializer()  # the SDK Executor's default (globus_compute_sdk.Client)
    for stem, serde, task, name in (
        ("run_invocation", engine_serde, run_invocation, "warmpool.globus_compute.task.run_invocation"),
        (
            "run_cloud_invocation",
            cloud_serde,
            run_cloud_invocation,
            run_cloud_invocation.__module__ + ".run_cloud_invocation",
        ),
    ):
        golden.pickle(f"gc/{stem}.txt", "gc", "gc_task", serde.serialize(task).encode(), function=name)

    manifest = {
        "note": "Golden artifacts: never regenerate casually (tests/golden/README.md).",
        "generated_from": _git_head(),
        "python": platform.python_version(),
        "packages": _versions("cloudpickle", "pydantic", "numpy", "dill", "globus-compute-sdk"),
        "store_root": STORE_ROOT,
        "trigger": {"text": TRIGGER_TEXT, "dedup_ids": {where.key: dedup, bad.key: bad_id}},
        "ids": dict(ok=ID_OK, user_error=ID_USER_ERROR, engine=ID_ENGINE, trigger=ID_TRIGGER, refs=ID_REFS),
        "pickles": golden.pickles,
        "records": golden.records,
    }  # fmt: skip
    golden.write("manifest.json", (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the goldens to ``--out``, or replace the committed ones (only with ``--force``)."""
    parser = argparse.ArgumentParser(prog="python -m tests.golden.make_golden", description=__doc__)
    parser.add_argument("--out", type=Path, help="write to this new directory instead (to compare or add)")
    parser.add_argument("--force", action="store_true", help="replace the committed goldens in data/")
    args = parser.parse_args(argv)
    target: Path = args.out or DATA
    if target.exists() and not (args.force and target == DATA):
        hint = "pass --force to replace the committed goldens" if target == DATA else "choose a new directory"
        print(f"{target} exists: {hint}.", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="faas-golden-") as tmp:
        out = Path(tmp) / "data"
        generate(out)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out, target)
    print(f"wrote {sum(1 for p in target.rglob('*') if p.is_file())} files to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
