"""The admin endpoints: list the adapters, serve a folder of the adapter directory, stop one.

They need the server started with an API key (``auth.Auth`` answers 403 otherwise).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rankwise.errors import RankwiseError
from rankwise.serve.engine import Engine
from rankwise.serve.folder import AdapterFolder
from rankwise.serve.http_errors import ApiError, unknown_model
from rankwise.serve.schemas import AddAdapter, read_body


class Admin:
    """``/admin/adapters`` over one engine and its adapter folder."""

    def __init__(self, engine: Engine, folder: AdapterFolder, base_name: str):
        self.engine, self.folder, self.base_name = engine, folder, base_name

    def routes(self) -> list[Route]:
        return [
            Route("/admin/adapters", self.list_adapters),
            Route("/admin/adapters", self.add_adapter, methods=["POST"]),
            Route("/admin/adapters/{name}", self.delete_adapter, methods=["DELETE"]),
        ]

    async def list_adapters(self, request: Request) -> Response:
        pool = self.engine.pool
        data = [
            {
                "id": name,
                "rank": adapter.rank,
                "modules": len(adapter.factors),
                "hot": adapter in pool.lru,
                "created": adapter.created,
            }
            for name, adapter in sorted(self.engine.adapters.items())
        ]
        loads = list(pool.load_times)
        mean_ms = 1000 * sum(loads) / len(loads) if loads else None
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "hot_slots": pool.slots - 1,
                "loads": len(loads),
                "mean_load_ms": mean_ms,
            }
        )

    async def add_adapter(self, request: Request) -> Response:
        body = await read_body(request, AddAdapter)
        try:
            adapter = await asyncio.to_thread(self.folder.add, body.name)
        except FileNotFoundError as err:
            raise ApiError(404, str(err), code="adapter_not_found", param="name") from err
        except RankwiseError as err:
            raise ApiError(400, str(err), param="name") from err
        card = {
            "id": adapter.name,
            "object": "model",
            "created": adapter.created,
            "owned_by": "rankwise",
            "parent": self.base_name,
            "rank": adapter.rank,
        }
        return JSONResponse(card, status_code=201)

    async def delete_adapter(self, request: Request) -> Response:
        name = request.path_params["name"]
        try:
            removed = await asyncio.to_thread(self.folder.remove, name)
        except RankwiseError as err:
            raise ApiError(400, str(err), param="name") from err
        if not removed:
            raise unknown_model(name)
        return JSONResponse({"id": name, "object": "model", "deleted": True})
