"""Admission control: a session the service cannot take is refused at start with 503, Retry-After
and a detail naming the limit (sessions, model memory, device throughput); status events hint
the rate to publish at; /health and /hardware/stats show what is left."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from live.admission import MIN_FRAMES, memory_refusal
from live.app import create_app
from live.keys import SESSIONS
from live.settings import Settings
from protocol.clips import make_clip
from tests.live.conftest import PIPELINES, SLOW_FRAME_S, SlowPipeline
from tests.live.streams import publish_clip, start_session, wait_gone, watch
from tests.waiting import wait_until

GIB = 2**30


class DeviceSlowPipeline(SlowPipeline):
    """The slow pipeline on the device's shared inference worker: its declared cost (a sixth
    of a second a frame) makes it sustain at most 6 fps, well under a 30 fps camera."""

    name = "slow-device"
    uses_device = True


@pytest.fixture
async def device_service(aiohttp_client):
    pipelines = {**PIPELINES, DeviceSlowPipeline.name: DeviceSlowPipeline}
    return await aiohttp_client(create_app(Settings(status_interval_s=0.5), pipelines))


async def refused(client, body: dict) -> str:
    """POST a session that must be refused for lack of capacity; its detail."""
    response = await client.post("/live-video-to-video", json=body)
    assert response.status == 503, await response.text()
    assert int(response.headers["Retry-After"]) > 0
    return (await response.json())["detail"]["msg"]


async def test_session_limit_names_the_limit_and_the_setting(service) -> None:
    client = await service(max_sessions=1)
    first = await start_session(client, model_id="noop")
    detail = await refused(client, {"model_id": "noop"})
    assert "maximum of 1 live sessions" in detail
    assert "--max-sessions" in detail
    health = await (await client.get("/health")).json()
    assert health["capacity"]["sessions_left"] == 0
    await client.delete(f"/live-video-to-video/{first['session_id']}")
    await wait_gone(client, first["session_id"])
    health = await (await client.get("/health")).json()
    assert health["capacity"]["sessions_left"] == 1


async def test_model_over_the_memory_budget_is_refused_at_start(service, tiny_models_dir) -> None:
    client = await service(model_memory_gb=0.000001, device="cpu", models_dir=tiny_models_dir)
    detail = await refused(client, {"model_id": "streamdiffusion"})
    assert "streamdiffusion" in detail
    assert "--model-memory-gb" in detail
    assert "budget is 1.0 KiB" in detail
    assert not client.app[SESSIONS].sessions  # nothing started, nothing loaded
    assert not client.app[SESSIONS].runtime.models.models()
    capacity = (await (await client.get("/health")).json())["capacity"]
    assert capacity["model_memory_budget_bytes"] == int(0.000001 * GIB)


def test_memory_refusal_weighs_budget_models_in_use_and_free_gpu_memory() -> None:
    assert memory_refusal(GIB, budget=None, in_use=0) is None  # CPU without a budget
    assert memory_refusal(GIB, budget=4 * GIB, in_use=2 * GIB) is None
    over = memory_refusal(3 * GIB, budget=4 * GIB, in_use=2 * GIB)
    assert over is not None and "--model-memory-gb" in over and "2.0 GiB" in over
    # CUDA: free memory counts, and so do idle models that would be evicted for room.
    short = memory_refusal(2 * GIB, budget=None, in_use=0, free_gpu=GIB)
    assert short is not None and "1.0 GiB is free" in short
    assert memory_refusal(2 * GIB, budget=None, in_use=0, free_gpu=GIB, idle=2 * GIB) is None


async def test_device_throughput_refuses_a_stream_it_cannot_sustain(device_service) -> None:
    client = device_service
    manager = client.app[SESSIONS]
    # No measurement yet: the first session is admitted.
    first = await start_session(client, model_id="slow-device")
    session = manager.sessions[first["session_id"]]
    viewer, events, tasks = watch(first)
    clip = make_clip(30 * 30)  # long enough to outlast the checks below; stopped after them
    publishing = asyncio.create_task(publish_clip(first["publish_url"], clip))
    try:
        await wait_until(
            lambda: (
                session.stats.inference_p50_s(MIN_FRAMES) is not None and session.stats.fps()[0] > 0
            ),
            "inference timings and input frames of the first session",
            within=30,
        )
        # Hints: at most the rate inference sustains (its declared cost bounds it), at the
        # output size (the input's: the pipeline keeps it).
        status = await events.wait_event(lambda e: e["type"] == "status" and e.get("hint"))
        hint = status["hint"]
        assert 0 < hint["max_fps"] <= round(1 / SLOW_FRAME_S, 2)
        assert (hint["width"], hint["height"]) == (128, 128)

        detail = await refused(client, {"model_id": "slow-device"})
        assert "device is busy" in detail
        assert "slow-device" in detail
        assert "fps" in detail and "ms per frame" in detail
        assert len(manager.sessions) == 1

        # A pipeline off the device's worker is not limited by it.
        other = await start_session(client, model_id="noop")
        await client.delete(f"/live-video-to-video/{other['session_id']}")
        await wait_gone(client, other["session_id"])

        health = await (await client.get("/health")).json()
        assert health["status"] in ("OK", "LOADING", "ERROR", "IDLE")
        assert health["capacity"]["streams_left"] == {"slow-device": 0}
        stats = await (await client.get("/hardware/stats")).json()
        assert {"pipeline", "model_id", "gpu_stats"} <= set(stats)
        assert stats["capacity"]["streams_left"] == {"slow-device": 0}
        assert stats["capacity"]["sessions_left"] == Settings().max_sessions - 1
    finally:
        publishing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publishing
        await client.delete(f"/live-video-to-video/{first['session_id']}")
        await wait_gone(client, first["session_id"])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # The measurement outlives the session; an idle device still takes one stream.
    capacity = (await (await client.get("/health")).json())["capacity"]
    assert capacity["streams_left"] == {"slow-device": 1}
    again = await start_session(client, model_id="slow-device")
    await client.delete(f"/live-video-to-video/{again['session_id']}")
    await wait_gone(client, again["session_id"])


async def test_a_shared_model_needs_no_more_memory_another_does(
    aiohttp_client, tiny_models_dir, one_torch_thread
) -> None:
    """Budget room for one tiny model: a second session of it shares the loaded weights and is
    admitted; a session of another model is refused, naming the models in use."""
    from live.pipelines.base import PipelineContext
    from live.pipelines.diffusion import StreamDiffusionParams, StreamDiffusionPipeline

    params = {"width": 64, "height": 64, "t_index_list": [10, 30]}
    _, needed = await asyncio.to_thread(  # sizes a folder: off the loop the test watches
        StreamDiffusionPipeline.model_memory,
        StreamDiffusionParams(**params),
        PipelineContext.private(models_dir=tiny_models_dir),
    )
    settings = Settings(
        models_dir=tiny_models_dir, device="cpu", model_memory_gb=needed * 1.5 / GIB
    )
    client = await aiohttp_client(create_app(settings))
    manager = client.app[SESSIONS]
    body = {"model_id": "streamdiffusion", "params": params}
    started = [await start_session(client, **body)]
    await asyncio.wait_for(manager.sessions[started[0]["session_id"]].wait_ready(), 60)
    started.append(await start_session(client, **body))  # shares the loaded weights

    other = {"model_id": "streamdiffusion", "params": {**params, "model_id": "test/other-sd"}}
    detail = await refused(client, other)
    assert "--model-memory-gb" in detail and "held by models in use" in detail
    capacity = (await (await client.get("/hardware/stats")).json())["capacity"]
    assert capacity["model_memory_left_bytes"] < needed

    for info in started:
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await wait_gone(client, info["session_id"])
