"""Errors in OpenAI's format, and the one place where they become HTTP statuses.

Every refusal the gateway answers is an :class:`ApiError`; handlers raise it and the
error middleware (``app.py``) writes ``{"error": {"message", "type", "param", "code"}}``
with its status, which is what the official OpenAI clients parse into their exceptions
(400 ``BadRequestError``, 401 ``AuthenticationError``, 404 ``NotFoundError``, 429
``RateLimitError``, 5xx ``InternalServerError``).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal with an HTTP status, in OpenAI's error format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, metric: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.metric = metric or _METRIC_STATUS.get(status, "internal")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# The `status` label of llmswarm_gateway_requests_total for each HTTP status.
_METRIC_STATUS = {
    400: "bad_request", 401: "unauthorized", 403: "unauthorized", 404: "not_found", 405: "bad_request", 413: "too_large",
    415: "bad_request",
    429: "overloaded", 500: "internal", 502: "unavailable", 503: "unavailable",
}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")


def overloaded(message: str) -> ApiError:
    return ApiError(429, message, type_="server_error", code="overloaded")


class RateLimited(ApiError):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(429, message, type_="requests", code="rate_limit_exceeded", metric="rate_limited")
        self.retry_after = retry_after


def rate_limited(message: str, retry_after: float) -> ApiError:
    return RateLimited(message, retry_after)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type_="server_error", code="swarm_unavailable")


def internal(message: str) -> ApiError:
    return ApiError(500, message, type_="server_error", code="internal_error")


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, f"Request bodies must be JSON (Content-Type: application/json), not {content_type or 'none'!r}.",
                    code="unsupported_media_type")


def forbidden_host(host: str) -> ApiError:
    return ApiError(403, f"This gateway does not answer to the host {host!r} (see --allowed-host).", code="forbidden_host")


def from_http_status(status: int, reason: str) -> ApiError:
    """An aiohttp HTTPException (unknown route, wrong method, body too large) in OpenAI's format."""
    if status == 404:
        return ApiError(404, f"Unknown request URL: {reason}", code="unknown_url")
    if status == 405:
        return ApiError(405, reason, code="method_not_supported")
    if status == 413:
        return ApiError(413, reason, code="request_too_large")
    return ApiError(status, reason, type_="invalid_request_error" if status < 500 else "server_error")
