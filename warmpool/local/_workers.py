"""The set of worker processes the pool dispatches to.

Each worker is a plain subprocess running ``python -m warmpool.local.worker`` (never
multiprocessing's spawn, which re-imports the caller's ``__main__``), connected
by an inherited socketpair. A worker says :class:`~warmpool.local._worker.Ready` once
it has imported everything and opened the store; one that exits before that
failed to start, and the set stops replacing workers that cannot start (see
:meth:`WorkerSet.start_error`) instead of restarting them in a loop.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import IO, TYPE_CHECKING, Any

from runtime import IdentityMappingError, Result, WorkerStartError
from warmpool._runner import Abort, Dispatch
from warmpool.local._limits import WorkerLimits
from warmpool.local._worker import Partial, Ready, Start

if TYPE_CHECKING:
    from warmpool.local._pool import Work

log = logging.getLogger("faas.pool")

WORKER_MODULE = "warmpool.local.worker"
"""The module a worker runs (``python -m``): an entry point, so a public name."""

STDERR_TAIL_LINES = 40
"""Lines of a worker's stderr kept to explain why it failed to start."""

START_FAILURES_AFTER_READY = 3
"""Start failures in a row that stop replacements once a worker has ever started.

Before any worker has started, the first failure stops them: the environment
is broken (a bad import path, a shadowed module), and retrying only delays the error."""


def worker_env(path: list[str]) -> dict[str, str]:
    """The environment of a worker: ours, with ``path`` (our ``sys.path``) as ``PYTHONPATH``.

    Functions from importable user modules are pickled by reference, so the
    worker must import what the caller can. ``''`` (the current directory at
    import time) becomes the directory now, so it survives a later ``chdir``.
    """
    cwd = os.getcwd()
    entries = [p or cwd for p in path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(entries))}


CLEAN_ENV_KEYS = (
    "PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONHASHSEED",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FAAS_STAGING_THRESHOLD",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
)  # fmt: skip
"""What a clean worker environment keeps of ours: never credentials (``AWS_*``, ``FAAS_TOKENS``, ...)."""


@dataclass(frozen=True)
class WorkerLaunch:
    """How a set's worker processes are started (the default: as today, inheriting our environment).

    Attributes:
        tenant: Whose workers these are (None: the shared set).
        user: The Unix user they run as (only when we run as root; see :func:`resolve_user`).
        env: Extra environment variables (a tenant's own credentials, say).
        clean_env: Start from a clean environment (:data:`CLEAN_ENV_KEYS` of ours, the
            user's HOME, ``PYTHONPATH``, then ``env``) instead of ours, so the
            service's credentials never reach the tenant's code.
        limits: Resource limits each worker applies to itself before running anything.
        new_session: Start each worker in its own session, so the processes a function
            forks are killed with its worker (and when the worker idles).
        place: Called with each new worker's pid before it is sent anything (puts it
            in its tenant's cpu cgroup, see :mod:`warmpool.local._cgroup`).
        python: The interpreter the workers run (None: ours). A mapped user must be able
            to run it: one installed under a private home (pyenv under /root) is not.
    """

    tenant: str | None = None
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    clean_env: bool = False
    limits: WorkerLimits | None = None
    new_session: bool = False
    place: Callable[[int], object] | None = None
    python: str | None = None


def resolve_user(name: str) -> pwd.struct_passwd:
    """The account a tenant's workers run as.

    Raises:
        IdentityMappingError: No such user, or this process is not root (only root
            can start processes as another user), or the user is root.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise IdentityMappingError(f"The Unix user {name!r} mapped to a tenant does not exist.") from None
    if entry.pw_uid == 0:
        raise IdentityMappingError(f"A tenant may not be mapped to {name!r}: it is root.")
    if os.geteuid() != 0:
        raise IdentityMappingError(
            f"Cannot run workers as {name!r}: only a pool running as root can start "
            f"processes as another user (this one runs as uid {os.geteuid()})."
        )
    return entry


def launch_env(launch: WorkerLaunch, path: list[str], home: str | None) -> dict[str, str]:
    """The environment of one set's workers (see :class:`WorkerLaunch`)."""
    base = worker_env(path)
    if not launch.clean_env:
        env = base
    else:
        env = {k: base[k] for k in CLEAN_ENV_KEYS if k in base}
        env["PYTHONPATH"] = base["PYTHONPATH"]
        if home is not None:
            env["HOME"] = home
    if launch.limits is not None and launch.limits.memory_bytes is not None:
        env["MALLOC_ARENA_MAX"] = "2"  # glibc reserves 64 MB of address space per arena otherwise
    return {**env, **launch.env}


@dataclass(eq=False)
class WorkerProc:
    """One worker process and what it runs.

    Attributes:
        index: Sequence number (for names and logs).
        process: The worker subprocess.
        conn: The parent's end of the socketpair.
        inflight: Invocations sent to it and not yet answered, by id.
        abandoned: Invocations it still runs after they timed out or were cancelled.
        retiring: Takes no new work; stopped once its work drains.
        ready: It said Ready (imported everything, opened the store).
        stderr_tail: The last lines it wrote to stderr.
    """

    index: int
    process: subprocess.Popen[bytes]
    conn: Connection
    inflight: dict[str, Work] = field(default_factory=dict)
    abandoned: int = 0
    retiring: bool = False
    ready: bool = False
    exited: bool = False  # set by the reader thread when the socket closes (no waitpid per dispatch)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    stderr_thread: threading.Thread | None = None
    tenant: str | None = None
    own_group: bool = False  # started in its own session: its process group is its own

    @property
    def pid(self) -> int | None:
        """The process id."""
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal)."""
        return self.process.returncode

    def reap(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to exit; True once it has."""
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout: float) -> None:
        """Wait up to ``timeout`` s, then SIGKILL and reap."""
        if not self.reap(timeout):
            with contextlib.suppress(OSError):
                self.process.kill()
            self.reap(5)
        self.kill_group()

    def kill_group(self) -> None:
        """Kill what is left of its process group (what its functions forked), once it is gone."""
        if self.own_group and self.process.returncode is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def send(self, msg: Start | Dispatch | Abort | None) -> bool:
        """Send a message; False if the pipe is closed (the worker died)."""
        try:
            with self.send_lock:
                self.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False


class WorkerSet:
    """Spawns, feeds and replaces the pool's worker processes.

    Args:
        store_config: ``ObjectStore.config()`` the workers open.
        size: Worker processes to keep.
        threads: Invocations each worker runs at once.
        lock: The pool's lock, guarding every worker's ``inflight``.
        on_result: Called (without the lock) for every Result a worker sends.
        on_exit: Called (without the lock) when a worker process ends, with the
            invocations it still had.
    """

    def __init__(
        self,
        store_config: dict[str, Any],
        size: int,
        threads: int,
        lock: threading.RLock,
        on_result: Callable[[WorkerProc, Result], None],
        on_exit: Callable[[WorkerProc, list[Work]], None],
        on_partial: Callable[[WorkerProc, Partial], None] | None = None,
        launch: WorkerLaunch | None = None,
    ) -> None:
        self.launch = launch or WorkerLaunch()
        self._store_config = store_config
        self.size = size
        self.threads = threads
        self._lock = lock
        self._on_result = on_result
        self._on_exit = on_exit
        self._on_partial = on_partial
        self._counter = 0
        self._start_failures = 0  # in a row; reset by every Ready
        self._ever_ready = False
        self._start_error: WorkerStartError | IdentityMappingError | None = None
        self.workers: list[WorkerProc] = []
        self.closed = False

    @property
    def spawned(self) -> int:
        """Worker processes started so far."""
        return self._counter

    def start_error(self) -> WorkerStartError | IdentityMappingError | None:
        """Why no worker can run work, once workers fail to start and none is left (caller holds the lock)."""
        if self._start_error is None or any(not w.exited for w in self.active()):
            return None
        return self._start_error

    def start(self) -> None:
        """Spawn the workers."""
        with self._lock:
            while len(self.active()) < self.size and self.spawn() is not None:
                pass

    def active(self) -> list[WorkerProc]:
        """Workers that accept new work."""
        return [w for w in self.workers if not w.retiring]

    def spawn(self) -> WorkerProc | None:
        """Start one worker process, its reader and stderr threads (caller holds the lock).

        None when the set's Unix user cannot be used (see :func:`resolve_user`):
        that is then the set's :meth:`start_error`.
        """
        # Both ends are non-inheritable: only this child gets its end (pass_fds),
        # so the socket closes, and the worker exits, when this process dies.
        parent, child = socket.socketpair()
        with child:
            try:
                proc = self._popen(child)
            except IdentityMappingError as exc:
                parent.close()
                self._start_error = exc
                log.error("Workers of tenant %s cannot start: %s", self.launch.tenant, exc)
                return None
            except BaseException:
                parent.close()
                raise
        if self.launch.place is not None:
            self.launch.place(proc.pid)  # before Start: it runs nothing of a tenant's yet
        worker = WorkerProc(
            index=self._counter, process=proc, conn=Connection(parent.detach()),
            tenant=self.launch.tenant, own_group=self.launch.new_session,
        )  # fmt: skip
        self._counter += 1
        self.workers.append(worker)
        # Buffered until the worker reads it.
        worker.send(Start(self._store_config, self.threads, self.launch.limits))
        assert proc.stderr is not None
        worker.stderr_thread = threading.Thread(
            target=_relay_stderr, args=(proc.stderr, worker.stderr_tail),
            name=f"faas-stderr-{worker.index}", daemon=True,
        )  # fmt: skip
        worker.stderr_thread.start()
        threading.Thread(
            target=self._read, args=(worker,), name=f"faas-reader-{worker.index}", daemon=True
        ).start()
        return worker

    def _popen(self, child: socket.socket) -> subprocess.Popen[bytes]:
        launch = self.launch
        who: dict[str, Any] = {}
        home: str | None = None
        nice = ["--nice", str(launch.limits.nice)] if launch.limits and launch.limits.nice else []
        if launch.user is not None:
            entry = resolve_user(launch.user)
            home = entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"
            who = {
                "user": entry.pw_uid,
                "group": entry.pw_gid,
                "extra_groups": [],
                "umask": 0o077,
                "cwd": home,
            }
        return subprocess.Popen(
            # -P: no current directory in front of sys.path; the worker gets ours.
            [launch.python or sys.executable, "-P", "-m", WORKER_MODULE, "--fd", str(child.fileno()),
             "--parent-pid", str(os.getpid()), *nice],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,  # a script read from stdin must stay the caller's
            stderr=subprocess.PIPE,
            env=launch_env(launch, sys.path, home),
            start_new_session=launch.new_session,
            **who,
        )  # fmt: skip

    def pick(self) -> WorkerProc | None:
        """The accepting worker with the fewest invocations in flight (caller holds the lock).

        None when workers fail to start and none is left (see :meth:`start_error`).
        """
        candidates = [w for w in self.active() if not w.exited]
        if not candidates:
            spawned = self.spawn() if self._start_error is None else None
            if spawned is None:
                return None
            candidates = [spawned]
        return min(candidates, key=lambda w: len(w.inflight))

    def _read(self, worker: WorkerProc) -> None:
        with contextlib.suppress(EOFError, OSError):
            if isinstance(worker.conn.recv(), Ready):
                worker.ready = True
                with self._lock:
                    self._ever_ready = True
                    self._start_failures = 0
        while worker.ready:
            try:
                message: Result | Partial = worker.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Partial):
                if self._on_partial is not None:
                    self._on_partial(worker, message)
                continue
            self._on_result(worker, message)
        worker.exited = True
        worker.reap(5)
        worker.kill_group()
        if worker.stderr_thread is not None:
            worker.stderr_thread.join(2)  # the whole tail, before it explains anything
        with self._lock:
            if worker in self.workers:
                self.workers.remove(worker)
            lost = list(worker.inflight.values())
            worker.inflight.clear()
            if not self.closed and not worker.retiring:
                log.warning(
                    "Worker %s (pid %s) exited with code %s %s, holding %d invocations",
                    worker.index,
                    worker.pid,
                    worker.exitcode,
                    "after it started" if worker.ready else "before it started",
                    len(lost),
                )
                if not worker.ready:
                    self._count_start_failure(worker)
            if not self.closed and self._start_error is None and len(self.active()) < self.size:
                self.spawn()
        self._on_exit(worker, lost)

    def _count_start_failure(self, worker: WorkerProc) -> None:
        """Stop replacing workers once they keep failing to start (caller holds the lock)."""
        self._start_failures += 1
        limit = START_FAILURES_AFTER_READY if self._ever_ready else 1
        if self._start_failures >= limit and self._start_error is None:
            code = worker.exitcode
            how = f"exited with code {code}"
            if code is not None and code < 0:
                how = f"was killed by signal {-code}"
            tail = "\n".join(worker.stderr_tail) or "(it wrote nothing to stderr)"
            self._start_error = WorkerStartError(
                f"A worker process (pid {worker.pid}, `{self.launch.python or sys.executable} -m "
                f"{WORKER_MODULE}`) {how} "
                f"before it was ready; no more workers are started. Its stderr ends:\n{tail}"
            )
            # Its stderr was relayed to ours already; the error carries the tail.
            log.error("Workers fail to start (the last %s); no more are started", how)

    def abandon(self, worker: WorkerProc, invocation_id: str, attempt: int) -> None:
        """Tell a worker to drop an invocation attempt; recycle it once half its threads are stuck."""
        worker.send(Abort(invocation_id=invocation_id, attempt=attempt))
        with self._lock:
            worker.abandoned += 1
            # A thread stuck in user code cannot be killed; once half a worker's
            # threads are stuck, replace the worker after its live work drains.
            if worker.abandoned * 2 >= self.threads:
                self.replace(worker)

    def replace(self, worker: WorkerProc) -> None:
        """Start a replacement and stop ``worker`` once its live work drains (caller holds the lock)."""
        if worker.retiring or self.closed or worker not in self.workers:
            return
        worker.retiring = True
        if self._start_error is None:
            self.spawn()
        threading.Thread(target=self._retire, args=(worker,), daemon=True).start()

    def idle(self) -> bool:
        """Whether no worker runs anything (caller holds the lock)."""
        return not any(w.inflight for w in self.workers)

    def retire_all(self) -> None:
        """Stop every worker of an idle set for good, in the background (caller holds the lock)."""
        self.closed = True
        for worker in self.workers:
            worker.retiring = True
            threading.Thread(target=self._retire, args=(worker,), daemon=True).start()

    def _retire(self, worker: WorkerProc) -> None:
        deadline = time.monotonic() + 600
        while worker.inflight and time.monotonic() < deadline and not self.closed:
            time.sleep(0.1)  # polling a drain, not synchronisation
        worker.send(None)
        worker.stop(5)

    def shutdown(self, timeout: float) -> None:
        """Ask every worker to exit, then kill stragglers and reap them all."""
        with self._lock:
            self.closed = True
            workers = list(self.workers)
        for w in workers:
            w.send(None)
        deadline = time.monotonic() + timeout
        for w in workers:
            w.stop(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(OSError):
                w.conn.close()


def _relay_stderr(stream: IO[bytes], tail: collections.deque[str]) -> None:
    """Copy a worker's stderr to ours (as if inherited), keeping its last lines."""
    with stream:
        for line in iter(stream.readline, b""):
            with contextlib.suppress(OSError):
                os.write(2, line)
            tail.append(line.decode(errors="replace").rstrip("\n"))
