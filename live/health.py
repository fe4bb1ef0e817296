"""`GET /health`, polled by go-livepeer's worker every 5 s (protocol/trickle.md §3.7):
IDLE with no session, LOADING while one loads, ERROR if one failed, else OK."""

from __future__ import annotations

from aiohttp import web

from .keys import SESSIONS


async def get_health(request: web.Request) -> web.Response:
    return web.json_response({"status": request.app[SESSIONS].health()})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/health", get_health)
