"""OpenAI's files and batch API on a real ``faas serve``, judged by the official ``openai`` client.

The service is a subprocess with real workers and the tiny Llama on the CPU
engine (a model registered with a request log: the engine's own record of
every request it finished, the side channel for "executed once"). The
clients are the official ones, sync and async, with the service tokens as
``api_key``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from registry import ModelSpec, Registry
from runtime import LocalStore
from tests.faas._service_proc import TOKENS, ServiceProc

MODEL = "batch-llama"


@dataclass
class Service:
    proc: ServiceProc
    request_log: Path

    def client(self, tenant: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.proc.url + "/v1", api_key=TOKENS[tenant], max_retries=0)

    def aclient(self, tenant: str = "alice") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.proc.url + "/v1", api_key=TOKENS[tenant], max_retries=0)


def register_model(root: Path, request_log: Path) -> None:
    engine_args = {"request_log": str(request_log), "max_batch_size": 16}
    Registry(LocalStore(root / "store")).register_model(
        ModelSpec(name=MODEL, engine="cpu", engine_args=engine_args, min_replicas=1)
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root: Path = tmp_path_factory.mktemp("openai-batches")
    log = root / "engine-requests.jsonl"
    register_model(root, log)
    proc = ServiceProc(root).start(timeout=180)
    try:
        yield Service(proc, log)
    finally:
        proc.stop()


def chat_line(custom_id: str, content: str, max_tokens: int = 6, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
    url = "/v1/chat/completions"
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {**body, **extra}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def wait_batch(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} is still {batch.status} ({batch.request_counts})")
        time.sleep(0.2)  # polling, as a client does; the deadline bounds it


def read_jsonl(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines() if line]


def test_a_batch_runs_every_line_once_and_writes_its_output(service: Service) -> None:
    client = service.client()
    lines = [chat_line(f"req-{i}", f"Say {i}", seed=i) for i in range(6)]
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(jsonl(lines))
    assert client.files.retrieve(upload.id).filename == "in.jsonl"
    assert client.files.content(upload.id).content == jsonl(lines)

    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"lab": "spectroscopy"},
    )
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == 6 and batch.metadata == {"lab": "spectroscopy"}
    done = wait_batch(client, batch.id, {"completed"})
    assert done.request_counts is not None and done.request_counts.completed == 6
    assert done.request_counts.failed == 0 and done.error_file_id is None
    assert done.output_file_id is not None and done.completed_at is not None

    out = read_jsonl(client, done.output_file_id)
    assert sorted(row["custom_id"] for row in out) == sorted(line["custom_id"] for line in lines)
    for row in out:
        assert row["error"] is None and row["response"]["status_code"] == 200
        body = row["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] >= 1

    # Each line is an ordinary invocation of the tenant: in the index, with a usage row.
    ids = {row["response"]["request_id"] for row in out}
    with service.proc.client("alice") as http:
        for inv in ids:
            view = http.get(f"/v1/invocations/{inv}").json()
            assert view["function_name"] == "openai.chat" and view["status"] == "succeeded"
        usage = http.get("/v1/usage", params={"limit": 100_000}).json()["rows"]
    mine = [u for u in usage if u["invocation_id"] in ids]
    assert len(mine) == 6 and all(u["function"] == "openai.chat" and u["prompt_tokens"] > 0 for u in mine)
    assert sum(u["completion_tokens"] for u in mine) == sum(
        row["response"]["body"]["usage"]["completion_tokens"] for row in out
    )

    # The batch's output is a file of the tenant's, listed and readable, nobody else's.
    assert done.output_file_id in {f.id for f in client.files.list()}
    with pytest.raises(openai.NotFoundError):
        service.client("bob").files.content(done.output_file_id)
    with pytest.raises(openai.NotFoundError):
        service.client("bob").batches.retrieve(batch.id)


def test_bad_batches_are_refused_before_anything_runs(service: Service) -> None:
    client = service.client()

    def upload(lines: list[dict[str, Any]] | bytes) -> str:
        data = lines if isinstance(lines, bytes) else jsonl(lines)
        return client.files.create(file=("bad.jsonl", data), purpose="batch").id

    good = upload([chat_line("a", "hi")])
    unknown_model = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    files = {
        "good": good,
        "repeated custom_id": upload([chat_line("a", "x"), chat_line("a", "y")]),
        "mixed urls": upload([chat_line("a", "x"), {**chat_line("b", "y"), "url": "/v1/embeddings"}]),
        "unknown model": upload([{**chat_line("a", "x"), "body": unknown_model}]),
        "negative max_tokens": upload([chat_line("a", "x", max_tokens=-3)]),
        "streamed": upload([chat_line("a", "x", stream=True)]),
        "not json": upload(b"{not json\n"),
    }
    chat, day = "/v1/chat/completions", "24h"
    # (input file, endpoint, window) -> the error and words its message must hold
    cases: list[tuple[str, str, str, type[Exception], str]] = [
        (good, "/v1/images", day, openai.BadRequestError, "endpoint"),
        (good, chat, "1h", openai.BadRequestError, "completion_window"),
        ("file-0123abcd", chat, day, openai.NotFoundError, "No file"),
        (files["repeated custom_id"], chat, day, openai.BadRequestError, "Line 2"),
        (files["mixed urls"], chat, day, openai.BadRequestError, "Line 2"),
        (files["unknown model"], chat, day, openai.BadRequestError, "Line 1"),
        (files["negative max_tokens"], chat, day, openai.BadRequestError, "max_tokens"),
        (files["streamed"], chat, day, openai.BadRequestError, "stream"),
        (files["not json"], chat, day, openai.BadRequestError, "not JSON"),
    ]
    before = len(client.batches.list(limit=100).data)
    for file_id, endpoint, window, error, words in cases:
        with pytest.raises(error) as caught:
            client.batches.create(
                input_file_id=file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window=window,  # type: ignore[arg-type]
            )
        assert words in str(caught.value), (file_id, endpoint, window, caught.value)
    assert len(client.batches.list(limit=100).data) == before  # none was recorded
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tuning")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service.proc.url + "/v1", api_key="wrong", max_retries=0).batches.list()


def test_a_cancelled_batch_stops_and_keeps_what_finished(service: Service) -> None:
    async def scenario() -> tuple[Any, Any]:
        client = service.aclient()
        lines = [chat_line(f"c-{i}", f"Count to {i}", max_tokens=48) for i in range(120)]
        upload = await client.files.create(file=("cancel.jsonl", jsonl(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        cancelling = await client.batches.cancel(batch.id)
        deadline = time.monotonic() + 120
        while (now := await client.batches.retrieve(batch.id)).status != "cancelled":
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.2)
        await client.close()
        return cancelling, now

    cancelling, batch = asyncio.run(scenario())
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    counts = batch.request_counts
    assert counts.total == 120 and counts.completed + counts.failed == 120 and counts.failed > 0
    client = service.client()
    errors = read_jsonl(client, batch.error_file_id)
    out = read_jsonl(client, batch.output_file_id) if batch.output_file_id else []
    assert len(errors) == counts.failed and len(out) == counts.completed
    assert sorted(r["custom_id"] for r in out + errors) == sorted(f"c-{i}" for i in range(120))
    assert all(r["error"]["code"] in ("cancelled", "batch_cancelled") for r in errors), errors[:3]
    listed = client.batches.list(limit=1)
    assert listed.data[0].id == batch.id and listed.has_more  # newest first, paged
    second = client.batches.list(limit=1, after=batch.id)
    assert second.data and second.data[0].id != batch.id


def test_a_batch_survives_a_service_sigkill(tmp_path: Path) -> None:
    """1,000 chat requests; the service is SIGKILLed midway and restarted; every line ends once."""
    log = tmp_path / "engine-requests.jsonl"
    register_model(tmp_path, log)
    n, inflight = 1000, 32
    proc = ServiceProc(tmp_path, limits={"alice": {"max_inflight": inflight}}).start(timeout=180)
    try:
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key=TOKENS["alice"], max_retries=0)
        lines = [chat_line(f"k-{i}", f"Line {i}", max_tokens=4) for i in range(n)]
        upload = client.files.create(file=("big.jsonl", jsonl(lines)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 180
        while (counts := client.batches.retrieve(batch.id).request_counts) and counts.completed < 100:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
        proc.kill()
        assert counts.completed < n, "the batch finished before the kill: the test proves nothing"
        proc.start(timeout=180)
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key=TOKENS["alice"], max_retries=0)
        done = wait_batch(client, batch.id, {"completed"}, timeout=300)
        assert done.request_counts.completed == n and done.request_counts.failed == 0
        out = read_jsonl(client, done.output_file_id)
        assert len(out) == n and sorted(r["custom_id"] for r in out) == sorted(f"k-{i}" for i in range(n))
        ids = {r["response"]["request_id"] for r in out}
        with proc.client("alice") as http:
            usage = http.get("/v1/usage", params={"limit": 100_000}).json()["rows"]
        assert sum(1 for u in usage if u["invocation_id"] in ids) == n  # one usage row per line
        # The engine's own log is the side channel: every request it generated to the end,
        # those it aborted (the kill dropped their workers' connections first), and those
        # it answered from its answer journal (finished before the kill, their results lost
        # with the service: the restarted engine does not generate them again).
        entries = [json.loads(entry) for entry in log.read_text().splitlines() if entry]
        executed = Counter(e["rid"].split("-")[1] for e in entries if e["finish"] in ("stop", "length"))
        aborted = [e for e in entries if e["finish"] == "abort"]
        replayed = [e for e in entries if e["finish"] == "replayed"]
        print(
            f"[sigkill batch] {counts.completed} of {n} lines completed before the kill; "
            f"{len(aborted)} requests aborted on the engine by the kill, {len(replayed)} answered "
            f"from the journal, {sum(executed.values())} executed, "
            f"{sum(c > 1 for c in executed.values())} twice"
        )
        assert set(executed) == ids  # every line executed
        assert all(c == 1 for c in executed.values())  # and each exactly once
        assert len(aborted) <= inflight
    finally:
        proc.stop()
