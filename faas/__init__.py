"""tpm-faas: serverless functions for calls to trillion-parameter models.

```python
import faas

@faas.function(model="tiny-llama", timeout=60)
def complete(model: faas.Model, prompt: str) -> str:
    return model.generate(prompt, {"max_new_tokens": 16, "temperature": 0}).text

complete.remote("The quick brown")
```
"""

from faas._client import Client, configure, get_client, shutdown
from faas._function import Function, function
from faas._future import Future
from faas._progress import gather
from registry import FunctionSpec, ModelSpec
from runtime import (
    EngineError,
    EngineLost,
    FaasError,
    FunctionDefinitionError,
    GenerateResult,
    IntegrityError,
    InvocationCancelled,
    InvocationError,
    InvocationTimeout,
    Model,
    ObjectExists,
    ObjectNotFound,
    PoolClosedError,
    RemoteError,
    SamplingParams,
    SerializationError,
    StoreAuthError,
    StoreError,
    SubmitError,
    UnknownModelError,
    WorkerLost,
)
from warmpool import BackPressureError

__version__ = "0.1.0"

__all__ = [
    "BackPressureError",
    "Client",
    "EngineError",
    "EngineLost",
    "FaasError",
    "Function",
    "FunctionDefinitionError",
    "FunctionSpec",
    "Future",
    "GenerateResult",
    "IntegrityError",
    "InvocationCancelled",
    "InvocationError",
    "InvocationTimeout",
    "Model",
    "ModelSpec",
    "ObjectExists",
    "ObjectNotFound",
    "PoolClosedError",
    "RemoteError",
    "SamplingParams",
    "SerializationError",
    "StoreAuthError",
    "StoreError",
    "SubmitError",
    "UnknownModelError",
    "WorkerLost",
    "__version__",
    "configure",
    "function",
    "gather",
    "get_client",
    "shutdown",
]
