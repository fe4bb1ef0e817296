"""The frame loop through its seam: in-process sources and sinks, pacing, several sinks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import av
import numpy as np
import pytest

from live.edges import OutputClosed, OutputFrame
from live.frame_loop import Pacer, StreamEnded
from live.memory_io import MemorySink, MemorySource
from live.pipelines.passthrough import NoopPipeline
from live.session import LiveSession, SessionConfig
from live.trickle_io import TrickleSink
from protocol.clips import numbered_frame, read_index
from protocol.media import CLOCK, AudioPacket, VideoFrame
from protocol.trickle import LocalPublisher, TrickleServer

FPS = 30
STEP = CLOCK // FPS
FRAME_S = 1 / FPS
WAIT_S = 60.0
SIZE = 96  # the smallest size that carries a painted index


def session_with(source, sinks, **config) -> LiveSession:
    return LiveSession(
        "loop-test",
        NoopPipeline,
        NoopPipeline.parse_params({}),
        source,
        sinks,
        SessionConfig(status_interval_s=3600, **config),
    )


async def run_burst(
    source: MemorySource, sink: MemorySink, frames: int = 60, **config
) -> LiveSession:
    """A session fed `frames` frames in one go (as a whole-segment publisher sends them, or a
    live source after a stall), run until the input ends."""
    session = session_with(source, [sink], **config)
    session.start()
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    for i in range(frames):
        source.put_image(numbered_frame(i, SIZE, SIZE), i * STEP)
    source.end()
    await asyncio.wait_for(session.wait(), WAIT_S)
    return session


def decoded_frame(i: int, size: int = SIZE) -> VideoFrame:
    """Frame `i` as a decoder gives it (YUV, no RGB made for it): `noop` passes it on within the
    loop's own step, with no thread to wait for, so the pipeline is never busy with it."""
    rgb = av.VideoFrame.from_ndarray(numbered_frame(i, size, size), format="rgb24")
    return VideoFrame(None, i * STEP, time.monotonic(), i, decoded=rgb.reformat(format="yuv420p"))


async def feed_realtime(
    source: MemorySource, frames: int, size: int = SIZE, decoded: bool = False
) -> None:
    """A camera: one frame every frame interval, each at its own time (`decoded`: as a decoder
    gives them, see `decoded_frame`)."""
    start = time.monotonic()
    for i in range(frames):
        await asyncio.sleep(max(0.0, start + i * FRAME_S - time.monotonic()))
        if decoded:
            source.put(decoded_frame(i, size))
        else:
            source.put_image(numbered_frame(i, size, size), i * STEP)
    source.end()


def indices(sink: MemorySink) -> list[int | None]:
    return [read_index(d.frame.image) for d in sink.delivered]


def test_pacer_releases_a_burst_at_the_frame_rate_and_never_holds_a_late_frame() -> None:
    pacer = Pacer(speed=1.0)
    now = 100.0
    # Thirty frames that all arrived at once are spread over one second.
    releases = []
    for i in range(30):
        releases.append(now + pacer.hold(i * STEP, now))
    gaps = np.diff(releases)
    assert np.allclose(gaps, FRAME_S, atol=1e-6)
    # The next segment arrives late: its first frame goes at once and anchors the rest.
    late = releases[-1] + 0.5
    assert pacer.hold(30 * STEP, late) == 0
    assert abs(pacer.hold(31 * STEP, late) - FRAME_S) < 1e-6
    # A jump in timestamps (a gap in the stream) is not a reason to wait.
    assert pacer.hold(31 * STEP + 10 * CLOCK, late) == 0


async def test_a_burst_of_frames_is_paced_not_dropped() -> None:
    sink = MemorySink(primary=True)
    # Two seconds of frames in one go, as a whole-segment publisher sends them.
    session = await run_burst(MemorySource(), sink)
    assert indices(sink) == list(range(60))
    assert [d.frame.pts for d in sink.delivered] == [i * STEP for i in range(60)]
    assert session.stats.frames_dropped == 0
    assert session.ended == "input ended"


class StallingSink(MemorySink):
    """A receiver that blocks the whole event loop on every tenth frame, for three frame
    intervals: what a loaded machine (or a blocking call elsewhere) does to the loop. It is a
    stall to recover from, not a wait: nothing in the test waits on it."""

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        if len(self.delivered) % 10 == 0:
            time.sleep(3 * FRAME_S)  # noqa: ASYNC251 -- the stall itself, on purpose
        return await super().send(frame, audio)


async def test_a_late_loop_costs_no_frame_before_a_pipeline_that_is_free() -> None:
    """After a stall the paced frames are late and go at once, back to back: each must still
    reach the pipeline (noop takes a decoded frame the moment it gets the loop), not replace
    the one before it in the slot. Frames may be dropped only where a stage was busy."""
    sink = StallingSink(primary=True)
    source = MemorySource()
    session = session_with(source, [sink])
    session.start()
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    for i in range(60):
        source.put(decoded_frame(i))
    source.end()
    await asyncio.wait_for(session.wait(), WAIT_S)
    assert session.stats.frames_in == 60
    assert session.stats.input_dropped == 0
    got = indices(sink)
    assert got == sorted(got) and got[-1] == 59
    assert session.stats.frames_out + session.stats.frames_dropped == 60


async def test_without_pacing_a_burst_keeps_only_what_the_pipeline_can_take() -> None:
    sink = MemorySink(primary=True)
    session = await run_burst(MemorySource(), sink, pace=False)
    # The slot keeps the newest: what went out is in order and ends with the last frame.
    got = indices(sink)
    assert got == sorted(got) and got[-1] == 59
    assert session.stats.frames_in == 60
    assert session.stats.frames_out + session.stats.frames_dropped == 60


class SlowPublisher:
    """A trickle output that takes 50 ms to accept each chunk (a slow network)."""

    def __init__(self, inner: LocalPublisher, delay_s: float = 0.05) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.chunks = 0
        self.on_write: Callable[[], None] = lambda: None  # called as each chunk goes out

    def segment(self):
        publisher = self

        class _Segment:
            async def __aenter__(self):
                self.cm = publisher.inner.segment()
                self.writer = await self.cm.__aenter__()
                return self

            async def write(self, chunk: bytes) -> None:
                await asyncio.sleep(publisher.delay_s)
                publisher.chunks += 1
                publisher.on_write()
                await self.writer.write(chunk)

            async def __aexit__(self, *exc):
                return await self.cm.__aexit__(*exc)

        return _Segment()

    async def write(self, data: bytes) -> int:
        async with self.segment() as segment:
            await segment.write(data)
        return 0

    async def close(self) -> None:
        await self.inner.close()


async def test_a_slow_sink_drops_frames_without_adding_delay_or_slowing_a_fast_one() -> None:
    server = TrickleServer()
    server.create_channel("out")
    slow_output = SlowPublisher(LocalPublisher(server, "out"))
    slow = TrickleSink(slow_output)  # the session's own output, encoded and published
    fast = MemorySink(name="fast")
    source = MemorySource()
    session = session_with(source, [slow, fast])
    stats = session.stats
    inside: list[int] = []  # frames in the session, not yet out nor dropped, at each chunk sent
    slow_output.on_write = lambda: inside.append(
        stats.frames_in - stats.frames_out - stats.frames_dropped
    )
    session.start()
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    frames = 10 * FPS
    await feed_realtime(source, frames, decoded=True)  # noop is never busy: see decoded_frame
    await asyncio.wait_for(session.wait(), WAIT_S)

    # The fast sink kept the camera's frame rate.
    got = indices(fast)
    assert len(got) >= 0.95 * frames and got == sorted(got)
    # The slow one sent what it could, dropped the rest, and counted both.
    sinks = {s.name: s for s in session.stats.sink_status()}
    assert sinks["fast"].sent == len(got)
    assert sinks["trickle"].dropped > frames // 5
    assert sinks["trickle"].sent + sinks["trickle"].dropped == frames
    assert session.stats.frames_out == sinks["trickle"].sent == slow_output.chunks
    assert session.stats.frames_dropped >= sinks["trickle"].dropped
    # Its delay did not grow, at any speed: it dropped rather than queued, so whenever it sent
    # a frame no more were inside than the stages hold one each (paced, in the pipeline's slot,
    # in its own slot, the one it sends).
    assert len(inside) == slow_output.chunks and max(inside) <= 4, inside
    # A second sink cost no encode: only the trickle sink encodes.
    assert "encode" in session.stats.stage_percentiles()


async def test_a_sink_added_mid_stream_starts_at_the_live_edge() -> None:
    source = MemorySource()
    first = MemorySink(primary=True)
    session = session_with(source, [first])
    session.start()
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    feeding = asyncio.create_task(feed_realtime(source, 90))
    await asyncio.wait_for(first.wait_for(30), WAIT_S)
    late = MemorySink(name="late")
    session.add_sink(late)
    await feeding
    await asyncio.wait_for(session.wait(), WAIT_S)
    got = indices(late)
    assert got and got[0] >= 30 and got == sorted(got) and got[-1] == 89
    assert late.closed


async def test_a_sink_offered_to_an_ending_stream_is_refused_not_left_unfed() -> None:
    """A WHEP viewer negotiating while its session stops: the stream refuses its sink, so the
    caller closes the viewer's connection, instead of the sink waiting forever unopened."""
    source = MemorySource()
    session = session_with(source, [MemorySink(primary=True)])
    session.start()
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    session.loop.stop("stopped by the test")  # draining now, not yet ended
    with pytest.raises(StreamEnded, match="stopped by the test"):
        session.add_sink(MemorySink(name="while-stopping"))
    await asyncio.wait_for(session.stop(), WAIT_S)
    with pytest.raises(StreamEnded):
        session.add_sink(MemorySink(name="after-the-end"))


async def test_stats_reads_change_nothing() -> None:
    source = MemorySource()
    sink = MemorySink(primary=True)
    session = session_with(source, [sink])
    session.start()
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    feeding = asyncio.create_task(feed_realtime(source, 45))
    await asyncio.wait_for(sink.wait_for(30), WAIT_S)
    first = session.status().model_dump(exclude={"timestamp"})
    second = session.status().model_dump(exclude={"timestamp"})
    for volatile in ("input_status", "inference_status"):
        first[volatile].pop("fps"), second[volatile].pop("fps")
    assert first["frames_out"] <= second["frames_out"]
    assert set(first["stages"]) >= {"pace", "slot", "inference"}
    await feeding
    await asyncio.wait_for(session.wait(), WAIT_S)
    final = session.status()
    assert final.frames_in == 45 and final.frames_out == len(sink.delivered)
    assert final.end_reason == "input ended" and final.state == "OFFLINE"


class RealtimeSink(MemorySink):
    """A WebRTC viewer's encoder stand-in: its send yields to the loop (as an encode on a
    thread does) and notes when it started and ended; after `closes_after` frames it leaves."""

    def __init__(self, events: list[tuple[str, int]], closes_after: int | None = None) -> None:
        super().__init__(name="realtime")
        self.realtime = True
        self.events = events
        self.closes_after = closes_after

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        if self.closes_after is not None and len(self.delivered) >= self.closes_after:
            raise OutputClosed("viewer left")
        self.events.append(("start", frame.pts))
        for _ in range(3):
            await asyncio.sleep(0)  # the encoder's thread at work: other tasks run meanwhile
        self.events.append(("end", frame.pts))
        return await super().send(frame, audio)


class OrderSink(MemorySink):
    def __init__(self, events: list[tuple[str, int]]) -> None:
        super().__init__(name="trickle", primary=True)
        self.events = events

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        self.events.append(("other", frame.pts))
        return await super().send(frame, audio)


async def test_real_time_sinks_encode_each_frame_before_the_other_sinks_get_it() -> None:
    events: list[tuple[str, int]] = []
    realtime, other = RealtimeSink(events, closes_after=20), OrderSink(events)
    source = MemorySource()
    session = session_with(source, [other, realtime])
    session.start()
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    await feed_realtime(source, 45)
    await asyncio.wait_for(session.wait(), WAIT_S)
    assert len(realtime.delivered) == 20
    sent = [d.frame.pts for d in realtime.delivered]
    assert len([d for d in other.delivered if d.frame.pts <= sent[-1]]) >= 15
    for pts in sent:  # each frame the real-time sink sent reached the others after it
        if ("other", pts) in events:
            assert events.index(("other", pts)) > events.index(("end", pts)), pts
    # Once the viewer left, the others are not held up: every frame on to the end.
    got = indices(other)
    assert got == sorted(got) and got[-1] == 44
    assert len([i for i in got if i is not None and i >= 25]) >= 18
    assert session.stats.frames_out == len(other.delivered)
