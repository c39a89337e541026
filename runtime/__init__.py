"""What one invocation needs: wire models, serialisation, stores, the Model handle.

``runtime`` imports none of the other packages; they all build on it.
"""

from typing import TYPE_CHECKING

from runtime._errors import (
    AuthConfigError,
    AuthError,
    BackPressureError,
    BindingError,
    BudgetExceededError,
    ConfigError,
    EndpointRenderError,
    EngineError,
    EngineLost,
    EngineRejectedError,
    FaasError,
    FunctionDefinitionError,
    GlobusComputeConfigError,
    IntegrityError,
    InvalidParameterError,
    InvocationCancelled,
    InvocationError,
    InvocationTimeout,
    ModelNotReadyError,
    ModeNotAllowedError,
    NotFoundError,
    ObjectExists,
    ObjectNotFound,
    PlacementError,
    PoolClosedError,
    QuotaExceededError,
    RemoteError,
    SerializationError,
    ServeConfigError,
    ServiceError,
    StoreAuthError,
    StoreError,
    SubmitError,
    SubstrateConfigError,
    UnknownBindingError,
    UnknownFunctionError,
    UnknownModelError,
    UnsupportedFeatureError,
    UnsupportedOperationError,
    WorkerLost,
    WorkerStartError,
)
from runtime._execute import error_info, execute
from runtime._model import (
    ChatResult,
    GenerateResult,
    Model,
    OpenAIPath,
    SamplingParams,
    TextStream,
    validate_sampling_params,
)
from runtime._net import tcp_transport
from runtime._objectref import ObjectRef, current_store
from runtime._outputs import (
    REPORT_STATES,
    Outputs,
    encode_output,
    file_etag,
    outputs_parameter,
    stored_digest,
)
from runtime._partial import PartialSink, emit_partial, partial_sink
from runtime._paths import cache_dir, default_store_url
from runtime._policy import MODES, check_modes
from runtime._provenance import (
    Determinism,
    EngineCall,
    FunctionProvenance,
    ModelProvenance,
    ProvenanceRecord,
    Timings,
    determinism_of,
)
from runtime._records import InvocationRecord, RecordStore, RecordWriter, ResultRecord, ValueRecord
from runtime._serde import digest_of, dumps, loads, loads_data, sha256_hex
from runtime._source import bundle_function, restore_function
from runtime._staging import (
    Ref,
    StagedRef,
    is_marker,
    load_staged,
    parse_marker,
    stage_args,
    stage_object,
    stage_value,
    staging_threshold,
    unstage_value,
)
from runtime._store import LocalStore, ObjectStore, new_id
from runtime._store_factory import scoped_store, store_from_config, store_from_url
from runtime._wire import ErrorInfo, ErrorKind, Invocation, OutputTarget, Priority, Result

__all__ = [
    "MODES",
    "REPORT_STATES",
    "AuthConfigError",
    "AuthError",
    "BackPressureError",
    "BindingError",
    "BudgetExceededError",
    "ChatResult",
    "ConfigError",
    "Determinism",
    "EndpointRenderError",
    "EngineCall",
    "EngineError",
    "EngineLost",
    "EngineRejectedError",
    "ErrorInfo",
    "ErrorKind",
    "FaasError",
    "FunctionDefinitionError",
    "FunctionProvenance",
    "GenerateResult",
    "GlobusComputeConfigError",
    "IntegrityError",
    "InvalidParameterError",
    "Invocation",
    "InvocationCancelled",
    "InvocationError",
    "InvocationRecord",
    "InvocationTimeout",
    "LocalStore",
    "ModeNotAllowedError",
    "Model",
    "ModelNotReadyError",
    "ModelProvenance",
    "NotFoundError",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectRef",
    "ObjectStore",
    "OpenAIPath",
    "OutputTarget",
    "Outputs",
    "PartialSink",
    "PlacementError",
    "PoolClosedError",
    "Priority",
    "ProvenanceRecord",
    "QuotaExceededError",
    "RecordStore",
    "RecordWriter",
    "Ref",
    "RemoteError",
    "Result",
    "ResultRecord",
    "S3Store",
    "SamplingParams",
    "SerializationError",
    "ServeConfigError",
    "ServiceError",
    "StagedRef",
    "StoreAuthError",
    "StoreError",
    "SubmitError",
    "SubstrateConfigError",
    "TextStream",
    "Timings",
    "UnknownBindingError",
    "UnknownFunctionError",
    "UnknownModelError",
    "UnsupportedFeatureError",
    "UnsupportedOperationError",
    "ValueRecord",
    "WorkerLost",
    "WorkerStartError",
    "bundle_function",
    "cache_dir",
    "check_modes",
    "current_store",
    "default_store_url",
    "determinism_of",
    "digest_of",
    "dumps",
    "emit_partial",
    "encode_output",
    "error_info",
    "execute",
    "file_etag",
    "is_marker",
    "load_staged",
    "loads",
    "loads_data",
    "new_id",
    "outputs_parameter",
    "parse_marker",
    "partial_sink",
    "restore_function",
    "scoped_store",
    "sha256_hex",
    "stage_args",
    "stage_object",
    "stage_value",
    "staging_threshold",
    "store_from_config",
    "store_from_url",
    "stored_digest",
    "tcp_transport",
    "unstage_value",
    "validate_sampling_params",
]


if TYPE_CHECKING:
    from runtime._s3 import S3Store


def __getattr__(name: str) -> object:
    if name == "S3Store":  # imported on first use: it pulls in boto3
        from runtime._s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
