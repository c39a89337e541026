"""Object-store triggers: run a function once for every new object version under a prefix.

```python
import faas
from faas.triggers import TriggerRunner

@faas.function()
def measure(ref: faas.ObjectRef) -> dict:
    return {"bytes": len(ref.read_bytes())}

measure.on_object(bucket="beamline", prefix="raw/", output_prefix="measured/", suffix=".h5")
with TriggerRunner(faas.get_client()):
    ...  # runs until the block ends
```

See docs/triggers.md for AWS (S3 -> SQS, EventBridge), MinIO and SeaweedFS setups.
"""

from faas.triggers._binding import Outputs, create_binding, encode_output, failed, retry
from faas.triggers._buckets import Bucket, LocalBucket, ObjectEvent, ObjectInfo, S3Bucket, buckets_for
from faas.triggers._runner import TriggerRunner
from faas.triggers._setup import setup_eventbridge, setup_notifications
from faas.triggers._sources import EventSource, PollingSource, SqsSource, default_sources, parse_message
from faas.triggers._state import TriggerState
from registry import Bindings, TriggerBinding
from runtime import BindingError, UnknownBindingError

__all__ = [
    "BindingError",
    "Bindings",
    "Bucket",
    "EventSource",
    "LocalBucket",
    "ObjectEvent",
    "ObjectInfo",
    "Outputs",
    "PollingSource",
    "S3Bucket",
    "SqsSource",
    "TriggerBinding",
    "TriggerRunner",
    "TriggerState",
    "UnknownBindingError",
    "buckets_for",
    "create_binding",
    "default_sources",
    "encode_output",
    "failed",
    "parse_message",
    "retry",
    "setup_eventbridge",
    "setup_notifications",
]
