"""The one rule for registered names (functions, models, adapters)."""

from __future__ import annotations

import re

from runtime import SubmitError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")


def check_name(name: str, what: str) -> str:
    """Return ``name`` if the whole of it is a valid registered name (a trailing newline is not).

    Raises:
        SubmitError: It is not.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SubmitError(
            f"Invalid {what} name {name!r}: use letters, digits, '_', '.', '-' (at most 128), "
            "starting with a letter or '_'."
        )
    return name
