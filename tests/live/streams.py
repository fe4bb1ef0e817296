"""Helpers that act as the streamer and the viewer of a live session, over real trickle."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import numpy as np

from protocol.clips import Clip, read_index
from protocol.media import AudioPacket, StreamDecoder
from protocol.trickle import TricklePublisher, TrickleSubscriber


async def publish_clip(url: str, clip: Clip, realtime: bool = True, close: bool = True) -> None:
    """Publish a clip one segment per trickle segment, each frame's bytes at its own time."""
    publisher = TricklePublisher(url)
    start = time.monotonic()
    first_pts = clip.pts[0]
    index = 0
    try:
        for frames in clip.segments:
            async with publisher.segment() as writer:
                for data in frames:
                    if realtime:
                        due = start + (clip.pts[index] - first_pts) / 90_000
                        await asyncio.sleep(max(0.0, due - time.monotonic()))
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

    async def run(self) -> None:
        decoder = StreamDecoder()
        async with TrickleSubscriber(self.url, start_seq=0) as subscriber:
            async for segment in subscriber:
                self.segments += 1
                decoder.begin_segment()
                async for chunk in segment:
                    self._take(decoder.feed(chunk))
                self._take(decoder.end_segment())

    def _take(self, items: list) -> None:
        now = time.monotonic()
        for item in items:
            if isinstance(item, AudioPacket):
                self.audio.append(item)
            else:
                self.frames.append(Received(item.image, item.pts, read_index(item.image), now))

    @property
    def indices(self) -> list[int | None]:
        return [frame.index for frame in self.frames]


@dataclass
class EventLog:
    url: str
    events: list[dict] = field(default_factory=list)

    async def run(self) -> None:
        async with TrickleSubscriber(self.url, start_seq=0) as subscriber:
            async for segment in subscriber:
                self.events.append(json.loads(await segment.read()))

    def of_type(self, kind: str) -> list[dict]:
        return [e["event"] for e in self.events if e["event"]["type"] == kind]
