"""tpm-faas: serverless functions for calls to trillion-parameter models.

```python
import faas

@faas.function(model="tiny-llama", timeout=60)
def complete(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 16, "temperature": 0}).text

complete.remote("The quick brown")
```
"""

from faas._client import Client
from faas._client_protocol import FaasClient, UnsupportedOperationError
from faas._default_client import configure, get_client, put, shutdown
from faas._function import Function, function
from faas._future import Future
from faas._gc_cloud import GlobusComputeCloudClient, GlobusComputeConfigError
from faas._progress import gather
from faas._remote import RemoteClient
from faas._triggers import Outputs
from registry import BindingError, FunctionSpec, ModelSpec, TriggerBinding
from runtime import (
    AuthError,
    ChatResult,
    EngineError,
    EngineLost,
    FaasError,
    FunctionDefinitionError,
    GenerateResult,
    IntegrityError,
    InvocationCancelled,
    InvocationError,
    InvocationRecord,
    InvocationTimeout,
    Model,
    ModeNotAllowedError,
    NotFoundError,
    ObjectExists,
    ObjectNotFound,
    ObjectRef,
    PoolClosedError,
    QuotaExceededError,
    Ref,
    RemoteError,
    SamplingParams,
    SerializationError,
    ServiceError,
    StoreAuthError,
    StoreError,
    SubmitError,
    TextStream,
    UnknownModelError,
    UnsupportedFeatureError,
    WorkerLost,
    WorkerStartError,
)
from warmpool import BackPressureError

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BackPressureError",
    "BindingError",
    "ChatResult",
    "Client",
    "EngineError",
    "EngineLost",
    "FaasClient",
    "FaasError",
    "Function",
    "FunctionDefinitionError",
    "FunctionSpec",
    "Future",
    "GenerateResult",
    "GlobusComputeCloudClient",
    "GlobusComputeConfigError",
    "IntegrityError",
    "InvocationCancelled",
    "InvocationError",
    "InvocationRecord",
    "InvocationTimeout",
    "ModeNotAllowedError",
    "Model",
    "ModelSpec",
    "NotFoundError",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectRef",
    "Outputs",
    "PoolClosedError",
    "QuotaExceededError",
    "Ref",
    "RemoteClient",
    "RemoteError",
    "SamplingParams",
    "SerializationError",
    "ServiceError",
    "StoreAuthError",
    "StoreError",
    "SubmitError",
    "TextStream",
    "TriggerBinding",
    "UnknownModelError",
    "UnsupportedFeatureError",
    "UnsupportedOperationError",
    "WorkerLost",
    "WorkerStartError",
    "__version__",
    "configure",
    "function",
    "gather",
    "get_client",
    "put",
    "shutdown",
]
