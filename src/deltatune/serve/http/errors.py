"""OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`) and the one exception the routes raise."""
from __future__ import annotations

from typing import Any

from ...core.parsing import printable

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered with OpenAI's error body and `status`; `message` is shown to the client as is (never a
    traceback, never a server path)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return {"error": {"message": printable(line)[:2000], "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def not_found(model: str) -> APIError:
    """The one answer for a model that does not exist and for one the caller may not use: no name leaks."""
    shown = printable(model if isinstance(model, str) else repr(model))[:200]
    return APIError(404, f"The model `{shown}` does not exist or you do not have access to it.", param="model",
                    code="model_not_found")
