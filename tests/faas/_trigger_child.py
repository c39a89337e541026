"""A trigger runner in its own process, until it is killed: the "pool" of the kill tests.

Usage: ``python -m tests.faas._trigger_child STORE_URL BINDING [FUNCTION [RUNNER_ID]]``,
FUNCTION being a function of :mod:`tests.faas._trigger_helpers` (default ``shout``).
Prints ``ready`` once the runner's first pass is done.
"""

from __future__ import annotations

import sys
import time

import faas
from faas.triggers import TriggerRunner
from tests.faas import _trigger_helpers


def main() -> None:
    store_url, binding = sys.argv[1], sys.argv[2]
    function = getattr(_trigger_helpers, sys.argv[3] if len(sys.argv) > 3 else "shout")
    runner_id = sys.argv[4] if len(sys.argv) > 4 else None
    client = faas.Client(store=store_url, workers=2, records="off")
    runner = TriggerRunner(
        client, bindings=[binding], functions=[function], status_interval=0.5, runner_id=runner_id
    )
    runner.run_once()
    print("ready", flush=True)
    runner.start()
    while True:
        time.sleep(1.0)  # the runner works on its thread until this process is killed


if __name__ == "__main__":
    main()
