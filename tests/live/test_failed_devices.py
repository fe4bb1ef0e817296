"""Live sessions and a device whose worker process failed for good (`--worker-process`, on the
CPU): the sessions running there end saying so, a new session goes to a device that still
works, and with none left a new session is refused at once (503 without Retry-After, the
detail saying what the operator should do) while /health goes on answering with the failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from multiprocessing import resource_tracker

import pytest

from live.app import create_app
from live.keys import SESSIONS
from live.settings import Settings
from tests.live.conftest import PIPELINES
from tests.live.streams import start_session, wait_gone
from tests.live.test_devices import DeviceNoop
from tests.live.test_worker_sessions import Stream
from tests.runtime.test_device_failure import fail_for_good
from tests.runtime.test_worker_process import new_since, snapshot
from tests.waiting import poll_until


@pytest.fixture
async def service(aiohttp_client) -> AsyncIterator:
    resource_tracker.ensure_running()
    before = snapshot()
    clients = []

    async def start(**overrides):
        settings = Settings(status_interval_s=0.5, worker_process=True, **overrides)
        pipelines = {**PIPELINES, DeviceNoop.name: DeviceNoop}
        client = await aiohttp_client(create_app(settings, pipelines))
        clients.append(client)
        return client

    yield start
    for client in clients:  # its close ends the workers it started
        await client.close()
    # A failed worker leaves nothing behind either: no process, segment, thread or fd.
    if not await poll_until(lambda: not new_since(before)):
        pytest.fail(f"left behind: {new_since(before)}")


@pytest.fixture
async def streams() -> AsyncIterator[list[Stream]]:
    """The test's streams, closed even when it fails (before the service's teardown)."""
    opened: list[Stream] = []
    yield opened
    for stream in opened:
        await stream.close()


async def test_with_every_worker_failed_a_session_is_refused_and_health_says_why(
    service, streams
) -> None:
    client = await service(device="cpu")
    running = Stream(await start_session(client, model_id="cartoon"))
    streams.append(running)
    await running.processed(5)
    await fail_for_good(client.app[SESSIONS].runtime.device())

    # The session that ran there ends, saying its worker failed and why.
    final = await running.events.wait_event(lambda e: e["type"] == "status" and e["end_reason"])
    reason = final["end_reason"]
    assert reason.startswith("worker failed: the worker process of cpu failed 1 time "), final
    assert "is not restarted (last: the worker process aborted (SIGABRT))" in reason, final
    await wait_gone(client, running.info["session_id"])
    await running.close()

    # A new session is refused at once, whatever its pipeline: each would run in that worker.
    for model_id in ("cartoon", "device-noop", "noop"):
        response = await client.post("/live-video-to-video", json={"model_id": model_id})
        assert response.status == 503, await response.text()
        assert "Retry-After" not in response.headers  # it does not pass by itself
        detail = (await response.json())["detail"]["msg"]
        assert "the worker process of cpu failed 1 time within 300 s" in detail, detail
        assert "(last: the worker process aborted (SIGABRT))" in detail, detail
        assert "look at /health and the service's logs" in detail, detail
        assert "restart the service" in detail, detail
    assert not client.app[SESSIONS].sessions

    # The service goes on answering, and /health says what failed.
    health = await (await client.get("/health")).json()
    assert health["status"] == "ERROR", health
    assert "the worker process of cpu failed 1 time" in health["error"], health
    assert "SIGABRT" in health["error"], health
    (worker,) = health["workers"]
    assert worker["state"] == "failed" and worker["pid"] is None, worker


async def test_a_session_goes_to_the_device_whose_worker_still_works(service, streams) -> None:
    client = await service(devices="cpu,cpu")
    runtime = client.app[SESSIONS].runtime
    failed, working = await asyncio.to_thread(lambda: runtime.devices)
    # The first device: the one placement would otherwise prefer (`--devices` order).
    await fail_for_good(failed)

    # A device-bound pipeline is placed on the working device; one that takes no device
    # runs in that device's worker too.
    for model_id in ("device-noop", "noop"):
        streams.append(Stream(await start_session(client, model_id=model_id)))
    for stream in streams:
        await stream.processed(10)
    bound, free = [
        await (await client.get(f"/live-video-to-video/{s.info['session_id']}")).json()
        for s in streams
    ]
    assert (bound["device"], free["device"]) == ("cpu:1", None)
    assert bound["state"] == free["state"] == "ONLINE", (bound, free)
    health = await (await client.get("/health")).json()
    capacity = {d["device"]: d for d in health["capacity"]["devices"]}
    assert (capacity["cpu:0"]["sessions"], capacity["cpu:1"]["sessions"]) == (0, 1)
    assert capacity["cpu:0"]["streams_left"] == {"device-noop": 0}, capacity  # it takes none
    assert failed.started_process_worker().status().state == "failed"  # type: ignore[union-attr]
    assert working.started_process_worker().status().state == "ready"  # type: ignore[union-attr]

    for stream in streams:
        await client.delete(f"/live-video-to-video/{stream.info['session_id']}")
        await wait_gone(client, stream.info["session_id"])
        await stream.close()
