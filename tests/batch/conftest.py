"""The real service with tiny models of every batch route, reached over real HTTP."""

from __future__ import annotations

import io

import pytest

from live.app import create_app
from live.settings import Settings
from tests.waiting import wait_until

ALL_ROUTES = ("text-to-image", "image-to-image", "image-to-video", "upscale")


@pytest.fixture
async def batch_service(aiohttp_client, tiny_models_dir):
    """Start the service on the tiny models; the routes in `warm` are loaded (through the
    service's own warm list) before the client is handed out."""

    async def start(warm: tuple[str, ...] = ALL_ROUTES, **overrides):
        settings = Settings(models_dir=tiny_models_dir, warm=",".join(warm), **overrides)
        client = await aiohttp_client(create_app(settings))

        async def loaded() -> bool:
            response = await client.get("/health")
            return (await response.json())["status"] != "LOADING"

        await wait_until(loaded, "the warm models to load", within=120)
        return client

    return start


def png(width: int, height: int, color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), color)
    # A gradient, so that the model sees structure rather than one flat colour.
    for x in range(0, width, 4):
        for y in range(0, height, 4):
            image.putpixel((x, y), (x * 255 // width, y * 255 // height, 128))
    image.save(buffer, format="PNG")
    return buffer.getvalue()
