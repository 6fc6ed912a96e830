"""The API key: it guards every endpoint, and admin endpoints need the server to have one."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from rankwise.serve.http_errors import ApiError


class Auth:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every request when a key is set."""

    def __init__(self, app: ASGIApp, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.check(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> ApiError | None:
        if self.key is None:
            if scope["path"].startswith("/admin"):
                return ApiError(
                    403,
                    "admin endpoints need the server started with --api-key",
                    "permission_error",
                    "admin_disabled",
                )
            return None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.key.encode()
        ):
            return ApiError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY)",
                "authentication_error",
                "invalid_api_key",
            )
        return None
