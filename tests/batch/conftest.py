"""The real service with tiny models of every batch route, reached over real HTTP."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from live.app import create_app
from live.keys import SESSIONS
from live.settings import Settings
from live.stats import SessionStats
from protocol.clips import make_clip
from runtime.worker import InferenceWorker
from tests.live.streams import publish_clip, start_session
from tests.waiting import wait_until


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread: None) -> None:
    """Every batch test runs tiny models (see tests/conftest.py)."""


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


@dataclass
class LivePair:
    """A `noop` session and a tiny `streamdiffusion` session, both fed a clip at 30 fps."""

    noop: SessionStats
    diffusion: SessionStats
    publishing: list[asyncio.Task[None]]

    def counts(self) -> tuple[int, int, int]:
        """Noop frames in and out, diffusion frames out."""
        return self.noop.frames_in, self.noop.frames_out, self.diffusion.frames_out

    def still_publishing(self) -> bool:
        return not all(task.done() for task in self.publishing)


@asynccontextmanager
async def live_pair(client, frames: int) -> AsyncIterator[LivePair]:  # type: ignore[no-untyped-def]
    """Both sessions running and putting out frames; the clip (`frames` long) is stopped on
    leaving."""
    sessions = client.app[SESSIONS]
    noop = await start_session(client, model_id="noop")
    diffusion = await start_session(
        client,
        model_id="streamdiffusion",
        params={"width": 64, "height": 64, "t_index_list": [20], "prompt": "a cat"},
    )
    diffusion_session = sessions.get(diffusion["session_id"])
    await asyncio.wait_for(diffusion_session.wait_ready(), 60)
    clip = make_clip(frames, width=64, height=64)
    pair = LivePair(
        sessions.get(noop["session_id"]).stats,
        diffusion_session.stats,
        [
            asyncio.create_task(publish_clip(info["publish_url"], clip, close=False))
            for info in (noop, diffusion)
        ],
    )
    try:
        await wait_until(
            lambda: pair.noop.frames_out > 10 and pair.diffusion.frames_out > 3,
            "both live sessions to put out frames",
            within=30,
        )
        yield pair
    finally:
        for task in pair.publishing:
            task.cancel()
        await asyncio.gather(*pair.publishing, return_exceptions=True)


def assert_live_kept_up(
    worker: InferenceWorker, before: tuple[int, int, int], after: tuple[int, int, int]
) -> None:
    """What a batch job beside the live pair must leave true: no live item waited through more
    than the step (or token) under way, the diffusion session's frames ran between the steps,
    and the noop session (no device work) kept its output flowing."""
    assert worker.max_live_wait_steps <= 1
    assert after[2] > before[2]
    noop_in, noop_out = after[0] - before[0], after[1] - before[1]
    assert noop_in > 0
    assert noop_out >= 0.8 * noop_in, (noop_in, noop_out)
