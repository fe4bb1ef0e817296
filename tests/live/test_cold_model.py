"""A first streamdiffusion session on a fresh server is not refused while its model loads: it
starts, shows loading frames until the weights are there, then restyles."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from live.app import create_app
from live.keys import RUNTIME
from live.pipelines.diffusion import DEFAULT_MODEL, load_components
from live.settings import Settings
from protocol.clips import make_clip
from runtime.models import resolve_model
from tests.live.streams import publish_clip, watch
from tests.waiting import wait_until


def grey(frame: np.ndarray) -> bool:
    return float(np.abs(frame.astype(int) - frame.mean(axis=2, keepdims=True)).mean()) < 2


async def test_a_session_on_a_loading_model_shows_loading_frames_then_output(
    aiohttp_client, tiny_models_dir, one_torch_thread
) -> None:
    settings = Settings(models_dir=tiny_models_dir, device="cpu", status_interval_s=0.5)
    client = await aiohttp_client(create_app(settings))
    runtime = client.app[RUNTIME]
    # The model's load is under way and held until the test releases it: as slow as needed.
    release = threading.Event()
    path = resolve_model(DEFAULT_MODEL, tiny_models_dir)

    def slow_load() -> Any:
        assert release.wait(120), "the test never released the load"
        return load_components(path, None, runtime.spec)

    key = runtime.key("streamdiffusion", DEFAULT_MODEL)
    with pytest.raises(Exception, match="is loading"):
        runtime.models.request(key, slow_load)

    params = {"width": 64, "height": 64, "t_index_list": [20], "prompt": "a cat", "vae_id": None}
    try:
        response = await client.post(
            "/live-video-to-video", json={"model_id": "streamdiffusion", "params": params}
        )
        assert response.status == 200, await response.text()
        info = await response.json()
        viewer, _, tasks = watch(info)
        publishing = asyncio.create_task(
            publish_clip(info["publish_url"], make_clip(600, width=64, height=64))
        )
        await viewer.wait_frames(10)
        assert all(grey(f.frame) for f in viewer.frames), "output before the model loaded"
    finally:
        release.set()
    try:
        await wait_until(
            lambda: any(not grey(f.frame) for f in viewer.frames),
            "restyled frames once the model loaded",
            within=60,
        )
    finally:
        publishing.cancel()
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await asyncio.gather(publishing, *tasks, return_exceptions=True)
