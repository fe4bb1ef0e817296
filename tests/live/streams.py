"""Helpers that act as the streamer and the viewer of a live session, over real trickle.

Publishers keep a camera's timing (each frame's bytes at its presentation time, or each whole
segment when its last frame is due); viewers and event readers let a test wait on what they
have seen (`wait_frames`, `wait_event`) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from live.keys import SESSIONS
from protocol.clips import Clip, read_index
from protocol.media import AudioPacket, StreamDecoder
from protocol.trickle import TricklePublisher, TrickleSubscriber

WAIT_S = 30.0  # generous: only a hung test ever reaches it
LOAD_S = 90.0
"""A first load in a fresh worker process imports torch and reads the model: seconds on a busy
CPU."""


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on once this returns: free to bind, and a
    connection to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def publish_clip(
    url: str,
    clip: Clip,
    realtime: bool = True,
    close: bool = True,
    whole_segments: bool = False,
) -> None:
    """Publish a clip one segment per trickle segment. By default each frame's bytes go at the
    frame's own time; `whole_segments` sends each segment in one write once its last frame is
    due (an encoder that flushes per GOP, or a client cutting a file)."""
    publisher = TricklePublisher(url)
    start = time.monotonic()
    first_pts = clip.pts[0]
    index = 0

    async def until(pts: int) -> None:
        if realtime:
            due = start + (pts - first_pts) / 90_000
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    try:
        for frames in clip.segments:
            if whole_segments:
                index += len(frames)
                await until(clip.pts[index - 1])
                await publisher.write(b"".join(frames))
                continue
            async with publisher.segment() as writer:
                for data in frames:
                    await until(clip.pts[index])
                    await writer.write(data)
                    index += 1
    finally:
        await publisher.close(delete=close)


@dataclass
class Received:
    frame: np.ndarray
    pts: int
    index: int | None
    at: float


@dataclass
class Viewer:
    """Reads an output channel to its end, decoding every frame as it arrives."""

    url: str
    frames: list[Received] = field(default_factory=list)
    audio: list[AudioPacket] = field(default_factory=list)
    segments: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _done: bool = False

    async def run(self) -> None:
        decoder = StreamDecoder()
        try:
            async with TrickleSubscriber(self.url, start_seq=0) as subscriber:
                async for segment in subscriber:
                    self.segments += 1
                    decoder.begin_segment()
                    async for chunk in segment:
                        await self._take(decoder.feed(chunk))
                    await self._take(decoder.end_segment())
        finally:
            self._done = True
            async with self._changed:
                self._changed.notify_all()

    async def _take(self, items: list) -> None:
        now = time.monotonic()
        for item in items:
            if isinstance(item, AudioPacket):
                self.audio.append(item)
            else:
                self.frames.append(Received(item.image, item.pts, read_index(item.image), now))
        async with self._changed:
            self._changed.notify_all()

    async def wait_frames(self, count: int) -> None:
        """Until `count` frames arrived (fails if the stream ends first)."""
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: len(self.frames) >= count or self._done)
        assert len(self.frames) >= count, f"stream ended after {len(self.frames)} frames"

    @property
    def indices(self) -> list[int | None]:
        return [frame.index for frame in self.frames]


@dataclass
class EventLog:
    url: str
    events: list[dict] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        async with TrickleSubscriber(self.url, start_seq=0) as subscriber:
            async for segment in subscriber:
                self.events.append(json.loads(await segment.read()))
                async with self._changed:
                    self._changed.notify_all()

    def of_type(self, kind: str) -> list[dict]:
        return [e["event"] for e in self.events if e["event"]["type"] == kind]

    async def wait_event(self, match: Callable[[dict], bool], after: int = 0) -> dict:
        """The first event from position `after` on that `match` accepts, once it arrives."""

        def found() -> dict | None:
            return next((e["event"] for e in self.events[after:] if match(e["event"])), None)

        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        event = found()
        assert event is not None
        return event


async def start_session(client, **body) -> dict:
    response = await client.post("/live-video-to-video", json=body)
    assert response.status == 200, await response.text()
    return await response.json()


async def wait_gone(client, session_id: str) -> None:
    """Until the session has ended and released everything; then it is no longer listed."""
    session = client.app[SESSIONS].sessions.get(session_id)
    if session is not None:
        await asyncio.wait_for(session.wait(), WAIT_S)
    assert (await client.get(f"/live-video-to-video/{session_id}")).status == 404


def watch(info: dict) -> tuple[Viewer, EventLog, list[asyncio.Task[None]]]:
    """A viewer on a session's output and a reader of its events, each running in a task."""
    viewer = Viewer(info["subscribe_url"])
    events = EventLog(info["events_url"])
    return viewer, events, [asyncio.create_task(viewer.run()), asyncio.create_task(events.run())]


async def wait_loaded(client, session_id: str, within: float = LOAD_S) -> None:
    """Until the session's pipeline has loaded for the first time, or the session ended (a load
    that fails). Its frames before that are loading frames: in a worker process (the default),
    even `noop`-like test pipelines wait for the process to start."""
    session = client.app[SESSIONS].sessions.get(session_id)
    if session is None:
        return
    waits = [asyncio.ensure_future(session.wait_ready()), asyncio.ensure_future(session.wait())]
    try:
        done, _ = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        assert done, f"the session's pipeline did not load within {within:g} s"
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def run_stream(
    client, clip, *, body=None, during=None, realtime=True, loaded_first=True, **publish
):
    """A session fed `clip` to its end, watched all along. `loaded_first`: publishing starts
    once the pipeline has loaded, so every frame of the clip reaches it."""
    info = await start_session(client, **(body or {}))
    viewer, events, tasks = watch(info)
    if loaded_first:
        await wait_loaded(client, info["session_id"])
    publishing = asyncio.create_task(publish_clip(info["publish_url"], clip, realtime, **publish))
    if during is not None:
        await during(info, viewer, events)
    await asyncio.wait_for(publishing, 60)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    return info, viewer, events
