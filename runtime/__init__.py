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
    ModeNotAllowedError,
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
from runtime._model import (
    ChatResult,
    GenerateResult,
    Model,
    SamplingParams,
    TextStream,
    UnsupportedFeatureError,
    validate_sampling_params,
)
from runtime._objectref import ObjectRef, current_store
from runtime._paths import cache_dir, default_store_url
from runtime._provenance import ProvenanceRecord
from runtime._records import InvocationRecord, RecordStore, RecordWriter, ValueRecord
from runtime._serde import dumps, loads, sha256_hex
from runtime._staging import (
    Ref,
    StagedRef,
    load_staged,
    stage_args,
    stage_object,
    stage_value,
    staging_threshold,
    unstage_value,
)
from runtime._store import LocalStore, ObjectStore, new_id, store_from_config, store_from_url
from runtime._wire import ErrorInfo, Invocation, Result

__all__ = [
    "ChatResult",
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
    "InvocationRecord",
    "InvocationTimeout",
    "LocalStore",
    "ModeNotAllowedError",
    "Model",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectRef",
    "ObjectStore",
    "PoolClosedError",
    "ProvenanceRecord",
    "RecordStore",
    "RecordWriter",
    "Ref",
    "RemoteError",
    "Result",
    "SamplingParams",
    "SerializationError",
    "StagedRef",
    "StoreAuthError",
    "StoreError",
    "SubmitError",
    "TextStream",
    "UnknownModelError",
    "UnsupportedFeatureError",
    "ValueRecord",
    "WorkerLost",
    "cache_dir",
    "current_store",
    "default_store_url",
    "dumps",
    "error_info",
    "execute",
    "load_staged",
    "loads",
    "new_id",
    "sha256_hex",
    "stage_args",
    "stage_object",
    "stage_value",
    "staging_threshold",
    "store_from_config",
    "store_from_url",
    "unstage_value",
    "validate_sampling_params",
]
