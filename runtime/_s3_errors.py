"""How the S3 backend classifies botocore failures: transient, auth, not found, refused."""

from __future__ import annotations

import botocore.exceptions as bce

_AUTH_CODES = frozenset(
    {"AccessDenied", "AllAccessDisabled", "AuthorizationHeaderMalformed", "ExpiredToken"}
    | {"InvalidAccessKeyId", "InvalidClientTokenId", "InvalidToken", "SignatureDoesNotMatch"}
    | {"TokenRefreshRequired"}
)
_TRANSIENT_CODES = frozenset(
    {"InternalError", "RequestTimeout", "ServiceUnavailable", "SlowDown", "Throttling"}
    | {"ThrottlingException", "TooManyRequests", "RequestLimitExceeded"}
)
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_CREDENTIAL_ERRORS = (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)
_TRANSIENT_ERRORS = (
    bce.HTTPClientError,  # read timeouts, closed connections, broken response streams
    bce.ConnectionError,  # connection refused, connect timeouts
    bce.IncompleteReadError,
    bce.ChecksumError,  # a body corrupted in transit
    bce.FlexibleChecksumError,
)


def _code(exc: bce.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: bce.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_transient(exc: BaseException) -> bool:
    """Tell whether a boto3/botocore failure is worth retrying.

    Args:
        exc: The exception a client call raised.

    Returns:
        True for 5xx answers (but not 501 Not Implemented), 429 and throttling
        codes, connection failures, timeouts and bodies broken in transit.
    """
    if isinstance(exc, bce.ClientError):
        code, status = _code(exc), _status(exc)
        if code in _AUTH_CODES or code in _PRECONDITION_CODES or code == "NotImplemented":
            return False
        return code in _TRANSIENT_CODES or status == 429 or (status >= 500 and status != 501)
    return isinstance(exc, _TRANSIENT_ERRORS) and not isinstance(exc, bce.SSLError)
