"""Object-store triggers: bind a function to new objects under a bucket prefix.

```python
@faas.function()
def summarise(ref: faas.ObjectRef) -> dict:
    return {"lines": sum(1 for _ in ref.lines())}

summarise.on_object(bucket="beamline", prefix="raw/", suffix=".csv", output_prefix="summaries/")
```

The function receives a :class:`faas.ObjectRef` for each new object version and
its return value is written to ``output_prefix + <name> + output_suffix``
(bytes as they are, str as UTF-8, anything else as JSON; None writes nothing).
A parameter annotated :class:`Outputs` receives a handle for writing further
outputs. A :class:`faas.triggers.TriggerRunner` runs the bindings; ``faas serve``
runs those of its tenants (bindings made through a :class:`faas.RemoteClient`).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from faas.triggers._state import TriggerState
from registry import Bindings, FunctionSpec, TriggerBinding, make_binding
from runtime import BindingError, ObjectRef, ObjectStore, outputs_parameter

# Written by the worker inside the invocation; re-exported here, where they were first defined.
from runtime import Outputs as Outputs
from runtime import encode_output as encode_output
from runtime import stored_digest as stored_digest

if TYPE_CHECKING:
    from faas._function import Function

_PLACEHOLDER_DIGEST = "0" * 64


def check_trigger_function(function: Function[Any]) -> str | None:
    """Check that ``function`` can be called with one ObjectRef; return its Outputs parameter.

    Raises:
        BindingError: It cannot.
    """
    param = outputs_parameter(function.fn)
    probe = ObjectRef("bucket", "key")
    try:
        function.check_arguments((probe,), {param: None} if param else {})
    except Exception as exc:
        raise BindingError(
            f"{function.name} cannot be a trigger function: it must take the ObjectRef as its one "
            f"positional argument (plus an optional parameter annotated faas.Outputs) ({exc})"
        ) from None
    return param


def create_binding(
    store: ObjectStore,
    spec: FunctionSpec,
    *,
    name: str | None = None,
    reprocess: bool = False,
    **options: Any,
) -> TriggerBinding:
    """Store a binding of the registered function ``spec`` (a new one, or a new revision).

    Args:
        store: The faas store.
        spec: The function version to run.
        name: Binding name (default: the function's name).
        reprocess: When the binding exists with another function digest, process
            every object again instead of only the ones not yet done.
        options: :class:`TriggerBinding` fields (bucket, prefix, suffix, output_prefix, ...).

    Raises:
        BindingError: The binding is malformed.
    """
    fields = _fields(store, name or spec.name, options)
    bindings = Bindings(store)
    current = next((b for b in bindings.list() if b.name == fields["name"]), None)
    previous: list[str] = []
    if current is not None and not reprocess:
        previous = current.previous_digests if current.function_digest == spec.digest else current.digests
    binding = make_binding(
        **fields,
        function=spec.name,
        function_version=spec.version,
        function_digest=spec.digest,
        previous_digests=previous,
        paused=current.paused if current else False,
    )
    return bindings.put(binding)


def _fields(store: ObjectStore, name: str, options: dict[str, Any]) -> dict[str, Any]:
    known = set(TriggerBinding.model_fields) - {"function", "function_version", "function_digest"}
    known -= {"previous_digests", "paused", "created_at", "updated_at", "revision", "name"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BindingError(f"Unknown trigger binding options {unknown}; the options are {sorted(known)}.")
    fields = {k: v for k, v in options.items() if v is not None}
    config = store.config()
    fields.setdefault("storage", "file" if config["kind"] == "file" else "s3")
    if fields["storage"] == "s3" and config["kind"] == "s3":
        store_options = config["options"]
        for opt in ("endpoint_url", "region", "path_style"):
            if store_options.get(opt) is not None:
                fields.setdefault(opt, store_options[opt])
    fields.setdefault("poll_interval", 60.0 if fields.get("queue_url") else 5.0)
    if isinstance(fields.get("bucket"), str):
        fields["bucket"] = re.sub(r"^s3://", "", fields["bucket"]).rstrip("/")
    return {"name": name, **fields}


def bind_function(
    function: Function[Any], *, name: str | None = None, reprocess: bool = False, **options: Any
) -> TriggerBinding:
    """Implementation of :meth:`faas.Function.on_object` (validates, then registers)."""
    client = function.client
    fields = _fields(client.store, name or function.name, options)
    make_binding(**fields, function=function.name, function_version=0, function_digest=_PLACEHOLDER_DIGEST)
    check_trigger_function(function)
    spec = client.register(function)
    from faas.clients._remote import RemoteClient

    if isinstance(client, RemoteClient):  # the service stores it in the tenant's scope and runs it
        return client.bind_trigger(spec, name=name or function.name, reprocess=reprocess, **options)
    return create_binding(client.store, spec, name=name or function.name, reprocess=reprocess, **options)


def failed(store: ObjectStore, binding: str) -> list[dict[str, Any]]:
    """The dead letters of ``binding``, oldest first."""
    Bindings(store).get(binding)
    return TriggerState(store, binding).dead_letters()


def retry(store: ObjectStore, binding: str, keys: list[str] | None = None) -> list[dict[str, Any]]:
    """Queue dead letters of ``binding`` for another try (all of them, or those of ``keys``).

    Returns:
        The dead letters that were queued.
    """
    state = TriggerState(store, binding)
    chosen = [d for d in failed(store, binding) if keys is None or d["event"]["key"] in keys]
    for doc in chosen:
        state.request_retry(doc)
    return chosen
