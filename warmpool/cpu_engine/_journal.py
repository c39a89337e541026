"""The engine's record of the requests it finished: the request log and the answer journal.

**Request log** (``--request-log FILE``): one JSON line per request that ends here (its
``rid``, prompt and generated tokens, and ``finish``: ``stop``, ``length``, ``abort``, or
``replayed``), as SGLang's ``--log-requests`` writes to its log. Tests use it as the side
channel that counts executions.

**Answer journal** (``--answer-journal DIR``): the answer of every finished request whose
rid names an invocation (``inv-<invocation id>-<attempt>-<call>``, as the runtime's bound
model handles send), kept by invocation and call, not attempt. When a later attempt of the
same invocation sends the same request (same prompt, sampling parameters and options, by
digest) for the same call, the engine answers from the journal instead of generating
again (a call that sent something else is kept in its place: the next attempt most likely
sends that): an invocation whose result was lost after the engine finished (its worker died,
the service was SIGKILLed before the group commit) does not run on the engine twice. A
request that differs in anything runs as usual. Requests that read or write internals,
give embeddings, or return hidden states are not journaled (their answers are large and
rarely retried).

Each engine process appends to a file of its own in ``DIR`` (line-buffered, so a
SIGKILLed engine loses nothing it had answered) and at start reads every file there:
the answers from the last ``ttl`` seconds, the newest ``max_entries``, which it writes
into its own file before deleting the files of engines no longer running. Memory and
disk stay bounded by ``max_entries`` (the file is rewritten when it holds twice that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from warmpool._procs import pid_alive
from warmpool.cpu_engine._requests import GenOutput, GenRequest

log = logging.getLogger("faas.cpu_engine")

# inv-<invocation id>-<attempt>-<call>[-<sequence>]; ids are alphanumeric (32 hex digits; 38 for
# a batch line), as the service's plausible_id accepts them.
_RID = re.compile(r"^inv-([0-9A-Za-z]{16,64})-\d+-(\d+(?:-\d+)*)$")
_KEPT: tuple[str, ...] = ("output_ids", "text", "finish_reason", "prompt_tokens", "engine_share")
_KEPT += ("output_token_logprobs", "output_top_logprobs")


def answer_key(rid: str) -> str | None:
    """The journal key of a request id: its invocation and call without the attempt (None: none)."""
    match = _RID.match(rid)
    return f"{match[1]}-{match[2]}" if match else None


def fingerprint(req: GenRequest) -> str | None:
    """A digest of everything that decides a request's answer (None: not journaled)."""
    if req.return_hidden_states or req.internals is not None or req.input_embeds is not None:
        return None
    params = dataclasses.asdict(req.params)
    # How often partial outputs are streamed does not decide the answer; a worker's call may
    # go in a streamed batch on one attempt and alone on the next (runtime._coalesce).
    params.pop("stream_interval", None)
    what = [req.input_ids, params, req.return_logprob, req.top_logprobs_num, req.lora]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


class RequestLedger:
    """Writes the request log and keeps the answer journal (either may be off).

    Args:
        request_log: The request log file (None: none).
        journal_dir: The answer journal's directory (None: no journal).
        max_entries: Answers kept at most.
        ttl: Seconds an answer is kept.
        clock: Wall clock (epoch seconds).
    """

    def __init__(
        self,
        request_log: Path | None = None,
        journal_dir: Path | None = None,
        *,
        max_entries: int = 10_000,
        ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        # Line-buffered: every finished request is on disk even if the engine is killed next.
        self._log = open(request_log, "a", buffering=1) if request_log else None  # noqa: SIM115
        self._answers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._digests: dict[str, tuple[str, str]] = {}  # rid -> (key, digest), arrival to finish
        self._dir = Path(journal_dir) if journal_dir else None
        self._file: IO[str] | None = None
        self._path: Path | None = None
        self._written = 0
        if self._dir is not None:
            self._open_journal(self._dir)

    # -- the two events ----------------------------------------------------------------
    def replay(self, req: GenRequest) -> GenOutput | None:
        """The journaled answer to ``req`` (logged as ``replayed``), or None: run it.

        Called as a request arrives, outside the scheduler's lock: the digest is taken here
        (a long prompt's costs milliseconds) and kept for :meth:`finished`.
        """
        key = answer_key(req.rid) if self._dir is not None and req.counted else None
        fp = fingerprint(req) if key is not None else None
        if key is None or fp is None:
            return None
        with self._lock:
            entry = self._answers.get(key)
            if entry is None or entry["fp"] != fp:
                self._digests[req.rid] = (key, fp)
                if len(self._digests) > 4 * self.max_entries:  # refused at submit, never finished
                    self._digests.pop(next(iter(self._digests)))
                return None
        out = GenOutput(rid=req.rid, e2e_latency=time.perf_counter() - req.created, **entry["out"])
        self._write_log(req, out, "replayed")
        return out

    def finished(self, req: GenRequest, out: GenOutput) -> None:
        """Log a counted request that ended, and journal its answer if it finished cleanly."""
        finish = (out.finish_reason or {}).get("type", "abort")
        self._write_log(req, out, finish)
        with self._lock:
            known = self._digests.pop(req.rid, None)  # taken at arrival: no second regex or digest
        if known is None or out.error is not None or finish not in ("stop", "length"):
            return
        key, fp = known
        answer = {k: getattr(out, k) for k in _KEPT}
        entry = {"key": key, "fp": fp, "at": self._clock(), "out": answer}
        with self._lock:
            self._keep(entry)
            if self._file is not None:
                self._file.write(json.dumps(entry) + "\n")
                self._written += 1
                if self._written > 2 * self.max_entries:
                    self._rewrite()

    def close(self) -> None:
        """Close the files."""
        with self._lock:
            for f in (self._log, self._file):
                if f is not None:
                    f.close()
            self._log = self._file = None

    # -- internals ---------------------------------------------------------------------
    def _write_log(self, req: GenRequest, out: GenOutput, finish: str) -> None:
        if self._log is None:
            return
        entry = {"rid": req.rid, "prompt_tokens": len(req.input_ids)}
        entry.update(completion_tokens=len(out.output_ids), finish=finish, at=self._clock())
        with self._lock:
            if self._log is not None:
                self._log.write(json.dumps(entry) + "\n")

    def _keep(self, entry: dict[str, Any]) -> None:
        self._answers.pop(entry["key"], None)
        self._answers[entry["key"]] = entry
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    def _open_journal(self, directory: Path) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # tenants' prompts and answers
        cutoff = self._clock() - self.ttl
        taken: list[Path] = []
        entries: list[dict[str, Any]] = []
        for path in sorted(directory.glob("*.jsonl")):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError as exc:
                log.warning("Cannot read the answer journal %s: %s", path, exc)
                continue
            owner = path.name.split("-", 1)[0]
            if not (owner.isdigit() and pid_alive(int(owner))):
                taken.append(path)  # a running engine (one still exiting, say) keeps its own file
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(entry, dict) and isinstance(entry.get("at"), (int, float)):
                    entries.append(entry)
        for entry in sorted(entries, key=lambda e: e["at"]):
            if entry["at"] > cutoff and {"key", "fp", "out"} <= entry.keys():
                self._keep(entry)
        self._path = directory / f"{os.getpid()}-{time.time_ns()}.jsonl"
        self._rewrite()
        for path in taken:
            path.unlink(missing_ok=True)

    def _rewrite(self) -> None:
        """Write the kept answers to this engine's file, replacing what it held (lock held)."""
        assert self._path is not None
        tmp = self._path.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            for entry in self._answers.values():
                f.write(json.dumps(entry) + "\n")
        os.replace(tmp, self._path)
        if self._file is not None:
            self._file.close()
        self._file = open(self._path, "a", buffering=1)  # noqa: SIM115
        self._written = len(self._answers)
