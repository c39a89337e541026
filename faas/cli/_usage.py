"""``faas usage``: the usage ledger as a table, CSV or JSON.

With ``$FAAS_URL`` set it asks the service (``GET /v1/usage``: your tenant's
rows; with an admin token, ``--tenant T`` or ``--all-tenants``); otherwise it
reads the usage objects of the store (``--store``, ``$FAAS_STORE`` or the
cache) that the embedded client wrote, and with ``--tenant``/``--all-tenants``
those a ``faas serve`` on that store wrote into its tenants' parts.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from typing import Annotated, Any, Literal, cast, get_args

import typer
from rich.console import Console
from rich.table import Table

from faas._usage import GroupBy, UsageReport, parse_since, read_store_usage, report

Format = Literal["table", "csv", "json"]

_ROW_COLUMNS = (
    ("finished", "finished_at"),
    ("function", "function"),
    ("model", "model"),
    ("outcome", "outcome"),
    ("prompt", "prompt_tokens"),
    ("cached", "cached_tokens"),
    ("completion", "completion_tokens"),
    ("queue s", "queue_seconds"),
    ("ttft s", "ttft_seconds"),
    ("exec s", "execution_seconds"),
    ("engine s", "engine_seconds"),
    ("share s", "engine_share_seconds"),
    ("cold s", "cold_start_seconds"),
)
_GROUP_COLUMNS = (
    ("invocations", "invocations"),
    ("failed", "failed"),
    ("prompt", "prompt_tokens"),
    ("cached", "cached_tokens"),
    ("completion", "completion_tokens"),
    ("queue s", "queue_seconds"),
    ("exec s", "execution_seconds"),
    ("engine s", "engine_seconds"),
    ("share s", "engine_share_seconds"),
    ("cold s", "cold_start_seconds"),
)


def _cell(value: Any, field: str) -> str:
    if value is None:
        return "-"
    if field == "finished_at":
        return dt.datetime.fromtimestamp(float(value), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _load(
    tenant: str | None,
    all_tenants: bool,
    since: float | None,
    until: float | None,
    by: GroupBy | None,
    limit: int,
    store: str | None,
) -> UsageReport:
    if os.environ.get("FAAS_URL") and store is None:
        from faas.clients._remote import RemoteClient

        with RemoteClient(os.environ["FAAS_URL"]) as client:  # the service decides who may see what (403)
            return client.usage(
                since=since, until=until, by=by, limit=limit, tenant=tenant, all_tenants=all_tenants
            )
    from runtime import default_store_url, store_from_url

    rows = read_store_usage(
        store_from_url(store or default_store_url()),
        tenant=tenant,
        all_tenants=all_tenants,
        since=since,
        until=until,
    )
    return report(rows, since=since, until=until, by=by, limit=limit)


def render(rep: UsageReport, fmt: Format) -> str:
    """The report as CSV or JSON text, or a rich table (rendered to text)."""
    if fmt == "json":
        return rep.model_dump_json(indent=2)
    grouped = rep.by is not None
    columns = ((rep.by or "key", "key"), *_GROUP_COLUMNS) if grouped else _ROW_COLUMNS
    items: list[dict[str, Any]] = [x.model_dump() for x in (rep.groups if grouped else rep.rows)]
    for item in items:  # a function's name with its version
        if not grouped:
            item["function"] = f"{item['function']}@{item['function_version']}"
    if fmt == "csv":
        out = io.StringIO()
        fields = ["key", *[f for _, f in _GROUP_COLUMNS]] if grouped else list(items[0]) if items else []
        writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(items)
        return out.getvalue()
    table = Table(title="usage" + (f" by {rep.by}" if grouped else ""), show_footer=True)
    total = rep.total.model_dump()
    for label, field in columns:
        footer = "total" if field in ("key", "finished_at") else _cell(total.get(field), field)
        table.add_column(label, footer=footer if field in total or field in ("key", "finished_at") else "",
                         justify="left" if field in ("key", "finished_at", "function", "model", "outcome")
                         else "right")  # fmt: skip
    for item in items:
        table.add_row(*(_cell(item.get(field), field) for _, field in columns))
    console = Console(file=io.StringIO(), width=200, highlight=False, record=True)
    console.print(table)
    return console.export_text()


def usage(
    tenant: Annotated[
        str | None,
        typer.Option(help="This tenant's rows (through a service: another tenant's needs an admin token)."),
    ] = None,
    all_tenants: Annotated[
        bool,
        typer.Option("--all-tenants", help="Every tenant's rows (through a service: needs an admin token)."),
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="From this time: '2h', '7d' (ago), '2026-12-01', ISO time or epoch.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Before this time (same forms as --since).")] = None,
    by: Annotated[str | None, typer.Option(help="Sum by model, function, tenant, hour or day.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    limit: Annotated[int, typer.Option(help="Most rows listed (without --by).", min=1)] = 1000,
    store: Annotated[str | None, typer.Option(help="Read this store instead of $FAAS_URL's service.")] = None,
) -> None:
    """The usage ledger: a row per finished invocation, or sums --by model, function, tenant, hour or day."""
    if tenant is not None and all_tenants:
        raise typer.BadParameter("Give either --tenant or --all-tenants, not both.", param_hint="--tenant")
    if by is not None and by not in get_args(GroupBy):
        raise typer.BadParameter(f"{by!r} is not one of {', '.join(get_args(GroupBy))}.", param_hint="--by")
    if fmt not in get_args(Format):
        raise typer.BadParameter(f"{fmt!r} is not one of table, csv, json.", param_hint="--format")
    try:
        start = parse_since(since) if since else None
        end = parse_since(until) if until else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    from runtime import FaasError

    try:
        rep = _load(tenant, all_tenants, start, end, cast(GroupBy | None, by), limit, store)
    except FaasError as exc:
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(render(rep, cast(Format, fmt)), nl=fmt != "csv")
