"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status, so
the official clients raise their own exception classes (BadRequestError, AuthenticationError, NotFoundError,
RateLimitError, ...) with our message."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

# status -> OpenAI's error type
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}  # fmt: skip


class ApiError(Exception):
    """An error answered to the client as `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}  # fmt: skip
        return JSONResponse(body, status_code=self.status, headers=headers)


def schema_error(e: ValidationError) -> ApiError:
    """A 400 naming the first field that failed validation (dotted path) and why."""
    first = e.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return ApiError(400, f"{param or 'body'}: {first['msg']}", param=param, code="invalid_value")
