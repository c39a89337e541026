"""tpm-faas: serverless functions for calls to trillion-parameter models.

```python
import faas

@faas.function(model="tiny-llama", timeout=60)
def complete(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 16, "temperature": 0}).text

complete.remote("The quick brown")
```
"""

from faas._function import Function, function
from faas._future import Future
from faas._progress import gather
from faas._provenance import read_provenance, replay
from faas.clients._default import configure, get_client, put, shutdown
from faas.clients._embedded import Client
from faas.clients._gc_cloud import GlobusComputeCloudClient
from faas.clients._protocol import FaasClient
from faas.clients._remote import RemoteClient
from faas.triggers._binding import Outputs
from registry import FunctionSpec, ModelSpec, TriggerBinding
from runtime import (
    AuthConfigError,
    AuthError,
    BackPressureError,
    BindingError,
    BudgetExceededError,
    ChatResult,
    ConfigError,
    EndpointRenderError,
    EngineError,
    EngineLost,
    EngineRejectedError,
    FaasError,
    ForbiddenError,
    FunctionDefinitionError,
    GenerateResult,
    GlobusComputeConfigError,
    IntegrityError,
    InvalidParameterError,
    InvocationCancelled,
    InvocationError,
    InvocationRecord,
    InvocationTimeout,
    Model,
    ModelNotReadyError,
    ModeNotAllowedError,
    NotFoundError,
    ObjectExists,
    ObjectNotFound,
    ObjectRef,
    PlacementError,
    PoolClosedError,
    ProvenanceRecord,
    QuotaExceededError,
    Ref,
    RemoteError,
    SamplingParams,
    SerializationError,
    ServeConfigError,
    ServiceError,
    StoreAuthError,
    StoreError,
    SubmitError,
    SubstrateConfigError,
    TextStream,
    UnknownBindingError,
    UnknownFunctionError,
    UnknownModelError,
    UnsupportedFeatureError,
    UnsupportedOperationError,
    WorkerLost,
    WorkerStartError,
)

__version__ = "0.1.0"

__all__ = [
    "AuthConfigError",
    "AuthError",
    "BackPressureError",
    "BindingError",
    "BudgetExceededError",
    "ChatResult",
    "Client",
    "ConfigError",
    "EndpointRenderError",
    "EngineError",
    "EngineLost",
    "EngineRejectedError",
    "FaasClient",
    "FaasError",
    "ForbiddenError",
    "Function",
    "FunctionDefinitionError",
    "FunctionSpec",
    "Future",
    "GenerateResult",
    "GlobusComputeCloudClient",
    "GlobusComputeConfigError",
    "IntegrityError",
    "InvalidParameterError",
    "InvocationCancelled",
    "InvocationError",
    "InvocationRecord",
    "InvocationTimeout",
    "ModeNotAllowedError",
    "Model",
    "ModelNotReadyError",
    "ModelSpec",
    "NotFoundError",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectRef",
    "Outputs",
    "PlacementError",
    "PoolClosedError",
    "ProvenanceRecord",
    "QuotaExceededError",
    "Ref",
    "RemoteClient",
    "RemoteError",
    "SamplingParams",
    "SerializationError",
    "ServeConfigError",
    "ServiceError",
    "StoreAuthError",
    "StoreError",
    "SubmitError",
    "SubstrateConfigError",
    "TextStream",
    "TriggerBinding",
    "UnknownBindingError",
    "UnknownFunctionError",
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
    "read_provenance",
    "replay",
    "shutdown",
]
