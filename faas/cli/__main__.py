"""``python -m faas.cli``: the ``faas`` command."""

from faas.cli import main

main()
