"""Where trigger events come from: a Protocol and two sources.

:class:`EventSource` yields :class:`ObjectEvent` s. :class:`SqsSource` reads S3
bucket notifications (direct, through SNS, or through EventBridge) from an SQS
queue; :class:`PollingSource` lists a prefix every ``interval`` seconds, for
stores without notifications (SeaweedFS, directories) and as the reconciler
that catches lost notifications everywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote_plus

from faas.triggers._buckets import Bucket, ObjectEvent
from registry import TriggerBinding

log = logging.getLogger("faas.triggers")

Clock = Callable[[], float]


@runtime_checkable
class EventSource(Protocol):
    """Something that reports new objects. ``poll`` may return the same object many times."""

    name: str

    def poll(self, wait: float) -> list[ObjectEvent]:
        """Return new events, waiting at most ``wait`` seconds when there are none."""
        ...

    def ack(self, events: Sequence[ObjectEvent]) -> None:
        """Tell the source these events are durably recorded (or not wanted)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class PollingSource:
    """Lists a prefix at most every ``interval`` seconds; each listing is a full snapshot.

    Args:
        bucket: The bucket to list.
        prefix: Key prefix.
        interval: Seconds between listings (the first listing is immediate).
        clock: Wall clock (injectable).
    """

    def __init__(self, bucket: Bucket, prefix: str, interval: float, *, clock: Clock = time.time) -> None:
        self.bucket, self.prefix, self.interval, self._clock = bucket, prefix, interval, clock
        self.name = f"poll:{bucket.name}/{prefix}"
        self._next = float("-inf")
        self.listings = 0

    def due(self) -> bool:
        """Whether the next listing is due."""
        return self._clock() >= self._next

    def seconds_to_next(self) -> float:
        """Seconds until the next listing is due (0 if it is)."""
        return max(0.0, self._next - self._clock())

    def trigger(self) -> None:
        """Make the next ``poll`` list at once."""
        self._next = float("-inf")

    def poll(self, wait: float = 0.0) -> list[ObjectEvent]:
        """List the prefix if due (``wait`` is ignored: listing never blocks for news)."""
        if not self.due():
            return []
        self._next = self._clock() + self.interval
        self.listings += 1
        name = self.bucket.name
        return [
            ObjectEvent(name, i.key, i.etag, i.size, i.modified, origin="listing")
            for i in self.bucket.list(self.prefix)
        ]

    def ack(self, events: Sequence[ObjectEvent]) -> None:
        """Nothing to acknowledge."""

    def close(self) -> None:
        """Nothing to close."""


def _when(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str) and value:
        with contextlib.suppress(ValueError, OverflowError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return time.time()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def usable_key(key: str) -> bool:
    """Whether an event's key can name an object here and an output beside it.

    Keys with empty, ``.`` or ``..`` parts, a NUL, a leading ``/`` or more than
    1,024 bytes are refused: they could climb out of a prefix on a file store.
    """
    if not key or "\0" in key or key.startswith("/") or len(key.encode("utf-8", "surrogatepass")) > 1024:
        return False
    return not any(part in ("", ".", "..") for part in key.split("/"))


def parse_message(body: str, *, decode_eventbridge_keys: bool = False, _depth: int = 0) -> list[ObjectEvent]:
    """The object-created events in one SQS message body (others yield nothing).

    Understands S3 notifications (``Records``, keys URL-decoded), the same
    wrapped in an SNS envelope, and EventBridge ``Object Created`` events.
    ``s3:TestEvent`` messages, deletions and unparseable bodies yield nothing,
    and so do events whose fields have the wrong types or whose key is not
    usable (see :func:`usable_key`): a malformed message never raises.
    """
    try:
        doc = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        log.warning("Ignoring an SQS message that is not JSON: %.200r", body)
        return []
    if not isinstance(doc, dict):
        return []
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str) and _depth < 2:
        return parse_message(
            doc["Message"], decode_eventbridge_keys=decode_eventbridge_keys, _depth=_depth + 1
        )
    if doc.get("Event") == "s3:TestEvent":
        return []
    events: list[ObjectEvent] = []
    records = doc.get("Records")
    for rec in records if isinstance(records, list) else []:
        rec = _dict(rec)
        if not str(rec.get("eventName", "")).startswith("ObjectCreated"):
            continue
        s3 = _dict(rec.get("s3"))
        obj = _dict(s3.get("object"))
        key = unquote_plus(str(obj.get("key", "")))
        etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
        when = _when(rec.get("eventTime"))
        bucket = _dict(s3.get("bucket")).get("name", "")
        events.append(ObjectEvent(str(bucket), key, etag, _size(obj.get("size")), when))
    if doc.get("source") == "aws.s3" and doc.get("detail-type") == "Object Created":
        detail = _dict(doc.get("detail"))
        obj = _dict(detail.get("object"))
        key = str(obj.get("key", ""))
        key = unquote_plus(key) if decode_eventbridge_keys else key
        etag = str(obj.get("etag") or obj.get("eTag") or "").strip('"')
        when = _when(doc.get("time"))
        bucket = _dict(detail.get("bucket")).get("name", "")
        events.append(ObjectEvent(str(bucket), key, etag, _size(obj.get("size")), when))
    usable = [e for e in events if e.bucket and e.etag and usable_key(e.key)]
    if len(usable) < len([e for e in events if e.bucket and e.key and e.etag]):
        log.warning("Ignoring object-created events with unusable keys in: %.200r", body)
    return usable


def _region_of(queue_url: str, region: str | None) -> str:
    if region:
        return region
    host = queue_url.split("://", 1)[-1].split("/", 1)[0]
    parts = host.split(".")
    if len(parts) >= 4 and parts[0] == "sqs":
        return parts[1]
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


class SqsSource:
    """S3 notifications (or EventBridge events) delivered to an SQS queue.

    A receiver thread long-polls the queue and keeps up to ``buffer`` events
    ready, so a slow queue never holds up the runner's pass. Messages are
    deleted by :meth:`ack`, after the runner has recorded their events
    durably; messages with no object-created event in them (the
    ``s3:TestEvent``, deletions) are deleted at once. A message not
    acknowledged within ``visibility_timeout`` is delivered again (and
    deduplicated).

    Args:
        queue_url: The queue.
        endpoint_url: SQS endpoint (None: AWS; moto serves SQS on its S3 port).
        region: Region (default: from the AWS queue URL, else the environment, else us-east-1).
        buffer: Events received ahead of the runner, at most.
        long_poll: Seconds each receive waits for messages (1 to 20).
        visibility_timeout: Seconds a received message stays hidden before redelivery.
        decode_eventbridge_keys: URL-decode EventBridge keys too.
    """

    def __init__(
        self,
        queue_url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        buffer: int = 200,
        long_poll: int = 1,
        visibility_timeout: int = 120,
        decode_eventbridge_keys: bool = False,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.queue_url, self.name = queue_url, f"sqs:{queue_url}"
        self.buffer, self.long_poll = buffer, max(1, min(20, long_poll))
        self.visibility_timeout = visibility_timeout
        self.decode_eventbridge_keys = decode_eventbridge_keys
        config = Config(retries={"mode": "standard", "max_attempts": 3}, read_timeout=30, connect_timeout=5)
        self.client: Any = boto3.session.Session().client(
            "sqs", endpoint_url=endpoint_url, region_name=_region_of(queue_url, region), config=config
        )
        self.received = self.skipped = 0
        self._ready: deque[ObjectEvent] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"SqsSource({self.queue_url!r})"

    def poll(self, wait: float) -> list[ObjectEvent]:
        """Return the events received so far, waiting up to ``wait`` seconds if there are none."""
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._receive_loop, name="faas-sqs", daemon=True)
                self._thread.start()
            if not self._ready and wait > 0:
                self._cond.wait(wait)
            events = list(self._ready)
            self._ready.clear()
            self._cond.notify_all()
        return events

    def _receive_loop(self) -> None:
        while True:
            with self._cond:
                while len(self._ready) >= self.buffer and not self._closed:
                    self._cond.wait(0.5)
                if self._closed:
                    return
            try:
                events = self.receive(self.long_poll)
            except Exception as exc:
                log.warning("Receiving from %s failed; trying again in 1 s: %s", self.queue_url, exc)
                with self._cond:
                    self._cond.wait(1.0)
                continue
            with self._cond:
                self._ready.extend(events)
                self._cond.notify_all()

    def receive(self, wait: int) -> list[ObjectEvent]:
        """One ReceiveMessage call (up to 10 messages), parsed; empty messages are deleted."""
        resp = self.client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait,
            VisibilityTimeout=self.visibility_timeout,
        )
        messages = resp.get("Messages", [])
        self.received += len(messages)
        events, empty = [], []
        for msg in messages:
            parsed = parse_message(msg["Body"], decode_eventbridge_keys=self.decode_eventbridge_keys)
            if not parsed:
                empty.append(msg["ReceiptHandle"])
            events += [_with(ev, receipt=msg["ReceiptHandle"], body=msg["Body"]) for ev in parsed]
        self.skipped += len(empty)
        self._delete(empty)
        return events

    def ack(self, events: Sequence[ObjectEvent]) -> None:
        """Delete the events' messages."""
        self._delete([e.receipt for e in events if e.receipt])

    def _delete(self, receipts: Sequence[str]) -> None:
        unique = list(dict.fromkeys(receipts))
        for i in range(0, len(unique), 10):
            entries = [{"Id": str(n), "ReceiptHandle": r} for n, r in enumerate(unique[i : i + 10])]
            self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)

    def send_raw(self, bodies: Sequence[str]) -> None:
        """Put raw messages on the queue (tests use it to deliver notifications twice)."""
        for i in range(0, len(bodies), 10):
            entries = [{"Id": str(n), "MessageBody": b} for n, b in enumerate(bodies[i : i + 10])]
            self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)

    def close(self) -> None:
        """Stop the receiver thread and close the client's connections."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(self.long_poll + 5)
        with contextlib.suppress(Exception):
            self.client.close()


def _with(ev: ObjectEvent, **changes: Any) -> ObjectEvent:
    return dataclasses.replace(ev, **changes)


def default_sources(binding: TriggerBinding, src: Bucket, *, clock: Clock = time.time) -> list[EventSource]:
    """The sources of ``binding``: its SQS queue (if any), then a polling reconciler over its prefix."""
    sources: list[EventSource] = []
    if binding.queue_url:
        sources.append(SqsSource(binding.queue_url, endpoint_url=binding.endpoint_url, region=binding.region))
    sources.append(PollingSource(src, binding.prefix, binding.poll_interval, clock=clock))
    return sources
