"""Trigger bindings: which function runs for which new objects, stored in the registry.

A :class:`TriggerBinding` ties a registered function version (by digest) to a
location, a bucket plus a key prefix and suffix, and says where outputs go.
Bindings are validated when they are created, so a binding that could never
work, or that would feed its own outputs back to itself, is refused before
anything runs.

Layout under the store::

    registry/triggers/<name>.json    the binding's current revision
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime import BindingError, ObjectNotFound, ObjectStore, UnknownBindingError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
BINDINGS_PREFIX = "registry/triggers/"

StorageKind = Literal["s3", "file"]


class TriggerBinding(BaseModel):
    """A function bound to new objects under a bucket prefix.

    Attributes:
        name: The binding's name (also names its state in the store).
        function: Name of the registered function.
        function_version: The registered version the binding runs.
        function_digest: sha256 of that version's artifact; part of every dedup key.
        previous_digests: Digests the binding ran before; objects they finished
            are not processed again (unless the binding was re-created with
            ``reprocess=True``).
        storage: ``"s3"`` (an S3 bucket) or ``"file"`` (a directory).
        bucket: S3 bucket name, or directory (absolute, or relative to a file
            store's root).
        prefix: Only keys starting with this are processed.
        suffix: Only keys ending with this are processed.
        output_prefix: Where outputs go: ``output_prefix + <key after the
            prefix's directory> + output_suffix``.
        output_suffix: Appended to the output name (``""`` keeps the key's name).
        output_bucket: Bucket (or directory) for outputs; None means ``bucket``.
        endpoint_url: S3 endpoint (None: AWS).
        region: S3/SQS region (None: boto3's default chain).
        path_style: Path-style S3 addressing.
        queue_url: SQS queue receiving the bucket's notifications (S3 or
            EventBridge); None means the binding polls only.
        poll_interval: Seconds between listings of the prefix. With a queue
            this is the reconciler that catches lost notifications.
        max_concurrency: Invocations of this binding in flight at once.
        max_attempts: Attempts (the first plus retries) before an object goes
            to the dead-letter records.
        lease_seconds: A runner whose heartbeat is older than this is taken as
            dead, and its unfinished objects are processed by another.
        process_existing: Also process objects that were there before the
            binding was created.
        paused: A paused binding claims nothing new; work in flight finishes.
        created_at: When the binding was first created (seconds since the epoch).
        updated_at: When this revision was stored.
        revision: Grows by one with every stored change.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    function: str
    function_version: int = Field(ge=0)
    function_digest: str
    previous_digests: list[str] = Field(default_factory=list)
    storage: StorageKind = "s3"
    bucket: str
    prefix: str = ""
    suffix: str = ""
    output_prefix: str
    output_suffix: str = ".out"
    output_bucket: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    queue_url: str | None = None
    poll_interval: float = Field(5.0, gt=0)
    max_concurrency: int = Field(8, ge=1)
    max_attempts: int = Field(3, ge=1)
    lease_seconds: float = Field(60.0, gt=0)
    process_existing: bool = True
    paused: bool = False
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    revision: int = 1

    @property
    def digests(self) -> list[str]:
        """The current digest followed by the previous ones."""
        return [self.function_digest, *(d for d in self.previous_digests if d != self.function_digest)]

    @property
    def out_bucket(self) -> str:
        """The bucket (or directory) outputs are written to."""
        return self.output_bucket or self.bucket

    def matches(self, key: str) -> bool:
        """Whether ``key`` is an input of this binding (and not one of its outputs)."""
        if not key.startswith(self.prefix) or not key.endswith(self.suffix) or key.endswith("/"):
            return False
        return not (self.out_bucket == self.bucket and key.startswith(self.output_prefix))

    def relative_name(self, key: str) -> str:
        """The part of ``key`` below the prefix's directory (``raw/run`` + ``raw/run1/a`` -> ``run1/a``)."""
        base = self.prefix[: self.prefix.rfind("/") + 1]
        return key[len(base) :]

    def output_key(self, key: str) -> str:
        """Where the return value of the invocation for ``key`` is written."""
        return self.output_prefix + self.relative_name(key) + self.output_suffix

    def dedup_id(self, bucket: str, key: str, etag: str, digest: str | None = None) -> str:
        """The dedup record id of one object version for one function digest."""
        text = "|".join((bucket, key, etag.strip('"'), digest or self.function_digest))
        return hashlib.sha256(text.encode()).hexdigest()


def _problems(b: TriggerBinding) -> list[str]:
    out: list[str] = []
    if not _NAME.fullmatch(b.name):
        out.append(
            f"the name {b.name!r} is not valid (use letters, digits, '_', '.', '-', at most 128, "
            "starting with a letter or '_')"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", b.function_digest):
        out.append(f"the function digest {b.function_digest!r} is not a sha256 hex digest")
    for what, bucket in (("bucket", b.bucket), ("output_bucket", b.output_bucket)):
        if bucket is None:
            continue
        if b.storage == "s3" and not _S3_BUCKET.fullmatch(bucket):
            out.append(
                f"the {what} {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
                "digits, '.' or '-')"
            )
        if b.storage == "file" and (not bucket or "\0" in bucket):
            out.append(f"the {what} {bucket!r} is not a usable directory")
    for what, text in (("prefix", b.prefix), ("output_prefix", b.output_prefix)):
        if text.startswith("/") or any(part in (".", "..") for part in text.split("/")):
            out.append(f"the {what} {text!r} must be a relative key prefix without '.' or '..' parts")
    if b.out_bucket == b.bucket:
        if not b.output_prefix:
            out.append("output_prefix is empty, so outputs would land among the inputs")
        elif b.output_prefix.startswith(b.prefix):
            out.append(
                f"the output prefix {b.output_prefix!r} is inside the input prefix {b.prefix!r}, so "
                "every output would trigger the function again (a loop); use a prefix outside it or "
                "output_bucket"
            )
        elif b.prefix.startswith(b.output_prefix):
            out.append(
                f"the input prefix {b.prefix!r} is inside the output prefix {b.output_prefix!r}, so "
                "outputs could land among the inputs; use prefixes that do not overlap"
            )
    if b.storage == "file" and (b.queue_url or b.endpoint_url):
        out.append("a directory binding (storage='file') has no queue_url or endpoint_url")
    return out


def validate_binding(binding: TriggerBinding) -> TriggerBinding:
    """Check a binding and return it.

    Raises:
        BindingError: The binding is malformed; the message names every problem.
    """
    problems = _problems(binding)
    if problems:
        raise BindingError(f"Trigger binding {binding.name!r} is malformed: " + "; ".join(problems) + ".")
    return binding


def make_binding(**fields: Any) -> TriggerBinding:
    """Build and validate a binding from keyword fields.

    Raises:
        BindingError: A field is missing, has the wrong type, or the binding is malformed.
    """
    name = fields.get("name") or "?"
    if not fields.get("bucket"):
        raise BindingError(
            f"Trigger binding {name!r} is malformed: it needs a bucket (the S3 bucket or directory "
            "whose new objects run the function)."
        )
    if fields.get("output_prefix") is None:
        raise BindingError(
            f"Trigger binding {name!r} is malformed: it needs an output_prefix (where outputs go)."
        )
    try:
        binding = TriggerBinding(**fields)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'binding'}: {e['msg']}" for e in exc.errors()
        )
        raise BindingError(f"Trigger binding {name!r} is malformed: {details}.") from None
    return validate_binding(binding)


class Bindings:
    """Trigger bindings stored in an ObjectStore (``registry/triggers/<name>.json``).

    Args:
        store: The faas store (the same one the registry uses).
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    @staticmethod
    def key(name: str) -> str:
        """The store key of binding ``name``."""
        return f"{BINDINGS_PREFIX}{name}.json"

    def put(self, binding: TriggerBinding) -> TriggerBinding:
        """Validate and store ``binding`` as a new revision (replacing the current one).

        Raises:
            BindingError: The binding is malformed.
        """
        validate_binding(binding)
        try:
            current: TriggerBinding | None = self.get(binding.name)
        except UnknownBindingError:
            current = None
        stored = binding.model_copy(
            update={
                "revision": (current.revision + 1) if current else 1,
                "created_at": current.created_at if current else binding.created_at,
                "updated_at": time.time(),
            }
        )
        self.store.put(self.key(binding.name), stored.model_dump_json(indent=1).encode())
        return stored

    def get(self, name: str) -> TriggerBinding:
        """The stored binding ``name``.

        Raises:
            UnknownBindingError: None is stored under that name.
        """
        try:
            data = json.loads(self.store.get(self.key(name)))
        except ObjectNotFound:
            known = ", ".join(b.name for b in self.list()) or "none"
            raise UnknownBindingError(
                f"No trigger binding {name!r} is stored; the bindings are: {known}."
            ) from None
        return TriggerBinding.model_validate(data)

    def list(self) -> list[TriggerBinding]:
        """Every stored binding, by name."""
        out = []
        for key in self.store.list(BINDINGS_PREFIX):
            rest = key[len(BINDINGS_PREFIX) :]
            if "/" in rest or not rest.endswith(".json"):
                continue
            try:
                out.append(TriggerBinding.model_validate(json.loads(self.store.get(key))))
            except (ObjectNotFound, ValueError):
                continue  # deleted meanwhile, or not a binding
        return sorted(out, key=lambda b: b.name)

    def set_paused(self, name: str, paused: bool) -> TriggerBinding:
        """Pause or resume binding ``name`` and return the stored revision."""
        return self.put(self.get(name).model_copy(update={"paused": paused}))

    def delete(self, name: str) -> None:
        """Remove binding ``name`` (its dedup records stay, so re-creating it does not rerun work).

        Raises:
            UnknownBindingError: None is stored under that name.
        """
        self.get(name)
        self.store.delete(self.key(name))
