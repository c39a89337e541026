"""``faas triggers ...``: bind functions to buckets, watch them, handle failures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

triggers_app = typer.Typer(
    help="Object-store triggers: run a function once for every new object.", no_args_is_help=True
)

StoreOpt = Annotated[str | None, typer.Option(help="Store URL (default: $FAAS_STORE or the cache).")]


def _store(url: str | None) -> Any:
    from runtime import default_store_url, store_from_url

    return store_from_url(url or default_store_url())


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"Error: {exc}", err=True)
    return typer.Exit(2)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def summary(store: Any, max_age: float = 30.0) -> list[dict[str, Any]]:
    """Every binding with the merged metrics of the runners that reported recently."""
    from faas.triggers._state import TriggerState
    from registry import Bindings

    out = []
    for b in Bindings(store).list():
        state = TriggerState(store, b.name)
        statuses = state.statuses(max_age=max_age)
        lag50 = [s["lag_p50"] for s in statuses if s.get("lag_p50") is not None]
        lag95 = [s["lag_p95"] for s in statuses if s.get("lag_p95") is not None]
        out.append(
            {
                "name": b.name,
                "function": f"{b.function}@{b.function_version}",
                "source": f"{b.bucket}/{b.prefix}*{b.suffix}",
                "output": f"{b.out_bucket}/{b.output_prefix}",
                "mode": "sqs+poll" if b.queue_url else "poll",
                "paused": b.paused,
                "runners": len(statuses),
                "backlog": max((s["backlog"] for s in statuses), default=None),
                "oldest_unprocessed_age": max((s["oldest_unprocessed_age"] for s in statuses), default=None),
                "inflight": sum(s["inflight"] for s in statuses),
                "max_concurrency": b.max_concurrency,
                "done": sum(s["counters"].get("done", 0) for s in statuses),
                "failed": len(state.dead_ids()),
                "lag_p50": max(lag50, default=None),
                "lag_p95": max(lag95, default=None),
            }
        )
    return out


@triggers_app.command("ls")
def ls(
    store: StoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    max_age: Annotated[float, typer.Option(help="Ignore runner reports older than this (s).")] = 30.0,
) -> None:
    """List bindings with backlog, oldest unprocessed age, in-flight count, failures and lag."""
    rows = summary(_store(store), max_age)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("No trigger bindings.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "function", "source", "output", "mode", "state", "backlog", "oldest", "inflight")
    for col in ("done", "failed", "lag p50", "lag p95"):
        table.add_column(col)
    for r in rows:
        state = "paused" if r["paused"] else ("running" if r["runners"] else "no runner")
        backlog = "-" if r["backlog"] is None else str(r["backlog"])
        inflight = f"{r['inflight']}/{r['max_concurrency']}"
        table.add_row(
            r["name"], r["function"], r["source"], r["output"], r["mode"], state, backlog,
            _age(r["oldest_unprocessed_age"]), inflight, str(r["done"]), str(r["failed"]),
            _age(r["lag_p50"]), _age(r["lag_p95"]),
        )  # fmt: skip
    Console(width=200).print(table)


@triggers_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Binding name.")],
    function: Annotated[str, typer.Option(help="Registered function: name, name@version or digest.")],
    bucket: Annotated[str, typer.Option(help="S3 bucket (or directory for a file store).")],
    output_prefix: Annotated[str, typer.Option(help="Where outputs go (outside the input prefix).")],
    prefix: Annotated[str, typer.Option(help="Input key prefix.")] = "",
    suffix: Annotated[str, typer.Option(help="Input key suffix, e.g. .h5")] = "",
    output_suffix: Annotated[str, typer.Option(help="Appended to output names.")] = ".out",
    queue_url: Annotated[str | None, typer.Option(help="SQS queue receiving notifications.")] = None,
    poll_interval: Annotated[float | None, typer.Option(help="Seconds between listings.")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Invocations in flight at once.")] = 8,
    max_attempts: Annotated[int, typer.Option(help="Attempts before dead-lettering.")] = 3,
    store: StoreOpt = None,
) -> None:
    """Bind a registered function to a bucket prefix."""
    options = {
        "bucket": bucket, "prefix": prefix, "suffix": suffix, "output_prefix": output_prefix,
        "output_suffix": output_suffix, "queue_url": queue_url, "poll_interval": poll_interval,
        "max_concurrency": max_concurrency, "max_attempts": max_attempts,
    }  # fmt: skip
    _create(_store(store), {"name": name, "function": function, **options})


def _create(store: Any, entry: dict[str, Any]) -> None:
    from faas.triggers._binding import create_binding
    from registry import Registry
    from runtime import SubmitError

    entry = dict(entry)
    try:
        spec = Registry(store).get_function(str(entry.pop("function")))
        binding = create_binding(store, spec, name=entry.pop("name", None), **entry)
    except SubmitError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"{binding.name}: {binding.function}@{binding.function_version} on {binding.bucket}/{binding.prefix}"
    )


@triggers_app.command("apply")
def apply(
    path: Annotated[Path, typer.Argument(help="A JSON or TOML file with a list of bindings ([[trigger]]).")],
    store: StoreOpt = None,
) -> None:
    """Create or update the bindings described in a config file."""
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        entries = tomllib.loads(text).get("trigger", [])
    else:
        doc = json.loads(text)
        entries = doc if isinstance(doc, list) else doc.get("triggers", [])
    target = _store(store)
    for entry in entries:
        _create(target, entry)


def _set_paused(name: str, paused: bool, store: str | None) -> None:
    from registry import Bindings
    from runtime import UnknownBindingError

    try:
        Bindings(_store(store)).set_paused(name, paused)
    except UnknownBindingError as exc:
        raise _fail(exc) from None
    typer.echo(f"{name}: {'paused' if paused else 'resumed'}")


@triggers_app.command("pause")
def pause(name: str, store: StoreOpt = None) -> None:
    """Stop claiming new objects (work in flight finishes; nothing is lost)."""
    _set_paused(name, True, store)


@triggers_app.command("resume")
def resume(name: str, store: StoreOpt = None) -> None:
    """Claim new objects again, including those that arrived while paused."""
    _set_paused(name, False, store)


@triggers_app.command("rm")
def rm(name: str, store: StoreOpt = None) -> None:
    """Remove a binding (its records stay, so re-adding it does not rerun finished objects)."""
    from registry import Bindings
    from runtime import UnknownBindingError

    try:
        Bindings(_store(store)).delete(name)
    except UnknownBindingError as exc:
        raise _fail(exc) from None
    typer.echo(f"{name}: removed")


@triggers_app.command("failed")
def failed_cmd(
    name: str, store: StoreOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """List the objects whose function failed after its retry budget (the dead letters)."""
    from faas.triggers._binding import failed
    from runtime import UnknownBindingError

    try:
        docs = failed(_store(store), name)
    except UnknownBindingError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
        return
    if not docs:
        typer.echo(f"{name}: no failed objects.")
    for d in docs:
        ev, err = d["event"], d["error"]
        first = (err.get("message") or "").splitlines()[0] if err.get("message") else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["failed_at"]))
        typer.echo(
            f"{ev['key']}\tetag={ev['etag']}\tattempts={d['attempts']}\t{when}\t{err['type']}: {first}"
        )


@triggers_app.command("retry")
def retry_cmd(
    name: str,
    key: Annotated[list[str] | None, typer.Option(help="Retry only these keys (repeatable).")] = None,
    store: StoreOpt = None,
) -> None:
    """Queue failed objects for another try with the binding's current function."""
    from faas.triggers._binding import retry
    from runtime import UnknownBindingError

    try:
        docs = retry(_store(store), name, key or None)
    except UnknownBindingError as exc:
        raise _fail(exc) from None
    typer.echo(f"{name}: {len(docs)} object(s) queued for retry")


@triggers_app.command("setup-notifications")
def setup_cmd(
    name: str,
    eventbridge: Annotated[bool, typer.Option(help="Route through EventBridge instead.")] = False,
    store: StoreOpt = None,
) -> None:
    """Send the bucket's object-created events for the binding to its SQS queue (merged)."""
    from faas.triggers._setup import setup_eventbridge, setup_notifications
    from registry import Bindings

    binding = Bindings(_store(store)).get(name)
    result = setup_eventbridge(binding) if eventbridge else setup_notifications(binding)
    typer.echo(json.dumps(result, indent=2, default=str))


@triggers_app.command("run")
def run(
    names: Annotated[list[str] | None, typer.Argument(help="Bindings to run (default: all).")] = None,
    store: StoreOpt = None,
    workers: Annotated[int, typer.Option(help="Worker processes of the embedded pool.")] = 2,
) -> None:
    """Run trigger bindings on an embedded pool until interrupted."""
    import faas
    from faas.triggers._runner import TriggerRunner

    client = faas.Client(store=store, workers=workers)
    runner = TriggerRunner(client, bindings=names or None).start()
    typer.echo(f"runner {runner.id}: {', '.join(runner.binding_names())}; Ctrl-C stops")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        runner.stop()
        client.shutdown()
