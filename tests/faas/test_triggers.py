"""Object-store triggers on directory buckets: bindings, dedup, failures, operations."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import faas
from faas.cli._main import app
from faas.triggers import BindingError, Bindings, TriggerRunner, TriggerState, parse_message
from tests.faas._trigger_helpers import drive, executions, log_execution, wait_for


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faas.Client]:
    c = faas.Client(store=tmp_path_factory.mktemp("store").as_uri(), workers=2, records="off")
    yield c
    c.shutdown()


def write(root: Path, key: str, text: str) -> None:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # writers rename into place, as the guide asks


def cli(client: faas.Client, *args: str) -> Any:
    result = CliRunner().invoke(app, ["triggers", *args, "--store", client.store.url()])
    assert result.exit_code == 0, result.output
    return result


def counting(log: Path, name: str) -> faas.Function[Any]:
    """A trigger function that logs each execution and returns a JSON summary."""

    @faas.function(name=name)
    def summarise(ref: faas.ObjectRef) -> dict[str, Any]:
        text = ref.read_text()
        log_execution(str(log), ref.key)
        return {"key": ref.key, "words": len(text.split())}

    return summarise


# -- binding validation -------------------------------------------------------------------


def test_malformed_bindings_are_rejected_before_anything_is_stored(
    client: faas.Client, tmp_path: Path
) -> None:
    fn = counting(tmp_path / "log", "never_bound").with_client(client)
    with pytest.raises(BindingError, match="needs a bucket"):
        fn.on_object(bucket="", prefix="in/", output_prefix="out/")
    with pytest.raises(BindingError, match="needs a bucket"):
        fn.on_object(prefix="in/", output_prefix="out/")
    with pytest.raises(BindingError, match=r"inside the input prefix .*loop"):
        fn.on_object(bucket=str(tmp_path), prefix="data/", output_prefix="data/results/")
    with pytest.raises(BindingError, match="inside the input prefix"):
        fn.on_object(bucket=str(tmp_path), output_prefix="results/")  # the whole bucket is input
    with pytest.raises(BindingError, match="inside the output prefix"):
        fn.on_object(bucket=str(tmp_path), prefix="out/raw/", output_prefix="out/")
    with pytest.raises(BindingError, match="needs an output_prefix"):
        fn.on_object(bucket=str(tmp_path), prefix="in/")
    with pytest.raises(BindingError, match="not a valid S3 bucket name"):
        fn.on_object(bucket="Bad_Bucket", storage="s3", prefix="in/", output_prefix="out/")
    with pytest.raises(BindingError, match="max_concurrency"):
        fn.on_object(bucket=str(tmp_path), prefix="in/", output_prefix="out/", max_concurrency=0)
    with pytest.raises(BindingError, match="Unknown trigger binding options"):
        fn.on_object(bucket=str(tmp_path), prefix="in/", output_prefix="out/", outptu_suffix=".x")

    @faas.function()
    def two_args(ref: faas.ObjectRef, scale: float) -> None:
        pass

    with pytest.raises(BindingError, match="cannot be a trigger function"):
        two_args.with_client(client).on_object(bucket=str(tmp_path), prefix="in/", output_prefix="out/")
    # Nothing was stored or registered.
    assert [b.name for b in Bindings(client.store).list() if b.name in ("never_bound", "two_args")] == []
    assert not [f for f in client.registry.list_functions() if f.name in ("never_bound", "two_args")]
    # An output bucket of its own may take any prefix.
    ok = fn.on_object(
        bucket=str(tmp_path / "a"), output_bucket=str(tmp_path / "b"), output_prefix="", name="other_bucket"
    )
    assert ok.output_key("x/y.dat") == "x/y.dat.out"


# -- processing -----------------------------------------------------------------------------


def test_each_object_is_processed_once_and_its_output_written(client: faas.Client, tmp_path: Path) -> None:
    log, data = tmp_path / "log", tmp_path / "data"
    fn = counting(log, "once").with_client(client)
    binding = fn.on_object(
        bucket=str(data), prefix="in/", suffix=".txt", output_prefix="out/", output_suffix=".json"
    )
    for i in range(30):
        write(data, f"in/run{i % 3}/sample {i}.txt", "alpha beta " * (i + 1))
    write(data, "in/ignored.csv", "not matched by the suffix")
    runner = TriggerRunner(client, bindings=["once"], functions=[fn], wait_seconds=0)
    outputs = lambda: sorted(p.relative_to(data).as_posix() for p in (data / "out").rglob("*.json"))  # noqa: E731
    drive(runner, lambda: len(outputs()) == 30 and runner.idle(), 60, "30 outputs")
    assert json.loads((data / "out/run1/sample 4.txt.json").read_text()) == {
        "key": "in/run1/sample 4.txt",
        "words": 10,
    }
    for _ in range(3):  # more passes, and a second runner on the same store: nothing runs again
        runner.run_once()
    other = TriggerRunner(client, bindings=["once"], functions=[fn], wait_seconds=0)
    other.run_once()
    assert other.idle()
    runner.stop()
    other.stop()
    assert sorted(executions(log)) == sorted(f"in/run{i % 3}/sample {i}.txt" for i in range(30))
    state = TriggerState(client.store, binding.name)
    assert len(state.done_ids()) == 30 and not state.dead_ids()
    done = state.read_done(
        binding.dedup_id(str(data), "in/run0/sample 0.txt", binding_etag(data, "in/run0/sample 0.txt"))
    )
    assert done is not None and done["output_key"] == "out/run0/sample 0.txt.json" and done["attempt"] == 1


def binding_etag(root: Path, key: str) -> str:
    st = os.stat(root / key)
    return f"{st.st_mtime_ns:x}-{st.st_size:x}"


def test_overwritten_object_is_processed_again(client: faas.Client, tmp_path: Path) -> None:
    log, data = tmp_path / "log", tmp_path / "data"
    fn = counting(log, "overwrite").with_client(client)
    fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", poll_interval=0.05)
    runner = TriggerRunner(client, bindings=["overwrite"], functions=[fn], wait_seconds=0)
    write(data, "in/a.txt", "one")
    out = data / "out/a.txt.out"
    drive(runner, lambda: out.exists() and runner.idle(), 30, "first output")
    assert json.loads(out.read_text())["words"] == 1
    write(data, "in/a.txt", "one two three")  # another size, so another etag
    drive(runner, lambda: json.loads(out.read_text())["words"] == 3 and runner.idle(), 30, "second output")
    runner.stop()
    assert executions(log) == ["in/a.txt", "in/a.txt"]


def test_failure_dead_letters_then_retry_succeeds_after_the_fix(client: faas.Client, tmp_path: Path) -> None:
    data = tmp_path / "data"

    @faas.function(name="fragile")
    def broken(ref: faas.ObjectRef) -> str:
        text = ref.read_text()
        if "bad" in text:
            raise ValueError(f"cannot parse {ref.key}: found 'bad'")
        return text.upper()

    fn = broken.with_client(client)
    binding = fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", max_attempts=2)
    write(data, "in/good.txt", "fine")
    write(data, "in/bad.txt", "bad data")
    runner = TriggerRunner(client, bindings=["fragile"], functions=[fn], wait_seconds=0, retry_backoff=0)
    state = TriggerState(client.store, "fragile")
    drive(runner, lambda: len(state.dead_ids()) == 1 and runner.idle(), 30, "a dead letter")
    assert (data / "out/good.txt.out").read_text() == "FINE"
    assert not (data / "out/bad.txt.out").exists()
    [dead] = state.dead_letters()
    assert dead["event"]["key"] == "in/bad.txt" and dead["attempts"] == 2 and dead["failures"] == 2
    assert dead["error"]["type"] == "ValueError" and "found 'bad'" in dead["error"]["message"]
    assert "raise ValueError" in dead["error"]["traceback"]
    assert dead["function_digest"] == binding.function_digest
    listed = cli(client, "failed", "fragile")
    assert "in/bad.txt" in listed.output and "ValueError: cannot parse in/bad.txt" in listed.output
    for _ in range(3):  # dead letters stay dead until asked
        runner.run_once()
    assert not (data / "out/bad.txt.out").exists()

    @faas.function(name="fragile")
    def fixed(ref: faas.ObjectRef) -> str:
        return ref.read_text().replace("bad", "good").upper()

    rebound = fixed.with_client(client).on_object(
        bucket=str(data), prefix="in/", output_prefix="out/", max_attempts=2
    )
    assert rebound.previous_digests == [binding.function_digest]
    assert "1 object(s) queued" in cli(client, "retry", "fragile").output
    runner.reload()
    runner.reconcile_now()
    drive(runner, lambda: (data / "out/bad.txt.out").exists() and runner.idle(), 30, "the retried output")
    runner.stop()
    assert (data / "out/bad.txt.out").read_text() == "GOOD DATA"
    assert (data / "out/good.txt.out").read_text() == "FINE"  # not reprocessed by the new version
    assert not state.dead_ids() and "no failed objects" in cli(client, "failed", "fragile").output


def test_function_writes_several_outputs_through_its_handle(client: faas.Client, tmp_path: Path) -> None:
    data = tmp_path / "data"

    @faas.function(name="splitter")
    def split(ref: faas.ObjectRef, out: faas.Outputs) -> None:
        for n, line in enumerate(ref.lines()):
            out.put(f"line-{n}.txt", line.strip())

    fn = split.with_client(client)
    fn.on_object(bucket=str(data), prefix="in/", output_prefix="parts/")
    write(data, "in/doc.txt", "first\nsecond\nthird\n")
    runner = TriggerRunner(client, bindings=["splitter"], functions=[fn], wait_seconds=0)
    drive(
        runner, lambda: len(list((data / "parts").rglob("line-*.txt"))) == 3 and runner.idle(), 30, "3 parts"
    )
    runner.stop()
    assert (data / "parts/doc.txt/line-1.txt").read_text() == "second"
    assert not (data / "parts/doc.txt.out").exists()  # returned None: no return-value output


def test_pause_and_resume(client: faas.Client, tmp_path: Path) -> None:
    log, data = tmp_path / "log", tmp_path / "data"
    fn = counting(log, "pausable").with_client(client)
    fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", poll_interval=0.05)
    cli(client, "pause", "pausable")
    runner = TriggerRunner(client, bindings=["pausable"], functions=[fn], wait_seconds=0)
    for i in range(5):
        write(data, f"in/{i}.txt", "x")
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        runner.run_once()
    assert executions(log) == [] and not (data / "out").exists()
    cli(client, "resume", "pausable")
    runner.reload()
    drive(runner, lambda: len(executions(log)) == 5 and runner.idle(), 30, "5 executions after resume")
    runner.stop()
    assert len(list((data / "out").glob("*.out"))) == 5


def test_concurrency_bound_leaves_room_for_interactive_calls(client: faas.Client, tmp_path: Path) -> None:
    data = tmp_path / "data"

    @faas.function(name="slow_trigger")
    def slow(ref: faas.ObjectRef) -> str:
        time.sleep(0.25)
        return ref.key

    @faas.function()
    def interactive(x: int) -> int:
        return x + 1

    fn = slow.with_client(client)
    fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", max_concurrency=2)
    for i in range(24):
        write(data, f"in/{i:02d}.txt", "x")
    runner = TriggerRunner(client, bindings=["slow_trigger"], functions=[fn]).start()
    try:
        wait_for(lambda: runner.metrics("slow_trigger")["inflight"] == 2, 20, "the flood to start")
        t0 = time.monotonic()
        assert interactive.with_client(client).remote(41) == 42
        took = time.monotonic() - t0
        backlog = runner.metrics("slow_trigger")["backlog"]
        wait_for(lambda: len(list((data / "out").glob("*.out"))) == 24, 60, "24 outputs")
    finally:
        runner.stop()
    metrics = runner.metrics("slow_trigger")
    assert took < 2.0, f"an interactive call waited {took:.2f} s behind the trigger flood"
    assert backlog >= 10, "the interactive call should have run while the flood was still queued"
    assert metrics["max_inflight_seen"] == 2 and metrics["counters"]["done"] == 24


def test_a_dead_runner_s_claims_are_taken_over_after_its_lease(client: faas.Client, tmp_path: Path) -> None:
    log, data = tmp_path / "log", tmp_path / "data"
    fn = counting(log, "orphans").with_client(client)
    fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", lease_seconds=30, max_concurrency=1)
    for i in range(6):
        write(data, f"in/{i}.txt", "x y")
    crashed = TriggerRunner(client, bindings=["orphans"], functions=[fn], wait_seconds=0, runner_id="crashed")
    crashed.run_once()  # claims all six, dispatches one, then "dies": never collects, never stops
    state = TriggerState(client.store, "orphans")
    assert len(state.attempts()) == 6 and not state.done_ids()
    alive_now = TriggerRunner(client, bindings=["orphans"], functions=[fn], wait_seconds=0, runner_id="peer")
    alive_now.run_once()
    assert alive_now.idle(), "the holder's heartbeat is fresh: its claims are not taken"
    later = TriggerRunner(
        client, bindings=["orphans"], functions=[fn], wait_seconds=0, runner_id="successor",
        clock=lambda: time.time() + 60,
    )  # fmt: skip
    drive(later, lambda: len(state.done_ids()) == 6 and later.idle(), 30, "six outputs after takeover")
    for r in (crashed, alive_now, later):
        r.stop(timeout=5)
    assert later.metrics("orphans")["counters"]["recovered"] == 6
    assert len(list((data / "out").glob("*.out"))) == 6
    logged = executions(log)
    assert sorted(set(logged)) == [f"in/{i}.txt" for i in range(6)]
    assert len(logged) <= 7  # only the one the crashed runner had started may have run twice


def test_ls_reports_backlog_lag_and_failures(client: faas.Client, tmp_path: Path) -> None:
    log, data = tmp_path / "log", tmp_path / "data"
    fn = counting(log, "observed").with_client(client)
    fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", max_concurrency=1)
    for i in range(4):
        write(data, f"in/{i}.txt", "x")
    clock = [time.time() + 100.0]  # objects look 100 s old to this runner
    runner = TriggerRunner(
        client, bindings=["observed"], functions=[fn], wait_seconds=0, clock=lambda: clock[0]
    )
    runner.run_once()
    metrics = runner.metrics("observed")
    assert metrics["backlog"] == 4 and metrics["oldest_unprocessed_age"] >= 99
    rows = {r["name"]: r for r in json.loads(cli(client, "ls", "--json", "--max-age", "1000").output)}
    assert rows["observed"]["backlog"] == 4 and rows["observed"]["inflight"] == 1
    assert rows["observed"]["oldest_unprocessed_age"] >= 99
    drive(runner, lambda: runner.idle(), 30, "the backlog to drain")
    runner.write_status()
    rows = {r["name"]: r for r in json.loads(cli(client, "ls", "--json", "--max-age", "1000").output)}
    assert rows["observed"]["backlog"] == 0 and rows["observed"]["done"] == 4
    assert rows["observed"]["lag_p50"] >= 99 and rows["observed"]["failed"] == 0
    assert "observed" in cli(client, "ls").output
    runner.stop()


def test_cli_and_config_forms_create_bindings(client: faas.Client, tmp_path: Path) -> None:
    spec = client.register(counting(tmp_path / "log", "from_cli"))
    cli(client, "add", "cli_binding", "--function", spec.name, "--bucket", str(tmp_path / "d"),
        "--prefix", "raw/", "--output-prefix", "cooked/")  # fmt: skip
    config = tmp_path / "triggers.toml"
    config.write_text(
        f'[[trigger]]\nname = "toml_binding"\nfunction = "{spec.name}@{spec.version}"\n'
        f'bucket = "{tmp_path / "e"}"\nprefix = "a/"\noutput_prefix = "b/"\nmax_concurrency = 3\n'
    )
    cli(client, "apply", str(config))
    stored = {b.name: b for b in Bindings(client.store).list()}
    assert stored["cli_binding"].function_digest == spec.digest and stored["cli_binding"].prefix == "raw/"
    assert stored["toml_binding"].max_concurrency == 3
    bad = CliRunner().invoke(
        app, ["triggers", "add", "loop", "--function", spec.name, "--bucket", str(tmp_path),
              "--prefix", "x/", "--output-prefix", "x/y/", "--store", client.store.url()],
    )  # fmt: skip
    assert bad.exit_code == 2 and "loop" in bad.output
    cli(client, "rm", "cli_binding")
    assert "cli_binding" not in {b.name for b in Bindings(client.store).list()}


# -- notification parsing -------------------------------------------------------------------


def test_notification_messages_are_parsed_and_filtered() -> None:
    record = {
        "eventName": "ObjectCreated:Put", "eventTime": "2024-05-01T12:00:00.500Z",
        "s3": {"bucket": {"name": "b"}, "object": {"key": "in/a+b%2Bc%C3%A9.txt", "size": 3, "eTag": "abc"}},
    }  # fmt: skip
    [ev] = parse_message(json.dumps({"Records": [record]}))
    assert (ev.bucket, ev.key, ev.etag, ev.size) == ("b", "in/a b+cé.txt", "abc", 3)
    assert ev.event_time == pytest.approx(1714564800.5)
    assert parse_message(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"})) == []
    deleted = {**record, "eventName": "ObjectRemoved:Delete"}
    assert parse_message(json.dumps({"Records": [deleted]})) == []
    sns = {"Type": "Notification", "Message": json.dumps({"Records": [record]})}
    assert [e.key for e in parse_message(json.dumps(sns))] == ["in/a b+cé.txt"]
    bridge = {
        "source": "aws.s3", "detail-type": "Object Created", "time": "2024-05-01T12:00:00Z",
        "detail": {"bucket": {"name": "b"}, "object": {"key": "in/x y.txt", "size": 1, "etag": "e1"}},
    }  # fmt: skip
    [ev] = parse_message(json.dumps(bridge))
    assert (ev.key, ev.etag) == ("in/x y.txt", "e1")
    assert parse_message("not json") == [] and parse_message("[1, 2]") == []


def test_runner_thread_processes_objects_as_they_arrive(client: faas.Client, tmp_path: Path) -> None:
    log, data = tmp_path / "log", tmp_path / "data"
    fn = counting(log, "streaming").with_client(client)
    fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", poll_interval=0.1)
    errors: list[BaseException] = []
    with TriggerRunner(client, bindings=["streaming"], functions=[fn]):

        def produce() -> None:
            try:
                for i in range(10):
                    write(data, f"in/{i}.txt", "a b c")
            except BaseException as exc:  # pragma: no cover - surfaced below
                errors.append(exc)

        producer = threading.Thread(target=produce)
        producer.start()
        producer.join()
        wait_for(lambda: len(list((data / "out").glob("*.out"))) == 10, 30, "10 outputs")
    assert not errors and sorted(executions(log)) == sorted(f"in/{i}.txt" for i in range(10))


def test_a_late_older_version_does_not_replace_the_newer_output(client: faas.Client, tmp_path: Path) -> None:
    data, gate = tmp_path / "data", tmp_path / "release-v1"

    @faas.function(name="gated")
    def gated(ref: faas.ObjectRef) -> str:
        text = ref.read_text()
        deadline = time.monotonic() + 30
        while text == "v1" and not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # the workload: version 1 finishes only when the test says so
        return text.upper()

    fn = gated.with_client(client)
    binding = fn.on_object(bucket=str(data), prefix="in/", output_prefix="out/", poll_interval=0.05)
    runner = TriggerRunner(client, bindings=["gated"], functions=[fn], wait_seconds=0)
    write(data, "in/a.txt", "v1")
    v1 = binding_etag(data, "in/a.txt")
    drive(runner, lambda: runner.metrics("gated")["inflight"] == 1, 30, "version 1 running")
    write(data, "in/a.txt", "v2 is longer")  # another size, so another etag
    out = data / "out/a.txt.out"
    drive(runner, lambda: out.exists() and out.read_text() == "V2 IS LONGER", 30, "version 2's output")
    gate.touch()
    drive(runner, lambda: runner.idle(), 30, "version 1 to finish")
    runner.stop()
    assert out.read_text() == "V2 IS LONGER"
    marker = TriggerState(client.store, "gated").read_done(binding.dedup_id(str(data), "in/a.txt", v1))
    assert marker is not None and marker["state"] == "superseded"
