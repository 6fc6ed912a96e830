"""Errors as OpenAI sends them: JSON ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger("rankwise.serve")


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """The ``error`` object of an OpenAI error response (also sent as a stream's last event)."""
    return {"message": message, "type": kind, "param": param, "code": code}


class ApiError(Exception):
    """An error answered as OpenAI-shaped JSON with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, code, param)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, status_code=self.status)


def unknown_model(name: str) -> ApiError:
    return ApiError(
        404, f"the model '{name}' does not exist", code="model_not_found", param="model"
    )


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(
        exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
    ).response()


async def on_crash(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal server error; see the server log", "server_error").response()


HANDLERS = {ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash}
