"""How the S3 backend classifies botocore failures: transient, auth, not found, refused."""

from __future__ import annotations

import botocore.exceptions as bce

from runtime._errors import ObjectNotFound, StoreAuthError, StoreError

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


def translate(
    exc: Exception, action: str, where: str, has_key: bool, tries: int, endpoint: str, bucket: str
) -> StoreError:
    """The typed store error for a botocore failure that was not (or no longer) retried.

    Args:
        exc: What the client call raised.
        action: What was being done (``read``, ``write``, ...), for the message.
        where: The object or prefix, as the message names it.
        has_key: Whether the call was about one object (a 404 is then ``ObjectNotFound``).
        tries: Attempts made.
        endpoint: The S3 endpoint URL.
        bucket: The bucket.
    """
    after = f" (gave up after {tries} attempts)" if tries > 1 else ""
    if isinstance(exc, bce.ClientError):
        code, status = _code(exc), _status(exc)
        detail = exc.response.get("Error", {}).get("Message") or "no message"
        if code == "NoSuchBucket":
            return StoreError(f"Cannot {action} {where}: the bucket {bucket!r} does not exist.")
        if code in _NOT_FOUND_CODES and has_key:
            return ObjectNotFound(f"No object under {where}.")
        if status == 403 or code in _AUTH_CODES:
            return StoreAuthError(
                f"Access denied to {action} {where}: {code or status} ({detail}). Check the "
                "credentials in boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, ...) and the bucket policy."
            )
        if code == "NotImplemented":
            return StoreError(
                f"The S3 endpoint {endpoint} does not implement what it takes to {action} "
                f"{where} ({detail}); commit-once writes need If-None-Match support."
            )
        return StoreError(f"Failed to {action} {where}: S3 answered {status} {code} ({detail}){after}.")
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return StoreAuthError(
            f"No usable credentials to {action} {where}: {exc}. Provide them through boto3's "
            "standard chain (environment, ~/.aws, or an instance role)."
        )
    return StoreError(f"Failed to {action} {where}: {type(exc).__name__}: {exc}{after}.")
