"""Run SGLang's own frontend client (``sgl.function`` + ``sgl.gen`` on ``RuntimeEndpoint``) against a URL.

Usage: ``python -m tests.warmpool._sglang_lang_client URL``; prints one JSON object with
each program's outcome. Exit code 3 (with the reason on stderr) means SGLang's client
cannot be imported here, so the caller skips.

SGLang's client modules run unchanged. Only when ``import sglang`` itself fails (the
package initialiser loads the GPU server runtime: torch, triton, ...) is the package
registered without running its ``__init__``, so that ``sglang.lang`` imports with its own
light dependencies (aiohttp, msgspec, pybase64, requests, numpy, tqdm, pydantic, IPython).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from typing import Any


def _import_client() -> tuple[Any, Any]:
    try:
        import sglang  # noqa: F401  (the full install, on GPU machines)
    except ImportError:
        spec = importlib.util.find_spec("sglang")
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
            del sys.modules[name]
        package = types.ModuleType("sglang")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["sglang"] = package
    from sglang.lang import api
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    return api, RuntimeEndpoint


def main(url: str) -> int:
    """Run the programs; print their outcomes as JSON."""
    try:
        api, runtime_endpoint = _import_client()
    except ImportError as exc:
        print(f"SGLang's client cannot be imported: {exc!r}", file=sys.stderr)
        return 3
    from sglang.version import __version__

    api.set_default_backend(runtime_endpoint(url))

    @api.function
    def complete(s: Any, prompt: str) -> None:
        s += prompt
        s += api.gen("out", max_tokens=16, temperature=0)

    @api.function
    def constrained(s: Any, prompt: str) -> None:
        s += prompt
        s += api.gen("out", max_tokens=4, regex=r"[0-9]+")

    out: dict[str, Any] = {"version": __version__}
    state = complete.run(prompt="The quick brown")
    out["gen"] = state["out"]
    out["meta"] = state.get_meta_info("out")
    out["batch"] = [
        s["out"] for s in complete.run_batch([{"prompt": "Jupiter is"}, {"prompt": "Two plus two"}])
    ]
    streamed = complete.run(prompt="Water boils at", stream=True)
    out["stream"] = "".join(streamed.text_iter("out"))
    refused = constrained.run(prompt="Two plus two")  # the interpreter keeps the error, and warns
    out["regex_error"] = repr(refused.error()) if refused.error() else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
