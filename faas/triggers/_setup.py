"""Point a bucket's notifications at a binding's SQS queue, merging with what is configured.

Both helpers read the bucket's notification configuration, replace only the
entry they own (``Id`` = ``faas-<binding>``) and write the rest back as it was,
so notifications that other tools configured keep working.
"""

from __future__ import annotations

import json
from typing import Any

from faas.triggers._sources import _region_of
from registry import TriggerBinding
from runtime import BindingError


def _clients(binding: TriggerBinding, queue_url: str) -> tuple[Any, Any, Any, str]:
    import boto3
    from botocore.config import Config

    if binding.storage != "s3":
        raise BindingError(
            f"Trigger binding {binding.name!r} reads a directory; only S3 buckets send notifications."
        )
    session = boto3.session.Session()
    region = _region_of(queue_url, binding.region)
    s3_config = Config(s3={"addressing_style": "path" if binding.path_style else "auto"})
    s3 = session.client("s3", endpoint_url=binding.endpoint_url, region_name=region, config=s3_config)
    sqs = session.client("sqs", endpoint_url=binding.endpoint_url, region_name=region)
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return s3, sqs, session, str(arn)


def _current(s3: Any, bucket: str) -> dict[str, Any]:
    config = dict(s3.get_bucket_notification_configuration(Bucket=bucket))
    config.pop("ResponseMetadata", None)
    return config


def _allow(sqs: Any, queue_url: str, arn: str, sid: str, service: str, source_arn: str) -> None:
    """Merge a statement letting ``service`` send to the queue into the queue policy."""
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["Policy"]).get("Attributes", {})
    policy: dict[str, Any] = {"Version": "2012-10-17", "Statement": []}
    if attrs.get("Policy"):
        policy = json.loads(attrs["Policy"])
    statements = [s for s in policy.get("Statement", []) if s.get("Sid") != sid]
    statements.append(
        {
            "Sid": sid,
            "Effect": "Allow",
            "Principal": {"Service": service},
            "Action": "sqs:SendMessage",
            "Resource": arn,
            "Condition": {"ArnEquals": {"aws:SourceArn": source_arn}},
        }
    )
    policy["Statement"] = statements
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(policy)})


def setup_notifications(
    binding: TriggerBinding, queue_url: str | None = None, *, queue_policy: bool = True
) -> dict[str, Any]:
    """Send the bucket's object-created notifications for the binding's prefix to its queue.

    Args:
        binding: An S3 binding.
        queue_url: The queue (default: the binding's ``queue_url``).
        queue_policy: Also allow S3 to send to the queue (merged into its policy).

    Returns:
        The notification configuration now on the bucket.

    Raises:
        BindingError: The binding reads a directory or names no queue.
    """
    queue_url = queue_url or binding.queue_url
    if not queue_url:
        raise BindingError(f"Trigger binding {binding.name!r} names no queue_url to send notifications to.")
    s3, sqs, _session, arn = _clients(binding, queue_url)
    if queue_policy:
        _allow(
            sqs,
            queue_url,
            arn,
            f"faas-{binding.name}-s3",
            "s3.amazonaws.com",
            f"arn:aws:s3:::{binding.bucket}",
        )
    own = f"faas-{binding.name}"
    config = _current(s3, binding.bucket)
    queues = [q for q in config.get("QueueConfigurations", []) if q.get("Id") != own]
    entry: dict[str, Any] = {"Id": own, "QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}
    rules = [
        {"Name": n, "Value": v} for n, v in (("prefix", binding.prefix), ("suffix", binding.suffix)) if v
    ]
    if rules:
        entry["Filter"] = {"Key": {"FilterRules": rules}}
    config["QueueConfigurations"] = [*queues, entry]
    s3.put_bucket_notification_configuration(Bucket=binding.bucket, NotificationConfiguration=config)
    return _current(s3, binding.bucket)


def setup_eventbridge(
    binding: TriggerBinding, queue_url: str | None = None, *, queue_policy: bool = True
) -> dict[str, Any]:
    """Turn on the bucket's EventBridge delivery and route its object-created events to the queue.

    Creates (or updates) the rule ``faas-<binding>`` on the default event bus,
    matching the bucket and the binding's prefix, with the queue as its target.

    Returns:
        ``{"rule_arn": ..., "notification": <bucket configuration>}``.

    Raises:
        BindingError: The binding reads a directory or names no queue.
    """
    queue_url = queue_url or binding.queue_url
    if not queue_url:
        raise BindingError(f"Trigger binding {binding.name!r} names no queue_url for EventBridge to target.")
    s3, sqs, session, arn = _clients(binding, queue_url)
    config = _current(s3, binding.bucket)
    config["EventBridgeConfiguration"] = {}
    s3.put_bucket_notification_configuration(Bucket=binding.bucket, NotificationConfiguration=config)
    events = session.client(
        "events", endpoint_url=binding.endpoint_url, region_name=_region_of(queue_url, binding.region)
    )
    detail: dict[str, Any] = {"bucket": {"name": [binding.bucket]}}
    if binding.prefix:
        detail["object"] = {"key": [{"prefix": binding.prefix}]}
    pattern = {"source": ["aws.s3"], "detail-type": ["Object Created"], "detail": detail}
    rule = f"faas-{binding.name}"
    rule_arn = events.put_rule(Name=rule, EventPattern=json.dumps(pattern), State="ENABLED")["RuleArn"]
    events.put_targets(Rule=rule, Targets=[{"Id": "faas-queue", "Arn": arn}])
    if queue_policy:
        _allow(sqs, queue_url, arn, f"faas-{binding.name}-events", "events.amazonaws.com", rule_arn)
    return {"rule_arn": rule_arn, "notification": _current(s3, binding.bucket)}
