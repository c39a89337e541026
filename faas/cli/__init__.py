"""The ``faas`` command line (``python -m faas.cli`` runs it too)."""

from faas.cli._main import app, main

__all__ = ["app", "main"]
