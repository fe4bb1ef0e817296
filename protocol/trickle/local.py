"""In-process trickle clients (go-livepeer trickle/local_publisher.go, local_subscriber.go).

A session of the service reads and writes the channels of its own server through these, with the
same segment semantics as HTTP and no hop through the network stack.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .channel import Channel, Segment
from .errors import EndOfStream, SegmentExists, StreamNotFound
from .headers import LATEST_SEQ
from .server import TrickleServer


class LocalSegmentWriter:
    def __init__(self, channel: Channel, segment: Segment) -> None:
        self.seq = segment.seq
        self._channel = channel
        self._segment = segment

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._segment.writer is None:
            self._segment.writer = self
            self._channel.mark_written(self.seq)
        self._segment.append(bytes(chunk))


class LocalPublisher:
    """Publishes segments 0, 1, 2, ... to a channel of `server`. `linger`: closing it ends the
    channel but keeps it readable a while (TrickleServer.linger) rather than deleting it."""

    def __init__(
        self, server: TrickleServer, name: str, start_seq: int = 0, *, linger: bool = False
    ) -> None:
        self.server = server
        self.name = name
        self.seq = start_seq
        self.linger = linger

    def _channel(self) -> Channel:
        channel = self.server.get(self.name)
        if channel is None:
            raise StreamNotFound(self.name)
        if channel.closed:
            raise EndOfStream(self.name)
        return channel

    @asynccontextmanager
    async def segment(self) -> AsyncIterator[LocalSegmentWriter]:
        channel = self._channel()
        seq = self.seq
        existing = channel.segment(seq)
        if existing is not None and existing.has_data:
            raise SegmentExists(seq)
        segment = channel.get_for_write(seq)
        # Pre-create the next seq, as a preconnected HTTP publisher would, so a subscriber
        # asking for it waits instead of getting 470.
        channel.get_for_write(seq + 1)
        self.seq = seq + 1
        writer = LocalSegmentWriter(channel, segment)
        try:
            yield writer
        finally:
            if not segment.has_data:
                channel.mark_written(seq)
            segment.close()

    def has_readers(self, within_s: float) -> bool:
        """Whether anyone reads the channel now (`Channel.has_readers`). A channel deleted or
        closed counts as read: the publisher's next write finds out that it is gone."""
        channel = self.server.get(self.name)
        return channel is None or channel.closed or channel.has_readers(within_s)

    def pause(self) -> None:
        """Say that no segment follows for a while (nobody reads): until the next one starts,
        a reader asking for the live edge waits for it instead of getting the last one."""
        channel = self.server.get(self.name)
        if channel is not None:
            channel.paused = True

    async def write(self, data: bytes) -> int:
        async with self.segment() as writer:
            await writer.write(data)
        return writer.seq

    async def close(self, delete: bool = True) -> None:
        if delete and self.linger:
            self.server.linger(self.name)
        elif delete:
            self.server.delete_channel(self.name)

    async def __aenter__(self) -> LocalPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class LocalSegment:
    def __init__(self, segment: Segment) -> None:
        self.seq = segment.seq
        self._segment = segment

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._segment.iter_chunks()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self._segment.iter_chunks()])

    def close(self) -> None:
        pass


class LocalSubscriber:
    """Reads a channel of `server` segment by segment from `start_seq` (-2: the current one).

    Falling out of the ring jumps to the live edge, like an HTTP subscriber after a 470; the
    iteration ends when the channel is closed or removed.
    """

    def __init__(self, server: TrickleServer, name: str, start_seq: int = LATEST_SEQ) -> None:
        self.server = server
        self.name = name
        self.seq = start_seq
        self.skipped = 0

    def __aiter__(self) -> LocalSubscriber:
        return self

    async def __anext__(self) -> LocalSegment:
        segment = await self.next()
        if segment is None:
            raise StopAsyncIteration
        return segment

    async def next(self) -> LocalSegment | None:
        while True:
            channel = self.server.get(self.name)
            if channel is None:
                return None
            # An ended channel still listed lingers: what was written can still be read.
            seq = channel.resolve_read_seq(self.seq)
            segment = channel.get_for_read(seq)
            if segment is None:
                self.skipped += 1
                if not channel.closed:
                    self.seq = channel.next_write
                elif seq < channel.next_write - 1:
                    self.seq = channel.next_write - 1  # behind an ended channel: its last one
                else:
                    return None
                continue
            await segment.wait_started()
            if not segment.has_data and channel.closed:
                return None
            self.seq = seq + 1
            return LocalSegment(segment)

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> LocalSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
