"""The one error shape every route answers with."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A client-facing error: HTTP status, a stable machine code, the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers  # sent with the error (e.g. Retry-After)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def invalid(field: str, message: str) -> ApiError:
    """400 for a field whose value cannot be accepted."""
    return ApiError(400, "invalid_field", message, field)
