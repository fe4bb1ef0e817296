"""The `blockbuster` marker catches a handler that blocks the event loop (issue 18), and the
public routes that used to (`/pipelines`, `/version`, `/hardware/info`, a session's start)
pass under it."""

from __future__ import annotations

import pytest
from aiohttp import web

from live.app import create_app
from live.settings import Settings
from runtime.models import folder_size

pytestmark = pytest.mark.blockbuster


async def test_the_watch_catches_a_handler_that_blocks_the_loop(
    request: pytest.FixtureRequest, aiohttp_client, tiny_models_dir
) -> None:
    async def blocking(request: web.Request) -> web.Response:
        # What /pipelines did: size a model folder (a walk of every file) on the loop.
        return web.json_response({"bytes": folder_size(tiny_models_dir / "stabilityai")})

    app = create_app(Settings(models_dir=tiny_models_dir, device="cpu"))
    app.router.add_get("/deliberately-blocking", blocking)
    client = await aiohttp_client(app)
    response = await client.get("/deliberately-blocking")
    assert response.status == 500  # the watch raised inside the handler
    watch = request.node.loop_watch
    assert watch.found and "Blocking call" in watch.found[0], watch.found
    watch.found.clear()  # caught, as it must be: this test passes


async def test_public_routes_do_not_block_the_loop(aiohttp_client, tmp_path) -> None:
    client = await aiohttp_client(create_app(Settings(models_dir=tmp_path, device="cpu")))
    for path in ("/pipelines", "/version", "/hardware/info", "/hardware/stats", "/health"):
        for _ in range(2):
            response = await client.get(path)
            assert response.status == 200, (path, await response.text())
    response = await client.post("/live-video-to-video", json={"model_id": "streamdiffusion"})
    assert response.status == 503  # no model: said without blocking
    response = await client.post("/live-video-to-video", json={"model_id": "noop"})
    assert response.status == 200, await response.text()
    session_id = (await response.json())["session_id"]
    assert (await client.delete(f"/live-video-to-video/{session_id}")).status == 200
