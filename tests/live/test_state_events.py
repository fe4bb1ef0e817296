"""Issue 19, finding 2: a session publishes its status at every change of its state, not only
on the periodic tick, and a state that flaps does not flood its events.

Every session here has a status period of an hour, so any status event after the first comes
from a change of state; each is waited for on its condition (the event arriving).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from live import session as session_module
from live.memory_io import MemorySink, MemorySource
from live.pipelines.passthrough import NoopPipeline
from live.session import STATE_EVENT_GAP_S, LiveSession, SessionConfig
from protocol.clips import make_clip, numbered_frame
from protocol.media import CLOCK
from tests.live.conftest import PIPELINES
from tests.live.streams import EventLog, publish_clip, start_session, wait_gone
from tests.live.test_event_stream import open_stream
from tests.waiting import WAIT_S

SIZE = 96
STEP = CLOCK // 30
HOUR_S = 3600.0


class Switchable(NoopPipeline):
    """Fails while `failing` is set; its loads wait for `loads_may_finish`."""

    name = "switchable"
    failing = False
    loads_may_finish = threading.Event()

    def load(self) -> None:
        # The test holds a reload here to see its LOADING state; released at once otherwise.
        type(self).loads_may_finish.wait(WAIT_S)

    def process(self, image: np.ndarray) -> np.ndarray:
        if type(self).failing:
            raise RuntimeError("boom")
        return image


class EveryOtherFails(NoopPipeline):
    """Fails on every other frame: its state flaps between ONLINE and DEGRADED_INFERENCE."""

    name = "every-other-fails"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def process(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("every other frame")
        return image


class Watched:
    """A session's events as an in-process reader (the page's event stream) sees them."""

    def __init__(self, session: LiveSession) -> None:
        self.session = session
        self.events: list[dict] = []
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for message in self.session.watch_events():
            self.events.append(message["event"])
            async with self._changed:
                self._changed.notify_all()

    def statuses(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "status"]

    async def status(self, match: Callable[[dict], bool], after: int = 0) -> tuple[int, dict]:
        """The first status event from position `after` on that `match` accepts, and its
        position, once it has come."""

        def found() -> tuple[int, dict] | None:
            for i, event in enumerate(self.events[after:], after):
                if event["type"] == "status" and match(event):
                    return i, event
            return None

        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result


def start(pipeline: type[NoopPipeline], source: MemorySource, **config: Any) -> LiveSession:
    session = LiveSession(
        "state-test",
        pipeline,
        pipeline.parse_params({}),
        source,
        [MemorySink(primary=True)],
        SessionConfig(status_interval_s=HOUR_S, **config),
    )
    session.start()
    return session


class Camera:
    """Frames at 30 fps into a memory source until paused or stopped."""

    def __init__(self, source: MemorySource) -> None:
        self.source = source
        self.running = asyncio.Event()
        self.sent = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.running.wait()
            self.source.put_image(numbered_frame(self.sent, SIZE, SIZE), self.sent * STEP)
            self.sent += 1
            await asyncio.sleep(1 / 30)  # a camera's frame interval

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
def quick_staleness(monkeypatch: pytest.MonkeyPatch) -> None:
    # Input counts as stale after 0.3 s instead of 2 s: the same transition, sooner.
    monkeypatch.setattr(session_module, "INPUT_STALE_MS", 300)


async def test_every_change_of_state_is_published_when_it_happens(quick_staleness) -> None:
    Switchable.failing = False
    Switchable.loads_may_finish.set()
    source = MemorySource()
    session = start(Switchable, source, max_consecutive_failures=1000)
    watched = Watched(session)
    camera = Camera(source)
    try:
        # Loaded, no input yet: waiting for video.
        at, _ = await watched.status(lambda e: e["state"] == "DEGRADED_INPUT")
        # Input comes: live; the first output frame has its own event.
        camera.running.set()
        at, _ = await watched.status(lambda e: e["state"] == "ONLINE", after=at)
        at, first = await watched.status(lambda e: e["frames_out"] >= 1)
        assert first["inference_status"]["last_output_time"] is not None

        # The pipeline fails: degraded, with the error; frames again: live.
        Switchable.failing = True
        at, failing = await watched.status(lambda e: e["state"] == "DEGRADED_INFERENCE", after=at)
        assert "boom" in failing["inference_status"]["last_error"]
        Switchable.failing = False
        at, _ = await watched.status(lambda e: e["state"] == "ONLINE", after=at)

        # A change that reloads: loading while the load runs, live once it is done.
        Switchable.loads_may_finish.clear()
        assert await session.update_params({"show_reloading_frame": False}) == "reload"
        at, _ = await watched.status(lambda e: e["state"] == "LOADING", after=at)
        Switchable.loads_may_finish.set()
        at, _ = await watched.status(lambda e: e["state"] == "ONLINE", after=at)

        # The camera stalls: waiting for video (a change no frame tells of); then back.
        camera.running.clear()
        at, _ = await watched.status(lambda e: e["state"] == "DEGRADED_INPUT", after=at)
        camera.running.set()
        at, _ = await watched.status(lambda e: e["state"] == "ONLINE", after=at)

        # The input ends: the final status.
        await camera.close()
        source.end()
        _, final = await watched.status(lambda e: e["end_reason"] is not None, after=at)
        assert final["state"] == "OFFLINE" and final["end_reason"] == "input ended"
    finally:
        Switchable.loads_may_finish.set()
        await camera.close()
        await session.stop()
        await watched.task


async def test_a_flapping_state_is_coalesced_not_flooded(monkeypatch) -> None:
    # Every event kept for the count (a reader that falls behind would lose the oldest).
    monkeypatch.setattr(session_module, "WATCH_BACKLOG", 100_000)
    source = MemorySource()
    session = start(EveryOtherFails, source, max_consecutive_failures=1000)
    watched = Watched(session)
    loop = asyncio.get_running_loop()
    try:
        await watched.status(lambda e: e["state"] == "DEGRADED_INPUT")
        began = loop.time()
        # 600 frames 2 ms apart, released at their times (paced): about a second of flapping.
        for i in range(600):
            source.put_image(numbered_frame(i, SIZE, SIZE), i * CLOCK // 500)
        source.end()
        await asyncio.wait_for(session.wait(), WAIT_S * 3)
        await watched.task
        elapsed = loop.time() - began
    finally:
        await session.stop()

    errors = [e for e in watched.events if e["type"] == "error"]
    statuses = watched.statuses()
    # The state changed with every processed frame: each failure degraded it, each good frame
    # after one brought it back.
    flips = 2 * len(errors)
    # One status event per STATE_EVENT_GAP_S at most, plus the first and the final one.
    bound = elapsed / STATE_EVENT_GAP_S + 3
    assert flips > 2 * bound, (flips, bound)
    assert len(statuses) <= bound, (len(statuses), bound, elapsed)
    # Coalesced, not muted: both states were published while it flapped.
    shown = {s["state"] for s in statuses[1:-1]}
    assert {"DEGRADED_INFERENCE"} <= shown, shown


async def test_both_event_routes_carry_each_change_at_once(aiohttp_client) -> None:
    from live.app import create_app
    from live.settings import Settings

    client = await aiohttp_client(create_app(Settings(status_interval_s=HOUR_S), PIPELINES))
    info = await start_session(client, model_id="cartoon")
    log = EventLog(info["events_url"])
    reading = asyncio.create_task(log.run())
    stream = await open_stream(client, info)
    streaming = asyncio.create_task(stream.run())
    # Loaded, nothing published yet: both say so without waiting for the period.
    await log.wait_event(lambda e: e["type"] == "status" and e["state"] == "DEGRADED_INPUT")
    await stream.wait_for(lambda s: any(e.get("state") == "DEGRADED_INPUT" for e in s.events()))
    publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(60), True))
    online = await log.wait_event(lambda e: e["type"] == "status" and e["state"] == "ONLINE")
    assert online["end_reason"] is None
    await stream.wait_for(lambda s: any(e.get("state") == "ONLINE" for e in s.events()))
    await asyncio.wait_for(publishing, 60)
    await stream.wait_end()
    assert stream.events()[-1]["end_reason"] == "input ended"
    await asyncio.wait_for(reading, WAIT_S)
    assert log.of_type("status")[-1]["end_reason"] == "input ended"
    await wait_gone(client, info["session_id"])
    await asyncio.wait_for(streaming, WAIT_S)
