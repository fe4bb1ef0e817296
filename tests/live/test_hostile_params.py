"""Issue 18, findings 1-3 on live sessions: params a holder of one session's control URL sends to
cost the service memory or inference time, or to take its session down, are refused in words,
and the session goes on."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from live.app import create_app
from live.keys import SESSIONS
from live.pipelines.bounds import BLEND_MAX_ENTRIES, PROMPT_MAX_CHARS
from live.settings import Settings
from protocol.bounded_json import JSON_MAX_DEPTH
from protocol.clips import make_clip, numbered_frame
from protocol.trickle import TricklePublisher
from tests.live.streams import run_stream, start_session, watch
from tests.waiting import wait_until

PAST_PYTHON = 1_100
"""Deeper than Python's recursion limit: what raised RecursionError before."""


def nested(depth: int) -> bytes:
    return b'{"strength":' + b"[" * depth + b"]" * depth + b"}"


def deep_errors(events) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e for e in events.of_type("error") if "nested too deeply" in e["message"]]


async def test_control_messages_nested_too_deeply_are_errors_and_the_session_goes_on(
    service,
) -> None:
    client = await service()
    clip = make_clip(90)

    async def control(info, viewer, events) -> None:
        async with TricklePublisher(info["control_url"], "application/json") as publisher:
            await viewer.wait_frames(20)
            await publisher.write(nested(PAST_PYTHON))
            await publisher.write(nested(JSON_MAX_DEPTH + 1))
            await publisher.write(b'{"strength": 0.0}')
            # Trickle reads one segment ahead: the keepalive lets the change above be read.
            await publisher.write(b'{"keep":"alive"}')
            await wait_until(lambda: len(deep_errors(events)) == 2, "both refusals")

    info, viewer, events = await run_stream(
        client, clip, body={"model_id": "cartoon"}, during=control
    )
    assert len(deep_errors(events)) == 2
    assert all("Recursion" not in e["message"] for e in events.of_type("error"))
    # Every frame came out, and the valid change after the refused ones applied.
    assert len(viewer.frames) == 90
    diffs = [np.abs(f.frame.astype(int) - numbered_frame(f.index)).mean() for f in viewer.frames]
    assert max(diffs[-20:]) < 6
    assert events.of_type("status")[-1]["end_reason"] != "internal error"


async def test_the_whip_start_refuses_params_nested_too_deeply(service) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection

    client = await service(ice_host_addresses="127.0.0.1")
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="sendonly")
    try:
        await pc.setLocalDescription(await pc.createOffer())
        for depth in (PAST_PYTHON, JSON_MAX_DEPTH + 1):
            response = await client.post(
                "/live-video-to-video/whip",
                params={"model_id": "cartoon", "params": "[" * depth + "]" * depth},
                data=pc.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            )
            assert response.status == 400, await response.text()
            assert "params is nested too deeply" in (await response.json())["detail"]["msg"]
        assert not client.app[SESSIONS].sessions
    finally:
        await pc.close()


@pytest.fixture
async def diffusion_service(aiohttp_client, tiny_models_dir, one_torch_thread):
    settings = Settings(models_dir=tiny_models_dir, device="cpu", status_interval_s=0.5)
    return await aiohttp_client(create_app(settings))


SIZE = {"width": 64, "height": 64, "t_index_list": [10, 30]}

LONG_LISTS = {
    # 64 KB of seed pairs: one noise tensor each before, 916 MiB of RSS at 512x512.
    "seed": [[i, 1.0] for i in range(5_000)],
    # One text-encoder pass each, on the worker every session shares.
    "prompt": [[f"prompt {i}", 1.0] for i in range(1_000)],
}


async def test_weighted_lists_and_prompts_past_their_bounds_are_refused(
    diffusion_service,
) -> None:
    client = diffusion_service
    body = {"model_id": "streamdiffusion", "params": {**SIZE, "prompt": "a cat"}}
    info = await start_session(client, **body)
    session = client.app[SESSIONS].get(info["session_id"])
    await asyncio.wait_for(session.wait_ready(), 60)
    _, events, tasks = watch(info)
    url = f"/live-video-to-video/{info['session_id']}/params"
    try:
        refused = {
            **{name: {**SIZE, name: value} for name, value in LONG_LISTS.items()},
            "negative_prompt": {**SIZE, "negative_prompt": "x" * (PROMPT_MAX_CHARS + 1)},
            "prompt-text": {**SIZE, "prompt": "x" * (PROMPT_MAX_CHARS + 1)},
            "prompt-pair": {**SIZE, "prompt": [["x" * (PROMPT_MAX_CHARS + 1), 1.0]]},
            "empty": {**SIZE, "seed": []},
        }
        for name, params in refused.items():
            response = await client.post(url, json=params)
            assert response.status == 422, (name, await response.text())
            locs = {tuple(e["loc"][:1]) for e in (await response.json())["detail"]}
            assert locs == {(name.split("-")[0] if name != "empty" else "seed",)}, name
        # The same through the control channel: an error event each, in words.
        async with TricklePublisher(info["control_url"], "application/json") as publisher:
            for name, value in LONG_LISTS.items():
                await publisher.write(json.dumps({**SIZE, name: value}).encode())
            await publisher.write(b'{"keep":"alive"}')
            for field in LONG_LISTS:
                await events.wait_event(
                    lambda e, field=field: e["type"] == "error" and field in e["message"]
                )
        messages = [e["message"] for e in events.of_type("error")]
        assert any(f"at most {BLEND_MAX_ENTRIES} items" in m for m in messages), messages
        # Within the bounds a weighted change applies live, and the session serves on.
        within = [[i, 1.0] for i in range(BLEND_MAX_ENTRIES)]
        prompts = [[f"prompt {i}", 1.0] for i in range(BLEND_MAX_ENTRIES)]
        response = await client.post(url, json={**SIZE, "seed": within, "prompt": prompts})
        assert response.status == 200, await response.text()
        assert (await response.json())["outcome"] == "live"
        status = await (await client.get(f"/live-video-to-video/{info['session_id']}")).json()
        assert not status["ended"]
    finally:
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
