"""CLI commands for functions and invocations: deploy, ls, invoke, status, result, cancel, logs.

Every command goes through :func:`faas.get_client`, so it talks to a pool
service when ``FAAS_URL`` names one and to the store (with an embedded pool)
otherwise. With the embedded client, an invocation runs in the pool of the
``faas`` process itself: ``faas invoke --no-wait`` then ends it when the
command exits, and ``faas cancel`` only reaches invocations of the same process.

Exit codes: 0 success; 1 the invocation failed, was cancelled, or could not be
cancelled; 2 bad input or nothing found under the name or id; 3 the wait ran
out before the invocation finished.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from registry import FunctionSpec
from runtime import FaasError, ObjectNotFound

if TYPE_CHECKING:
    from faas._function import Function
    from faas._future import Future
    from faas.clients._embedded import Client
    from faas.clients._remote import RemoteClient

T = TypeVar("T")

_FINAL = frozenset({"succeeded", "failed", "cancelled"})
EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 1, 2, 3


def _out() -> Console:
    return Console(highlight=False)


def _err() -> Console:
    return Console(stderr=True, highlight=False)


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    _err().print(message, markup=False)
    return typer.Exit(code)


def _client() -> Client | RemoteClient:
    """The default client: the remote one when ``FAAS_URL`` is set, else the embedded one."""
    from faas.clients._default import get_client
    from faas.clients._embedded import Client
    from faas.clients._remote import RemoteClient

    client = get_client()
    if not isinstance(client, Client | RemoteClient):
        raise _fail(
            "This command needs a faas service ($FAAS_URL) or the embedded store; $FAAS_GC_ENDPOINT "
            "selects the Globus Compute cloud client, which cannot submit functions by name or list "
            "invocations."
        )
    return client


def _is_embedded(client: Client | RemoteClient) -> bool:
    from faas.clients._embedded import Client

    return isinstance(client, Client)


def _call(what: Callable[[], T]) -> T:
    """Run a client call, turning a FaasError into a message on stderr and exit code 2."""
    try:
        return what()
    except (ObjectNotFound, LookupError) as exc:  # NotFoundError, UnknownFunctionError
        raise _fail(str(exc)) from None
    except FaasError as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None


def _invocation(client: Client | RemoteClient, invocation_id: str) -> dict[str, Any]:
    """What is known about an invocation (an InvocationRecord or InvocationView) as a dict."""
    return client.invocation(invocation_id).model_dump(mode="json")


def _submit_by_name(client: Client | RemoteClient, name: str, kwargs: dict[str, Any]) -> Future[Any]:
    """Submit ``name(**kwargs)`` (``name``, ``name@version`` or a digest); return its future."""
    return client.submit_by_name(name, (), kwargs)


# -- helpers ----------------------------------------------------------------------------


def _when(ts: Any) -> str:
    return datetime.fromtimestamp(float(ts)).isoformat(sep=" ", timespec="seconds") if ts else "-"


def _short(digest: str) -> str:
    return digest[:12]


def _parse_value(text: str) -> Any:
    """A JSON value when ``text`` parses as one, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _build_kwargs(pairs: list[str], as_json: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if as_json is not None:
        try:
            loaded = json.loads(as_json)
        except ValueError as exc:
            raise _fail(f"--json is not valid JSON: {exc}.") from None
        if not isinstance(loaded, dict):
            raise _fail(f"--json must be a JSON object of keyword arguments; got {type(loaded).__name__}.")
        kwargs.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise _fail(f"--arg takes key=value with a Python identifier as key; got {pair!r}.")
        kwargs[key] = _parse_value(value)
    return kwargs


def _print_value(value: Any) -> None:
    """Print a result: strings as they are, JSON-able values as JSON, anything else as repr."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, indent=2)
        except (TypeError, ValueError):
            text = repr(value)
    typer.echo(text)


def _print_error(exc: BaseException) -> None:
    err = _err()
    err.print(f"Invocation failed: {type(exc).__name__}: {exc}", markup=False)
    remote_tb = getattr(exc, "remote_traceback", None) or getattr(exc, "traceback", None)
    if isinstance(remote_tb, str) and remote_tb:
        err.print(remote_tb.rstrip(), markup=False)


@contextmanager
def _waiting(description: str) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr (only on a terminal); yields a function that updates its text."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _err()
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda text: bar.update(task, description=text)


def _wait_future(future: Future[Any], invocation_id: str, timeout: float | None) -> Any:
    """Wait for ``future`` with a spinner showing its phase; return its value or raise its error."""
    import concurrent.futures

    deadline = None if timeout is None else time.monotonic() + timeout
    with _waiting(f"{invocation_id}: queued") as show:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError
            done, _ = concurrent.futures.wait([future], timeout=min(0.2, remaining or 0.2))
            if done:
                break
            show(f"{invocation_id}: {str(future.status()).replace('_', ' ')}")
    return future.result()


def _import_path(path: Path) -> ModuleType:
    """Import the Python file at ``path`` as a module whose functions pickle by value."""
    import cloudpickle

    if not path.is_file():
        raise _fail(f"No such file: {path}.")
    name = path.stem if path.stem.isidentifier() else "faas_deploy_module"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise _fail(f"Cannot import {path}: it is not a Python module file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))  # so it can import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise _fail(f"Importing {path} failed: {type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(ValueError):  # the module may have changed sys.path itself
            sys.path.remove(str(path.resolve().parent))
    # Workers cannot import this file by name: ship its functions' code in the artifact.
    cloudpickle.register_pickle_by_value(module)
    return module


# -- commands -----------------------------------------------------------------------------


def deploy(
    module: Annotated[Path, typer.Argument(help="A Python file defining @faas.function functions.")],
) -> None:
    """Register every @faas.function defined at module level in MODULE (a .py file)."""
    from faas._function import Function as FunctionType

    mod = _import_path(module)
    functions: list[Function[Any]] = []
    for value in vars(mod).values():
        if isinstance(value, FunctionType) and all(value is not f for f in functions):
            functions.append(value)
    if not functions:
        raise _fail(f"{module} defines no @faas.function at module level; nothing was registered.")
    client = _client()
    table = Table(title=f"registered from {module.name}")
    for col in ("name", "version", "model", "digest"):
        table.add_column(col, justify="right" if col == "version" else "left")
    for fn in functions:
        spec = _register(client, fn)
        table.add_row(spec.name, str(spec.version), spec.model or "-", _short(spec.digest))
    _out().print(table)


def _register(client: Client | RemoteClient, fn: Function[Any]) -> FunctionSpec:
    return _call(lambda: client.register(fn))


def ls(
    as_json: Annotated[bool, typer.Option("--json", help="Print the specs as JSON.")] = False,
) -> None:
    """List registered functions (the latest version of each)."""
    client = _client()
    specs = _call(client.list_functions)
    if as_json:
        typer.echo(json.dumps([s.model_dump(mode="json") for s in specs], indent=2))
        return
    if not specs:
        _err().print("No functions are registered; use `faas deploy module.py`.")
        return
    table = Table(title="functions")
    for col in ("name", "version", "model", "timeout", "retries", "digest", "registered"):
        table.add_column(col, justify="right" if col in ("version", "timeout", "retries") else "left")
    for s in specs:
        table.add_row(
            s.name,
            str(s.version),
            s.model or "-",
            "-" if s.timeout is None else f"{s.timeout:g} s",
            str(s.retries),
            _short(s.digest),
            _when(s.created_at),
        )
    _out().print(table)


def invoke(
    name: Annotated[str, typer.Argument(help="Function name (or name@version).")],
    arg: Annotated[
        list[str] | None,
        typer.Option("--arg", "-a", help="Keyword argument key=value (value parsed as JSON if it is JSON)."),
    ] = None,
    as_json: Annotated[
        str | None, typer.Option("--json", help="Keyword arguments as a JSON object, e.g. '{\"n\": 3}'.")
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the invocation id and return.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the result.")] = None,
) -> None:
    """Invoke a registered function by name with keyword arguments; print its result (or its id)."""
    kwargs = _build_kwargs(arg or [], as_json)
    client = _client()
    future = _call(lambda: _submit_by_name(client, name, kwargs))
    invocation_id = str(future.invocation_id)
    if no_wait:
        if _is_embedded(client):
            _err().print(
                "Note: FAAS_URL is not set, so this runs in this command's embedded pool and stops "
                "when the command exits; set FAAS_URL to run it on a service.",
                markup=False,
            )
        typer.echo(invocation_id)
        return
    _err().print(f"invocation {invocation_id}", markup=False)
    _finish(lambda: _wait_future(future, invocation_id, timeout), invocation_id, timeout)


def _finish(wait: Callable[[], Any], invocation_id: str, timeout: float | None) -> None:
    try:
        value = wait()
    except TimeoutError:
        raise _fail(
            f"Invocation {invocation_id} did not finish within {timeout:g} s; "
            f"it goes on: `faas result {invocation_id}` waits again.",
            EXIT_TIMEOUT,
        ) from None
    except (ObjectNotFound, LookupError) as exc:
        raise _fail(str(exc)) from None
    except Exception as exc:  # the invocation's own error, rebuilt
        _print_error(exc)
        raise typer.Exit(EXIT_FAILED) from None
    _print_value(value)


def status(
    invocation_id: Annotated[str, typer.Argument(help="The invocation id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
) -> None:
    """Show an invocation's state, function, times and worker."""
    client = _client()
    info = _call(lambda: _invocation(client, invocation_id))
    if as_json:
        info.pop("args", None)
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    table = Table(show_header=False, title=f"invocation {invocation_id}")
    table.add_column("field", style="bold")
    table.add_column("value")
    fields = [
        ("status", info.get("status")),
        ("function", f"{info.get('function_name', '')} ({_short(str(info.get('function_digest', '')))})"),
        ("model", info.get("model") or "-"),
        ("submitted", _when(info.get("submitted_at"))),
        ("started", _when(info.get("started_at"))),
        ("finished", _when(info.get("finished_at"))),
        ("attempt", info.get("attempt")),
        (
            "worker",
            f"{info.get('worker_host')} pid {info.get('worker_pid')}" if info.get("worker_pid") else None,
        ),
    ]
    error = info.get("error") or (info.get("result") or {}).get("error")
    if error:
        fields.append(("error", f"{error.get('kind')}: {error.get('type_name')}: {error.get('message')}"))
    for key, value in fields:
        if value is not None:
            table.add_row(key, str(value))
    _out().print(table)
    if error and error.get("traceback"):
        _err().print(str(error["traceback"]).rstrip(), markup=False)


def result(
    invocation_id: Annotated[str, typer.Argument(help="The invocation id.")],
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait (default: until it finishes).")
    ] = None,
) -> None:
    """Wait for an invocation and print its value (exit 1 if it failed, 3 if the wait ran out)."""
    client = _client()
    future = _call(lambda: client.attach(invocation_id))
    _finish(lambda: _wait_future(future, invocation_id, timeout), invocation_id, timeout)


def cancel(invocation_id: Annotated[str, typer.Argument(help="The invocation id.")]) -> None:
    """Cancel an invocation, also a running one (exit 1 if it had finished or is unknown here)."""
    client = _client()
    if _call(lambda: client.cancel(invocation_id)):
        _out().print(f"Cancelled invocation {invocation_id}.", markup=False)
        return
    state = _call(lambda: _invocation(client, invocation_id)).get("status", "unknown")
    reason = (
        f"it is {state}"
        if state in _FINAL
        else f"it is {state}, but in a pool this client does not reach (another process's embedded pool)"
    )
    raise _fail(f"Invocation {invocation_id} was not cancelled: {reason}.", EXIT_FAILED)


def logs(invocation_id: Annotated[str, typer.Argument(help="The invocation id.")]) -> None:
    """Print what an invocation wrote to stdout and stderr (kept once it has finished)."""
    client = _client()
    text = _call(lambda: client.logs(invocation_id))
    if text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return
    info = _call(lambda: _invocation(client, invocation_id))
    if info.get("status") not in _FINAL:
        _err().print(
            f"Invocation {invocation_id} is {info.get('status')}; its output is kept when it finishes."
        )
    else:
        _err().print(f"Invocation {invocation_id} printed nothing.")


COMMANDS: dict[str, Callable[..., None]] = {
    "deploy": deploy,
    "ls": ls,
    "invoke": invoke,
    "status": status,
    "result": result,
    "cancel": cancel,
    "logs": logs,
}


def register_commands(app: typer.Typer) -> None:
    """Add ``deploy``, ``ls``, ``invoke``, ``status``, ``result``, ``cancel`` and ``logs`` to ``app``."""
    for name, command in COMMANDS.items():
        app.command(name)(command)


__all__ = ["COMMANDS", "register_commands"]
