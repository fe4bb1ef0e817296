"""`GET /health`, polled by go-livepeer's worker every 5 s (protocol/trickle.md §3.7)."""

from __future__ import annotations

from aiohttp import web


async def get_health(request: web.Request) -> web.Response:
    # Live sessions arrive with issue #4; until then the service is always idle.
    return web.json_response({"status": "IDLE"})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/health", get_health)
