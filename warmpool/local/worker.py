"""``python -m warmpool.local.worker``: the entry point of the pool's worker processes.

The pool starts each worker as a plain subprocess of this module, never with
multiprocessing's spawn, so a worker never imports the caller's ``__main__``:
scripts without an ``if __name__ == "__main__":`` guard, scripts read from
stdin, ``python -c``, IPython and notebooks all work. Functions travel by value
(cloudpickle), and the pool passes its ``sys.path`` as ``PYTHONPATH`` so
functions pickled by reference import in the worker as they do in the caller.

The worker talks to the pool over one end of a socketpair it inherits
(``--fd``), wrapped in a ``multiprocessing.connection.Connection``; see
:mod:`warmpool.local._worker` for the messages. It exits when the pool closes its end
(the pool died, even by SIGKILL) or when its parent process changes.

This module name is an entry point (the pool runs it by name): keep it public
and stable.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from multiprocessing.connection import Connection


def _exit_with_parent(pid: int) -> None:
    """Exit when process ``pid`` (the pool) is no longer our parent.

    The closed socket already ends a worker whose pool died; this covers a pool
    whose end leaked into a process it forked, which would keep the socket open.
    """

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(1.0)  # a liveness poll, not synchronisation
        os._exit(0)

    threading.Thread(target=watch, name="faas-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Serve the pool on the inherited socket; never returns.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m warmpool.local.worker", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="inherited socket to the pool")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--nice", type=int, default=0, help="CPU niceness to add before anything else")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # before the imports: a replacement worker's start yields to the engines too
    conn = Connection(args.fd)
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)
    # Imported here, after the socket is ours: an import that fails is the start
    # failure the pool reports, with this process's stderr as its cause.
    from warmpool.local._worker import serve

    serve(conn)


if __name__ == "__main__":
    main()
