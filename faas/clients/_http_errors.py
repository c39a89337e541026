"""The typed error for each error answer of the faas service (what every HTTP client here raises)."""

from __future__ import annotations

import httpx

from runtime import (
    AuthError,
    BackPressureError,
    BindingError,
    BudgetExceededError,
    FaasError,
    ForbiddenError,
    FunctionDefinitionError,
    InvalidParameterError,
    NotFoundError,
    PayloadTooLargeError,
    PoolClosedError,
    QuotaExceededError,
    SerializationError,
    ServiceError,
    SubmitError,
    UnknownModelError,
)

_SUBMIT_ERRORS: dict[str, type[SubmitError]] = {
    cls.__name__: cls
    for cls in (
        SubmitError,
        UnknownModelError,
        SerializationError,
        FunctionDefinitionError,
        QuotaExceededError,
        BackPressureError,
        BindingError,
        InvalidParameterError,
        PayloadTooLargeError,
    )
}


def error_for_response(response: httpx.Response, label: str = "the faas service") -> FaasError:
    """The typed error for an error response of the service (its body must have been read).

    401 gives AuthError, 403 ForbiddenError (an AuthError), 404 NotFoundError (UnknownModelError when the
    service names it), 429 QuotaExceededError (or BackPressureError, or
    BudgetExceededError with ``retry_after`` from ``Retry-After``, when the
    service names it), 400/413/422 SubmitError or the subclass the service
    names, 503 PoolClosedError, anything else ServiceError. The message is
    the service's own; every error carries the status as ``status_code``.
    """
    status = response.status_code
    type_name, message = _error_body(response, label)
    error: FaasError
    if status == 403:
        error = ForbiddenError(message, status)
    elif status == 401:
        error = AuthError(message, status)
    elif status == 404 and type_name == UnknownModelError.__name__:  # a SubmitError and a LookupError
        error = UnknownModelError(message)
    elif status == 404:
        error = NotFoundError(message, status)
    elif status == 429 and type_name == BudgetExceededError.__name__:
        error = BudgetExceededError(message, retry_after=_retry_after(response))
    elif status == 429:
        error = (
            BackPressureError(message) if type_name == "BackPressureError" else QuotaExceededError(message)
        )
    elif status in (400, 413, 422):
        error = _SUBMIT_ERRORS.get(type_name, SubmitError)(message)
    elif status == 503:
        error = PoolClosedError(message)
    else:
        error = ServiceError(message, status)
    if not isinstance(error, ServiceError):
        setattr(error, "status_code", status)  # noqa: B010 (not a declared attribute of these types)
    return error


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:  # an HTTP date: not what this service sends
        return 0.0


def _error_body(response: httpx.Response, label: str) -> tuple[str, str]:
    request = response.request
    where = f"{request.method} {request.url.path}"
    fallback = f"{label} answered HTTP {response.status_code} to {where}"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return "", f"{fallback}: {text[:500]}" if text else f"{fallback}."
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        message = str(error.get("message") or "").strip()
        return str(error.get("type") or ""), message or f"{fallback}."
    if isinstance(body, dict) and "detail" in body:  # FastAPI's own validation errors
        return "", f"{fallback}: {body['detail']}"
    return "", f"{fallback}: {str(body)[:500]}"
