"""In-process source and sink: frames in, frames out, no codec and no network.

For code in the same process that holds frames already (tests, benchmarks, a replay of a
recording), and the model for every other transport adapter.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.media import AudioPacket, VideoFrame

from .edges import FrameSink, FrameSource, MediaContext, MediaItem, OutputFrame


class MemorySource(FrameSource):
    """Frames and audio handed over by `put`; `end()` ends the input.

    `put` never blocks; what it is given is kept until the loop takes it, so a caller that
    produces faster than real time should wait on `taken` (the loop paces frames anyway).
    """

    name = "memory"

    def __init__(self) -> None:
        self._queue: asyncio.Queue[MediaItem | None] = asyncio.Queue()
        self._index = 0
        self.taken = 0

    def put_image(self, image: np.ndarray, pts: int) -> None:
        self.put(VideoFrame(image, pts, time.monotonic(), self._index))
        self._index += 1

    def put(self, item: MediaItem) -> None:
        self._queue.put_nowait(item)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        while (item := await self._queue.get()) is not None:
            self.taken += 1
            yield item


@dataclass(slots=True)
class Delivered:
    frame: OutputFrame
    audio: list[AudioPacket]
    at: float  # time.monotonic() when it was delivered


@dataclass
class MemorySink(FrameSink):
    """Keeps what it is sent. `delay_s` makes it a slow receiver (it takes that long per
    frame), for seeing that a slow sink drops frames without slowing the others."""

    name: str = "memory"
    primary: bool = False
    delay_s: float = 0.0
    delivered: list[Delivered] = field(default_factory=list)
    closed: bool = False
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.delivered.append(Delivered(frame, list(audio), time.monotonic()))
        async with self._changed:
            self._changed.notify_all()
        return True

    async def close(self) -> None:
        self.closed = True
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, frames: int) -> None:
        """Until `frames` frames were delivered or the sink closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.delivered) >= frames or self.closed)
