"""AUTOMATIC1111's error answers: a body its clients parse, in one of its two shapes.

A value its request models refuse is FastAPI's 422, `{"detail": [{"loc", "msg", "type"}]}`;
anything else is its own `{"error", "detail", "body", "errors"}` (the type of the exception, its
detail, and the two as one line)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web


class DialectError(Exception):
    """An answer in AUTOMATIC1111's shapes, raised by its handlers (routes.py answers it)."""

    def __init__(
        self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(json.dumps(body))
        self.status = status
        self.body = body
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def invalid(loc: list[str | int], message: str, kind: str = "value_error") -> DialectError:
    """FastAPI's 422 for one value, `loc` as it names it (["body", "steps"])."""
    return DialectError(422, {"detail": [{"loc": loc, "msg": message, "type": kind}]})


def failure(
    status: int,
    detail: str,
    error: str = "HTTPException",
    headers: Mapping[str, str] | None = None,
) -> DialectError:
    """AUTOMATIC1111's own shape, as its exception handler writes it."""
    body = {"error": error, "detail": detail, "body": "", "errors": f"{status}: {detail}"}
    return DialectError(status, body, headers)
