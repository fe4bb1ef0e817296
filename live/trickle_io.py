"""Trickle as a source/sink pair: MPEG-TS segments in (demux + decode on a thread of their own),
MPEG-TS segments out (encode + mux on a thread of their own, then published).

The sink is pull-based: it encodes a frame, hands its bytes to the publisher and only then takes
the next frame, so a slow output drops frames in the sink's slot instead of queueing bytes.
One encode per session feeds the channel, which fans out to every subscriber.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from protocol.errors import in_words
from protocol.media import (
    AudioPacket,
    EncoderSettings,
    MediaError,
    SegmentEncoder,
    StreamDecoder,
    VideoFrame,
)
from protocol.trickle import EndOfStream, StreamNotFound, TrickleError
from protocol.trickle.interface import Publisher, SegmentWriter, Subscriber

from .edges import (
    FrameSink,
    FrameSource,
    InputFailed,
    MediaContext,
    MediaItem,
    OutputClosed,
    OutputFrame,
)
from .threads import run_in


class TrickleSource(FrameSource):
    """Reads MPEG-TS segments from a trickle channel (ours in process, or another server's)."""

    name = "trickle"

    def __init__(self, subscriber: Subscriber, size: tuple[int, int] | None = None) -> None:
        self.subscriber = subscriber
        self.decoder = StreamDecoder(size)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self._video_problem: str | None = None

    async def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        decoder = self.decoder
        if hasattr(self.subscriber, "on_retry"):
            # A remote input that fails is reported while it is retried, not only at the end.
            self.subscriber.on_retry = lambda problem: context.error(f"input: {problem}")
        while True:
            try:
                segment = await self.subscriber.next()
            except (TrickleError, OSError) as exc:
                raise InputFailed(f"cannot read the input: {in_words(exc)}") from exc
            if segment is None:
                return
            decoder.needs_rgb = context.needs_rgb
            await run_in(self._thread, decoder.begin_segment)
            try:
                async for chunk in segment:
                    for item in await self._decode(context, decoder.feed, chunk):
                        yield item
            except (TrickleError, OSError, TimeoutError) as exc:
                # A publisher that vanished mid-segment: keep what was decoded, go on.
                context.error(f"input segment {segment.seq} cut short: {in_words(exc)}")
            for item in await self._decode(context, decoder.end_segment):
                yield item
            problem = decoder.take_error()
            if problem:
                context.error(f"input segment {segment.seq}: {problem}")

    async def _decode(self, context: MediaContext, fn: Any, *args: Any) -> list[MediaItem]:
        started = time.perf_counter()
        items: list[MediaItem] = await run_in(self._thread, fn, *args)
        frames = sum(1 for item in items if isinstance(item, VideoFrame))
        if frames:
            per_frame = (time.perf_counter() - started) / frames
            for _ in range(frames):
                context.stats.stage("decode", per_frame)
        return items

    async def close(self) -> None:
        try:
            await self.subscriber.close()
        finally:
            self._thread.shutdown(wait=False)


class _Collect:
    """SegmentSink that keeps the encoder's output in order until the event loop sends it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []

    def start(self) -> None:
        self.events.append(("start", b""))

    def write(self, data: bytes) -> None:
        self.events.append(("data", data))

    def end(self) -> None:
        self.events.append(("end", b""))

    def take(self) -> list[tuple[str, bytes]]:
        events, self.events = self.events, []
        return events


class Readers(Protocol):
    """Who reads a channel of our own server (`LocalPublisher`)."""

    def has_readers(self, within_s: float) -> bool: ...

    def pause(self) -> None: ...


READER_GAP_S = 2.0
"""How long past a segment's duration a reader may take to ask for the next one and still
count as reading (between two requests it is waiting on nothing)."""


class TrickleSink(FrameSink):
    """Encodes processed frames (H.264 + the input's audio) and publishes MPEG-TS segments.

    With `readers` (a channel of our own server), it encodes only while someone reads it: a
    WHIP/WHEP session would otherwise encode H.264 that nobody reads, on the cores its WHEP
    encoder needs. Nobody reading, the segment under way ends; a reader arriving gets the next
    frame as the first of a new segment, a keyframe. Without it (another server's channel,
    runner mode, which the orchestrator reads) it always publishes."""

    name = "trickle"

    def __init__(
        self,
        publisher: Publisher,
        settings: EncoderSettings | None = None,
        *,
        name: str = "trickle",
        primary: bool = True,
        readers: Readers | None = None,
    ) -> None:
        self.name = name
        self.primary = primary
        self.publisher = publisher
        self.readers = readers
        self._collect = _Collect()
        self.encoder = SegmentEncoder(self._collect, settings or EncoderSettings())
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="encode")
        self._segment: AbstractAsyncContextManager[SegmentWriter] | None = None
        self._writer: SegmentWriter | None = None
        self._skipping = False  # the current segment failed: its bytes have nowhere to go
        self._context: MediaContext | None = None
        self._encode_error: str | None = None

    async def open(self, context: MediaContext) -> None:
        self._context = context

    @property
    def wanted(self) -> bool:
        if self.readers is None:
            return True
        return self.readers.has_readers(self.encoder.settings.segment_s + READER_GAP_S)

    async def pause(self) -> None:
        await run_in(self._thread, self.encoder.close)  # the segment under way ends here
        try:
            await self._publish(self._collect.take())
        finally:
            if self.readers is not None:
                self.readers.pause()

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        context = self._context
        assert context is not None
        started = time.perf_counter()
        try:
            sent = await run_in(self._thread, self.encoder.encode, frame.picture, frame.pts, audio)
        except MediaError as exc:
            # Said once, not thirty times a second; the sink goes on with the next frame.
            if str(exc) != self._encode_error:
                self._encode_error = str(exc)
                context.error(f"cannot encode the output: {in_words(exc)}")
            return False
        encoded = time.perf_counter()
        context.stats.stage("encode", encoded - started)
        await self._publish(self._collect.take())
        context.stats.stage("egress", time.perf_counter() - encoded)
        return sent

    async def _publish(self, events: list[tuple[str, bytes]]) -> None:
        for kind, data in events:
            try:
                if kind == "start":
                    self._skipping = False
                    self._segment = self.publisher.segment()
                    self._writer = await self._segment.__aenter__()
                elif kind == "data" and self._writer is not None and not self._skipping:
                    await self._writer.write(data)
                elif kind == "end":
                    await self._end_segment()
            except (EndOfStream, StreamNotFound) as exc:
                raise OutputClosed(str(exc)) from exc
            except (TrickleError, OSError) as exc:
                assert self._context is not None
                self._context.error(f"output segment failed: {in_words(exc)}")
                self._skipping = True
                await self._end_segment(exc)

    async def _end_segment(self, exc: BaseException | None = None) -> None:
        segment, self._segment, self._writer = self._segment, None, None
        if segment is not None:
            if exc is None:
                await segment.__aexit__(None, None, None)
            else:
                try:
                    await segment.__aexit__(type(exc), exc, exc.__traceback__)
                except (TrickleError, OSError):
                    pass

    async def close(self) -> None:
        try:
            await run_in(self._thread, self.encoder.close)
            try:
                await self._publish(self._collect.take())
            except OutputClosed:
                pass
            await self._end_segment()
        except (TrickleError, OSError):
            pass
        finally:
            self._thread.shutdown(wait=False)
            try:
                await self.publisher.close()
            except (TrickleError, OSError):
                pass
