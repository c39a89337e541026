"""The OpenAI-compatible API's pieces that are not web code.

The built-in functions every OpenAI request runs as (``openai.chat``,
``openai.completions``, ``openai.embeddings``: ordinary faas functions, run in
the pool's workers) and the checks of request bodies. The service's routes
live in :mod:`faas.service`; see docs/openai.md.
"""

from faas.openai._builtins import BUILTINS, RESERVED_PREFIX, chat, completions, embeddings
from faas.openai._requests import KINDS, PATHS, Kind, Request, check_request

__all__ = [
    "BUILTINS",
    "KINDS",
    "PATHS",
    "RESERVED_PREFIX",
    "Kind",
    "Request",
    "chat",
    "check_request",
    "completions",
    "embeddings",
]
