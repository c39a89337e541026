"""The CPU engine's answer journal: an invocation's answered request is not run twice.

The ledger on its own (keys, digests, bounds, taking over a dead engine's file), then a
real engine process: a later attempt of the same invocation gets the first attempt's
answer from the journal (the request log says ``replayed``), across an engine restart
too, streamed or not; anything that differs runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from runtime import new_id
from tests.warmpool._cpu_engine_proc import running_engine
from warmpool.cpu_engine._journal import RequestLedger, answer_key
from warmpool.cpu_engine._requests import GenOutput, GenRequest, SamplingParams


def request(rid: str, ids: list[int], **params: Any) -> GenRequest:
    return GenRequest(rid=rid, input_ids=ids, params=SamplingParams(**params), on_finish=lambda _o: None)


def output(rid: str, text: str, finish: str = "length") -> GenOutput:
    return GenOutput(rid, [1, 2], text, {"type": finish}, prompt_tokens=3, e2e_latency=0.1)


def run(ledger: RequestLedger, req: GenRequest, out: GenOutput) -> None:
    """What the batcher does: look the request up as it arrives, report it when it ends."""
    assert ledger.replay(req) is None
    ledger.finished(req, out)


def test_keys_name_the_invocation_and_call_not_the_attempt() -> None:
    inv = new_id()
    assert answer_key(f"inv-{inv}-0-3") == answer_key(f"inv-{inv}-7-3") == f"{inv}-3"
    assert answer_key(f"inv-{inv}-0-3-1") == f"{inv}-3-1"  # one of n sequences
    assert answer_key(f"inv-{inv}000112-1-0") == f"{inv}000112-0"  # a batch line's id
    assert answer_key(f"inv-{inv}-0-4") != answer_key(f"inv-{inv}-0-3")
    for other in ("faas-1", f"inv-{inv}-x-1", f"inv-{inv[:8]}-0-1", "local-3", f"inv-{inv}-0-1/../2"):
        assert answer_key(other) is None, other


def test_replays_only_the_same_request_and_bounds_what_it_keeps(tmp_path: Path) -> None:
    now = [1000.0]
    log, clock = tmp_path / "log.jsonl", lambda: now[0]
    ledger = RequestLedger(log, tmp_path / "j", max_entries=3, ttl=60, clock=clock)
    inv = new_id()
    run(ledger, request(f"inv-{inv}-0-0", [5, 6], temperature=0.7), output("x", "first"))
    again = ledger.replay(request(f"inv-{inv}-1-0", [5, 6], temperature=0.7))
    assert again is not None and again.text == "first" and again.rid == f"inv-{inv}-1-0"
    assert ledger.replay(request(f"inv-{inv}-1-0", [5, 7], temperature=0.7)) is None  # other prompt
    assert ledger.replay(request(f"inv-{inv}-1-0", [5, 6], temperature=0.8)) is None  # other params
    assert ledger.replay(request(f"inv-{inv}-1-1", [5, 6], temperature=0.7)) is None  # other call
    # Sent in a streamed batch this time (finals only): the same request, the same answer.
    batched = ledger.replay(request(f"inv-{inv}-1-0", [5, 6], temperature=0.7, stream_interval=2**31 - 1))
    assert batched is not None and batched.text == "first"
    aborted = new_id()
    run(ledger, request(f"inv-{aborted}-0-0", [1]), output("x", "cut", finish="abort"))
    assert ledger.replay(request(f"inv-{aborted}-1-0", [1])) is None  # only clean finishes are kept
    for i in range(3):  # the first answer is evicted by three newer ones
        run(ledger, request(f"inv-{new_id()}-0-0", [i]), output("x", f"n{i}"))
    assert ledger.replay(request(f"inv-{inv}-2-0", [5, 6], temperature=0.7)) is None
    finishes = [json.loads(line)["finish"] for line in log.read_text().splitlines()]
    assert finishes == ["length", "replayed", "replayed", "abort", "length", "length", "length"]
    ledger.close()
    now[0] += 61  # past the ttl: a new engine takes nothing in
    assert RequestLedger(None, tmp_path / "j", ttl=60, clock=lambda: now[0])._answers == {}


def test_a_new_engine_reads_every_file_and_takes_over_those_of_dead_engines(tmp_path: Path) -> None:
    journal = tmp_path / "j"
    journal.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    inv, live_inv = new_id(), new_id()
    good = RequestLedger(None, tmp_path / "scratch")
    run(good, request(f"inv-{inv}-0-0", [9]), output("x", "kept"))
    [line] = next((tmp_path / "scratch").glob("*.jsonl")).read_text().splitlines()
    dead_file = journal / f"{int(dead.stdout)}-1.jsonl"
    dead_file.write_text(line + "\n" + '{"key": "torn", "fp": "ab')  # a kill cut the last line short
    live_entry = {**json.loads(line), "key": f"{live_inv}-0"}
    live_file = journal / f"{os.getpid()}-1.jsonl"  # this process: alive
    live_file.write_text(json.dumps(live_entry) + "\n")
    taker = RequestLedger(None, journal)
    assert taker.replay(request(f"inv-{inv}-5-0", [9])).text == "kept"  # type: ignore[union-attr]
    assert taker.replay(request(f"inv-{live_inv}-5-0", [9])).text == "kept"  # type: ignore[union-attr]
    assert not dead_file.exists() and live_file.exists()
    assert len(list(journal.glob("*.jsonl"))) == 2  # the live engine's and the taker's own


def _log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _chat_text(http: httpx.Client, rid: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "The quick brown"}], "rid": rid}
    body.update(max_tokens=6, temperature=1.0, stream=True)
    text = ""
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    return text


def test_an_engine_answers_a_retried_invocation_from_its_journal(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    journal, log = tmp_path / "answers", tmp_path / "requests.jsonl"
    flags = ("--answer-journal", str(journal), "--request-log", str(log))
    inv, chat_inv = new_id(), new_id()
    body = {"text": "Once upon a", "sampling_params": {"max_new_tokens": 8, "temperature": 1.0}}
    (tmp_path / "one").mkdir()
    with (
        running_engine(tiny_model_path, tmp_path / "one", *flags) as engine,
        httpx.Client(base_url=engine.url, timeout=60) as http,
    ):
        first = http.post("/generate", json={**body, "rid": f"inv-{inv}-0-0"}).json()
        second = http.post("/generate", json={**body, "rid": f"inv-{inv}-1-0"}).json()
        assert second["text"] == first["text"] and second["meta_info"]["id"] == f"inv-{inv}-1-0"
        other = {**body, "text": "Once upon"}  # the same call sending another prompt: runs, is kept
        changed = http.post("/generate", json={**other, "rid": f"inv-{inv}-2-0"}).json()
        http.post("/generate", json={**body, "rid": "plain-1"})  # no invocation in the rid: runs
        streamed = _chat_text(http, f"inv-{chat_inv}-0-0")
        assert _chat_text(http, f"inv-{chat_inv}-1-0") == streamed  # one chunk, the same text
    finishes = [e["finish"] if e["finish"] == "replayed" else "ran" for e in _log(log)]  # or stop, length
    assert finishes == ["ran", "replayed", "ran", "ran", "ran", "replayed"]
    (tmp_path / "two").mkdir()
    with (
        running_engine(tiny_model_path, tmp_path / "two", *flags) as engine,
        httpx.Client(base_url=engine.url, timeout=60) as http,
    ):  # a new engine process, as after a SIGKILLed service's restart
        third = http.post("/generate", json={**other, "rid": f"inv-{inv}-3-0"}).json()
        assert third["text"] == changed["text"]
    assert _log(log)[-1]["finish"] == "replayed" and _log(log)[-1]["rid"] == f"inv-{inv}-3-0"
    assert len(list(journal.glob("*.jsonl"))) == 1  # the second engine took the first one's file over
