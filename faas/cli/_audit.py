"""``faas audit``: print and verify the service's hash-chained audit log."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from faas.service._audit import read, verify


def audit(
    state_dir: Annotated[
        Path | None,
        typer.Option(help="The service state directory (default: $FAAS_STATE_DIR or the cache)."),
    ] = None,
    tail: Annotated[int, typer.Option(help="Print the last N entries (0: none, only verify).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print entries as JSON lines.")] = False,
) -> None:
    """Verify the audit log's hash chain and print its latest entries; exit 1 if it does not verify."""
    from runtime import cache_dir

    state = state_dir or Path(os.environ.get("FAAS_STATE_DIR") or cache_dir() / "service")
    path = state / "audit.jsonl"
    if not path.exists():
        typer.echo(f"No audit log at {path}.", err=True)
        raise typer.Exit(2)
    report = verify(path)
    if tail > 0:
        entries = list(read(path))[: report.entries if not report.ok else None][-tail:]
        for e in entries:
            if as_json:
                typer.echo(json.dumps(e, sort_keys=True))
                continue
            when = dt.datetime.fromtimestamp(e["at"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            detail = " ".join(f"{k}={v}" for k, v in e.get("detail", {}).items())
            typer.echo(f"{e['seq']:>6} {when} {e['actor']:<16} {e['action']:<16} {detail}")
    if report.ok:
        typer.echo(f"{path}: {report.entries} entries, hash chain verified.", err=True)
        return
    typer.echo(f"{path}: NOT VERIFIED. {report.reason} (entries before it verify)", err=True)
    raise typer.Exit(1)
