"""Engine hosts: start, health-check and stop one engine replica process.

Every host satisfies :class:`EngineHost` structurally. The engine always runs in
its own process group (never inside the dispatcher), so stopping it kills the
whole group and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from runtime import EngineError


@runtime_checkable
class EngineHost(Protocol):
    """One engine replica process serving SGLang's native HTTP API."""

    @property
    def url(self) -> str | None:
        """Base URL once the engine listens, else None."""
        ...

    @property
    def pid(self) -> int | None:
        """Process id of the engine's group leader, once started."""
        ...

    def start(self) -> None:
        """Launch the engine process; returns without waiting for readiness."""
        ...

    def wait_ready(self, timeout: float) -> float:
        """Block until ``/health_generate`` answers 200; return seconds waited.

        Raises:
            EngineError: The process exited or the timeout passed; the message
                carries the log tail.
        """
        ...

    def alive(self) -> bool:
        """Whether the engine process is still running."""
        ...

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the engine's whole process group (SIGTERM, then SIGKILL)."""
        ...

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the engine's captured output."""
        ...

    def server_info(self) -> dict[str, Any]:
        """The engine's ``/server_info`` (startup breakdown, batch statistics)."""
        ...


class SubprocessEngineHost:
    """Base for engines launched as a command in a new process group.

    Args:
        command: Builds the argv given the port file to write; the engine must
            write its bound port there once it listens.
        log_dir: Where the engine's stdout/stderr are captured.
        env: Extra environment variables for the engine.
        health_path: Readiness endpoint.
    """

    def __init__(
        self,
        command: Callable[[Path], list[str]],
        *,
        log_dir: Path | None = None,
        env: dict[str, str] | None = None,
        health_path: str = "/health_generate",
        name: str = "engine",
        port: int | None = None,
    ) -> None:
        self._command = command
        self._dir = Path(log_dir or tempfile.mkdtemp(prefix="faas-engine-"))
        self._dir.mkdir(parents=True, exist_ok=True)
        self._env = env or {}
        self._health_path = health_path
        self._name = name
        self._proc: subprocess.Popen[bytes] | None = None
        self._port = port  # known up front (SGLang); else read from the port file
        self._url: str | None = None
        self.log_path = self._dir / f"{name}.log"
        self.port_file = self._dir / f"{name}.port"
        self.argv: list[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, pid={self.pid}, url={self._url!r})"

    @property
    def url(self) -> str | None:
        """Base URL once the engine listens."""
        return self._url

    @property
    def pid(self) -> int | None:
        """The engine's pid."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Launch the engine in a new session (its own process group)."""
        if self._proc is not None:
            raise EngineError(f"{self!r} was already started.")
        with contextlib.suppress(FileNotFoundError):
            self.port_file.unlink()
        self.argv = self._command(self.port_file)
        env = {**os.environ, **self._env}
        if self._port is not None:
            self._url = f"http://127.0.0.1:{self._port}"
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float) -> float:
        """Poll the port file, then the health endpoint, until ready or ``timeout``."""
        if self._proc is None:
            raise EngineError(f"{self!r} has not been started.")
        t0 = time.monotonic()
        deadline = t0 + timeout
        delay = 0.02
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=2.0)) as client:
            while True:
                if self._proc.poll() is not None:
                    raise EngineError(
                        f"The {self._name} process exited with code {self._proc.returncode} before it was "
                        f"ready. Log tail:\n{self.log_tail()}"
                    )
                if self._url is None and self.port_file.exists():
                    text = self.port_file.read_text().strip()
                    if text:
                        self._url = f"http://127.0.0.1:{int(text)}"
                if self._url is not None:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(self._url + self._health_path).status_code == 200:
                            return time.monotonic() - t0
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"The {self._name} was not ready after {timeout:.0f} s. Log tail:\n{self.log_tail()}"
                    )
                time.sleep(delay)  # polling interval, not synchronisation
                delay = min(delay * 1.5, 0.25)

    def alive(self) -> bool:
        """Whether the process is running."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that left the group's leader behind still get the group kill.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        """Last ``lines`` lines of the engine log."""
        try:
            data = self.log_path.read_bytes()[-65536:]
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    def server_info(self) -> dict[str, Any]:
        """GET ``/server_info``; empty when the engine is not up."""
        if self._url is None:
            return {}
        try:
            return dict(httpx.get(self._url + "/server_info", timeout=10.0).json())
        except (httpx.HTTPError, ValueError):
            return {}


class CpuEngineHost(SubprocessEngineHost):
    """The CPU engine (``python -m warmpool.cpu_engine``) over a local model directory.

    Args:
        model_path: Hugging Face model directory.
        served_model_name: Name the engine reports.
        max_batch_size: Most sequences per forward step.
        threads: torch threads for the engine (None: torch's default).
        device: ``cpu`` or ``cuda``.
        log_dir: Where logs and the port file go.
        request_log: File the engine appends one JSON line per finished request to (None: none).
        answer_journal: Directory of the engine's answer journal (None: none; see
            ``warmpool.cpu_engine._journal``).
        max_loras: LoRA adapters resident at once (None: the engine's default; 0: LoRA off).
        max_lora_rank: Largest LoRA adapter rank (None: the engine's default).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        served_model_name: str = "model",
        max_batch_size: int = 64,
        threads: int | None = None,
        device: str = "cpu",
        log_dir: Path | None = None,
        request_log: str | Path | None = None,
        answer_journal: str | Path | None = None,
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
    ) -> None:
        def command(port_file: Path) -> list[str]:
            argv = [
                sys.executable,
                "-m",
                "warmpool.cpu_engine",
                "--model-path",
                str(model_path),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--served-model-name",
                served_model_name,
                "--max-batch-size",
                str(max_batch_size),
                "--device",
                device,
                "--parent-pid",  # the engine exits if this pool dies without stopping it
                str(os.getpid()),
            ]
            if threads:
                argv += ["--threads", str(threads)]
            if request_log:
                argv += ["--request-log", str(request_log)]
            if answer_journal:
                argv += ["--answer-journal", str(answer_journal)]
            for flag, value in (("--max-loras", max_loras), ("--max-lora-rank", max_lora_rank)):
                argv += [flag, str(int(value))] if value is not None else []
            return argv

        super().__init__(command, log_dir=log_dir, env={"HF_HUB_OFFLINE": "1"}, name="cpu-engine")
