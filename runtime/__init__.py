"""What one invocation needs: wire models, serialisation, stores, the Model handle.

``runtime`` imports none of the other packages; they all build on it.
"""

from runtime._errors import (
    EngineError,
    EngineLost,
    FaasError,
    FunctionDefinitionError,
    IntegrityError,
    InvocationCancelled,
    InvocationError,
    InvocationTimeout,
    ObjectExists,
    ObjectNotFound,
    PoolClosedError,
    RemoteError,
    SerializationError,
    StoreAuthError,
    StoreError,
    SubmitError,
    UnknownModelError,
    WorkerLost,
)
from runtime._execute import error_info, execute
from runtime._model import GenerateResult, Model, SamplingParams, validate_sampling_params
from runtime._paths import cache_dir, default_store_url
from runtime._serde import dumps, loads, sha256_hex
from runtime._store import LocalStore, ObjectStore, new_id, store_from_config, store_from_url
from runtime._wire import ErrorInfo, Invocation, Result

__all__ = [
    "EngineError",
    "EngineLost",
    "ErrorInfo",
    "FaasError",
    "FunctionDefinitionError",
    "GenerateResult",
    "IntegrityError",
    "Invocation",
    "InvocationCancelled",
    "InvocationError",
    "InvocationTimeout",
    "LocalStore",
    "Model",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectStore",
    "PoolClosedError",
    "RemoteError",
    "Result",
    "SamplingParams",
    "SerializationError",
    "StoreAuthError",
    "StoreError",
    "SubmitError",
    "UnknownModelError",
    "WorkerLost",
    "cache_dir",
    "default_store_url",
    "dumps",
    "error_info",
    "execute",
    "loads",
    "new_id",
    "sha256_hex",
    "store_from_config",
    "store_from_url",
    "validate_sampling_params",
]
