"""The shape shared by the HTTP and in-process trickle clients, so sessions take either.

async with publisher:                      async with subscriber:
    await publisher.write(segment_bytes)       async for segment in subscriber:
    async with publisher.segment() as s:           async for chunk in segment: ...
        await s.write(chunk)                       # or: data = await segment.read()
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class SegmentWriter(Protocol):
    seq: int

    async def write(self, chunk: bytes) -> None: ...


class Publisher(Protocol):
    async def write(self, data: bytes) -> int: ...

    def segment(self) -> AbstractAsyncContextManager[SegmentWriter]: ...

    async def close(self) -> None: ...


class SubscribedSegment(Protocol):
    seq: int

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    def close(self) -> None: ...


class Subscriber(Protocol):
    def __aiter__(self) -> AsyncIterator[SubscribedSegment]: ...

    async def next(self) -> SubscribedSegment | None: ...

    async def close(self) -> None: ...
