"""The frame loop: source -> pace -> [slot] -> process -> [slot per sink] -> sinks.

Four kinds of task, all in one TaskGroup: ingest (reads the source, paces video frames to
their presentation times unless they arrive live, passes audio on), infer (takes the newest
frame from the slot and processes it), and one runner per sink (takes the newest processed
frame when its sink is ready). The only buffers are slots holding one item, so when a stage
is slower than the one before it, frames are dropped there and counted, and delay never grows.
Real-time sinks (WebRTC viewers) get each frame first; the others once one of them sent it.
A sink nobody receives (`FrameSink.wanted`: a trickle output nobody reads) is handed nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from protocol.errors import in_words
from protocol.media import AUDIO_LEAD, CLOCK, AudioPacket, VideoFrame

from .edges import FrameSink, FrameSource, MediaContext, OutputClosed, OutputFrame
from .logs import STAGE
from .slot import LatestSlot


class StreamEnded(RuntimeError):
    """A sink offered to a stream that is ending or has ended: it would never be fed or closed."""


AUDIO_BACKLOG = 500  # packets a sink keeps waiting for video (about 10 s): bounded if video stalls

Process = Callable[[VideoFrame], Awaitable[OutputFrame | None]]


class Pacer:
    """When to release each video frame: at its presentation time, measured from the frame
    released before it.

    A publisher that sends a whole segment at once (a file, an encoder flushing per GOP) would
    otherwise hand the slot thirty frames in a burst, and it keeps only the newest. Each frame
    is held until `speed` x its pts distance after the previous release; a frame that arrives
    later than that is released at once and the next ones are measured from it (re-anchored),
    so a real-time publisher's frames are never held back by an earlier late one for long.
    `speed` < 1 lets a backlog drain: a burst of one second goes out in `speed` seconds.
    """

    MAX_HOLD_S = 1.0  # a pts jump beyond this is a gap in the stream, not a reason to wait

    def __init__(self, speed: float = 0.9) -> None:
        self.speed = speed
        self._last: tuple[int, float] | None = None  # (pts, release time)

    def hold(self, pts: int, now: float) -> float:
        """Seconds to hold the frame with `pts` that is ready at `now` (0: release now)."""
        wait = 0.0
        if self._last is not None:
            last_pts, released = self._last
            step = (pts - last_pts) / CLOCK * self.speed
            if 0 < step <= self.MAX_HOLD_S:
                wait = max(0.0, released + step - now)
        self._last = (pts, now + wait)
        return wait


@dataclass(slots=True)
class _Released:
    frame: VideoFrame
    at: float  # when it went into the slot


class _SinkRunner:
    """Feeds one sink: its own slot of the newest processed frame, and its audio backlog."""

    def __init__(self, sink: FrameSink, loop: FrameLoop) -> None:
        self.sink = sink
        self.loop = loop
        self.stats = loop.context.stats.sink(sink.name)
        if sink.primary:
            loop.context.stats.primary = sink.name
        self.slot: LatestSlot[OutputFrame] = LatestSlot()
        self.audio: collections.deque[AudioPacket] = collections.deque(maxlen=AUDIO_BACKLOG)
        self.task: asyncio.Task[None] | None = None
        self.paused = False  # told `pause` since the last frame it was sent
        if sink.primary:
            loop.primary = sink

    def offer(self, frame: OutputFrame) -> None:
        if self.slot.put(frame):
            self.stats.dropped += 1

    async def run(self) -> None:
        context = self.loop.context
        STAGE.set("encode")  # this task's log lines (and its threads'): the sink's encode and send
        try:
            await self.sink.open(context)
            while (frame := await self.slot.get()) is not None:
                audio = []
                while self.audio and self.audio[0].pts <= frame.pts + AUDIO_LEAD:
                    audio.append(self.audio.popleft())
                if not self.sink.wanted:
                    # Nobody receives it (a trickle output nobody reads): no encode at all,
                    # which leaves the cores to the sinks that are watched.
                    if not self.paused:
                        self.paused = True
                        await self.sink.pause()
                    if self.sink.realtime:
                        self.loop.release_held(frame)
                    continue
                self.paused = False
                sent = await self.sink.send(frame, audio)
                if self.sink.realtime:
                    self.loop.release_held(frame)
                if sent:
                    self.stats.sent += 1
                    if not frame.loading and self.loop.counts_out(self.sink):
                        self.loop.delivered(frame)
                else:
                    self.stats.dropped += 1
        except OutputClosed as exc:
            context.log.info("output closed sink=%s: %s", self.sink.name, exc)
            if self.sink.primary:
                self.loop.stop("output closed")
        except Exception as exc:
            # One receiver failing is its own problem; only the primary output ends the session.
            context.error(f"output {self.sink.name} failed: {in_words(exc)}")
            if self.sink.primary:
                self.loop.stop("output failed")
        finally:
            self.slot.close()
            self.loop.runners.discard(self)
            if self.sink.realtime:
                self.loop.release_held()  # nobody left to send the held frame
            await self.sink.close()


class FrameLoop:
    """Runs one stream from its source to its sinks until the input ends or `stop` is called.

    `process` turns an input frame into an output frame (the session's pipeline, or a loading
    frame); None skips the frame. `on_first_input` and `on_first_output` fire once each.
    `lossless` (offline replay): no frame is dropped; each stage waits for the next one to
    take its frame instead, so the stream goes at the pace of the slowest.
    """

    def __init__(
        self,
        source: FrameSource,
        sinks: list[FrameSink],
        process: Process,
        context: MediaContext,
        *,
        input_timeout_s: float = 60.0,
        pace: bool = True,
        on_first_input: Callable[[], None] = lambda: None,
        on_first_output: Callable[[], None] = lambda: None,
        lossless: bool = False,
    ) -> None:
        self.source = source
        self.process = process
        self.context = context
        self.input_timeout_s = input_timeout_s
        self.pacer = Pacer() if pace else None
        self.on_first_input = on_first_input
        self.on_first_output = on_first_output
        self.lossless = lossless
        self.reason: str | None = None
        self.runners: set[_SinkRunner] = set()
        self._pending_sinks = list(sinks)
        self._frames: LatestSlot[_Released] = LatestSlot()
        self._group: asyncio.TaskGroup | None = None
        self._ingest: asyncio.Task[None] | None = None
        self._seen_input = False
        self._seen_output = False
        self._ended = False
        self._held: OutputFrame | None = None  # for the other sinks, until a real-time one sent it
        self.primary: FrameSink | None = None
        self._last_out_pts: int | None = None  # of the last frame counted in frames_out

    def add_sink(self, sink: FrameSink) -> None:
        """A new receiver (a viewer joining late starts at the live edge: the next frame).

        Raises `StreamEnded` once the stream is stopping or over: the caller still owns the
        sink and must close it (a viewer negotiating while the session stops)."""
        if self.reason is not None or self._ended:
            raise StreamEnded(f"the stream has ended ({self.reason or 'input ended'})")
        if self._group is None:
            self._pending_sinks.append(sink)
            return
        runner = _SinkRunner(sink, self)
        coroutine = runner.run()
        try:
            runner.task = self._group.create_task(coroutine, name=f"sink-{sink.name}")
        except RuntimeError as exc:  # the task group is shutting down: the input ended
            coroutine.close()
            raise StreamEnded("the stream has ended") from exc
        self.runners.add(runner)

    def stop(self, reason: str) -> None:
        """End the stream: input reading stops, what is in flight drains to the sinks."""
        self.reason = self.reason or reason
        if self._ingest is not None:
            self._ingest.cancel()

    async def run(self) -> str:
        """Run to the end; returns why it ended."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            for sink in self._pending_sinks:
                self.add_sink(sink)
            self._pending_sinks.clear()
            self._ingest = group.create_task(self._read(), name="ingest")
            if self.reason is not None:  # stopped before it started
                self._ingest.cancel()
            group.create_task(self._infer(), name="infer")
        self._group = None
        self._ended = True
        return self.reason or "input ended"

    async def _read(self) -> None:
        STAGE.set("decode")
        stats = self.context.stats
        items = self.source.items(self.context)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.input_timeout_s):
                        item = await anext(items)
                except StopAsyncIteration:
                    self.reason = self.reason or "input ended"
                    return
                except TimeoutError:
                    self.context.log.info("no input for %.0f s", self.input_timeout_s)
                    self.reason = self.reason or "no input"
                    return
                if isinstance(item, AudioPacket):
                    for runner in self.runners:
                        runner.audio.append(item)
                    continue
                stats.frame_in()
                if not self._seen_input:
                    self._seen_input = True
                    self.on_first_input()
                now = time.monotonic()
                if self.pacer is not None and not self.source.arrives_live:
                    wait = self.pacer.hold(item.pts, now)
                    if wait > 0:
                        await asyncio.sleep(wait)
                        now = time.monotonic()
                    stats.stage("pace", wait)
                if self.lossless:
                    await self._frames.taken()
                if self._frames.put(_Released(item, now)):
                    stats.input_dropped += 1
                # The pipeline gets the loop before the next frame is read: a frame released
                # at once (late after a stall, or unpaced) would otherwise replace this one in
                # the slot while an idle pipeline never had the chance to take it.
                await asyncio.sleep(0)
        finally:
            self._frames.close()
            with contextlib.suppress(Exception):
                await items.aclose()
            await self.source.close()

    async def _infer(self) -> None:
        STAGE.set("inference")
        stats = self.context.stats
        try:
            while (released := await self._frames.get()) is not None:
                stats.stage("slot", time.monotonic() - released.at)
                out = await self.process(released.frame)
                if out is None:
                    continue
                self._count_unreceived(out)
                self.release_held()  # the frame before, if no real-time sink sent it yet
                realtime = [r for r in self.runners if r.sink.realtime]
                if realtime:
                    self._held = out
                offered = realtime or list(self.runners)
                for runner in offered:
                    runner.offer(out)
                if self.lossless:
                    for runner in offered:
                        await runner.slot.taken()
        finally:
            self.release_held()
            for runner in list(self.runners):
                runner.slot.close()

    def release_held(self, frame: OutputFrame | None = None) -> None:
        """Offer the frame held for the non-real-time sinks to them (with `frame`: only if it
        is the one held). One held frame at most: the next processed one releases it, so a
        slow real-time sink delays the others by a frame, never more."""
        held = self._held
        if held is None or (frame is not None and frame is not held):
            return
        self._held = None
        for runner in list(self.runners):
            if not runner.sink.realtime:
                runner.offer(held)

    def counts_out(self, sink: FrameSink) -> bool:
        """Whether what `sink` sends counts as the session's output (`frames_out`, delay):
        the primary output's frames; while nobody receives it, those of the other sinks (a
        WHEP viewer's), each frame counted once."""
        if sink.primary:
            return True
        return self.primary is not None and not self.primary.wanted

    def _count_unreceived(self, out: OutputFrame) -> None:
        """While no sink has anyone receiving (a WHIP publisher nobody watches), a processed
        frame counts as output once processed: the status still shows the stream flowing."""
        if out.loading or self.primary is None or self.primary.wanted:
            return
        if not any(runner.sink.wanted for runner in self.runners):
            self.delivered(out)

    def delivered(self, frame: OutputFrame) -> None:
        if self._last_out_pts is not None and frame.pts <= self._last_out_pts:
            return  # counted already, as another sink sent it
        self._last_out_pts = frame.pts
        self.context.stats.frame_out(frame.arrived)
        if not self._seen_output:
            self._seen_output = True
            self.on_first_output()
