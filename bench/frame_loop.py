"""Frame-loop benchmark: the cost of a live session against raw PyAV, and its delay.

    python -m bench.frame_loop [--frames 300] [--size 512] [--slow-seconds 20]
        [--outside-seconds 10] [--whole-seconds 30] [--two-sink-seconds 15]
        [--only raw,noop,slow,two-sink,outside,whole] [--json]

Cases (all clips are numbered frames from `protocol.clips`, 30 fps, 1 s segments):

1. raw: the clip decoded and re-encoded by PyAV in one loop (FFmpeg demuxer, libx264 with the
   session's settings), the baseline.
2. noop: a `noop` LiveSession in process, trickle source and sink over in-process channels,
   unpaced (`SessionConfig(pace=False)`), the clip published as fast as the session takes it
   (one frame in flight): fps out (and its ratio to raw; the goal is >= 0.9) and the session's
   own ingest-to-output delay per frame (input bytes arrived -> output segment bytes written).
   Frames the encoder was too busy for are dropped (counted), so fps out can beat raw, which
   encodes every frame; fps in is the rate the session took input at.
3. slow: a pipeline at 10 fps fed 30 fps in real time (paced); delay at the start and the end.
4. two-sink: one noop session fed 30 fps in real time by a `MemorySource`, with two sinks: a
   slow `TrickleSink` whose every publisher write waits 50 ms, and a fast `MemorySink`. Per
   sink: fps out, dropped, delay (frame put into the source -> the sink's send returned) over
   the first 5 s and the last 5 s. The slow sink must drop frames, not slow the fast one.
5. outside: the real service (`python -m live serve`) in its own process, a 30 fps 512x512
   clip published over HTTP trickle frame by frame in real time and read back over HTTP,
   frames matched by their painted index; run once with AAC and once with Opus audio. Delay
   is frame sent (its first byte written) -> frame decoded by the viewer; first frame is that
   delay for frame 0; CPU is the service process's CPU seconds / wall seconds while publishing.
6. whole: a whole-segment publisher (a file, an encoder flushing per GOP): the same service,
   each 1 s segment POSTed in one write at its real time, i.e. when its last frame would have
   been captured. Frames out / in is frames decoded by the viewer / frames published. Two
   delays per frame, both ending when the viewer decoded it:
     - from capture: capture time = segment post time - segment duration + frame offset
       (frame offset = its pts - the segment's first pts), what a viewer of a camera sees;
     - from post: from the segment's post time (its first byte sent), the service's share.
   A service that releases frames at their presentation times shows delay from post growing
   with the offset (p50 about half a second) and delay from capture about one segment.

The outside cases use only `protocol/` and HTTP (the `live` package is imported by the
in-process cases alone), so `--only outside,whole` also measures an older checkout of the
service: run it with that checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
import av
import numpy as np

from protocol.clips import Clip, make_clip, numbered_frame, read_index
from protocol.media import CLOCK, StreamDecoder, VideoFrame
from protocol.trickle import TricklePublisher, TrickleSubscriber

CASES = ("raw", "noop", "slow", "two-sink", "outside", "whole")
SLOW_WRITE_S = 0.05  # each write of the two-sink case's slow output


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def ms(values: Sequence[float]) -> dict[str, float]:
    """p50/p95 of delays in seconds, as milliseconds."""
    return {
        "p50_ms": round(pct(values, 0.5) * 1000, 1),
        "p95_ms": round(pct(values, 0.95) * 1000, 1),
        "frames": len(values),
    }


# -- raw PyAV --------------------------------------------------------------------------------


def raw_baseline(clip: Clip) -> float:
    """fps of decode + encode in one loop with plain PyAV."""
    data = b"".join(clip.segment_bytes())
    start = time.perf_counter()
    out_buf = io.BytesIO()
    with (
        av.open(io.BytesIO(data), "r", format="mpegts") as src,
        av.open(out_buf, "w", format="mpegts") as dst,
    ):
        stream = None
        frames = 0
        for frame in src.decode(video=0):
            image = frame.to_ndarray(format="rgb24")
            if stream is None:
                stream = dst.add_stream("libx264", rate=30)
                stream.width, stream.height = image.shape[1], image.shape[0]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.options = {
                    "preset": "superfast",
                    "tune": "zerolatency",
                    "bf": "0",
                }
            out = av.VideoFrame.from_ndarray(image, format="rgb24")
            out.pts = frames
            for packet in stream.encode(out):
                dst.mux(packet)
            frames += 1
        assert stream is not None
        for packet in stream.encode(None):
            dst.mux(packet)
    return frames / (time.perf_counter() - start)


# -- in process ------------------------------------------------------------------------------


async def _wait_online(session: Any) -> None:
    while session.state != "ONLINE":
        if not session.running:
            raise RuntimeError(f"session ended before it was online: {session.ended}")
        await asyncio.sleep(0.01)


async def in_process(clip: Clip, pipeline_name: str, realtime: bool) -> dict[str, Any]:
    """A session over in-process trickle channels. `realtime`: frames published at their
    presentation times (paced session); else as fast as the session takes them (unpaced)."""
    from live.pipelines.passthrough import NoopPipeline
    from live.session import LiveSession, SessionConfig
    from live.trickle_io import TrickleSink, TrickleSource
    from protocol.trickle import LocalPublisher, LocalSubscriber, TrickleServer

    class SlowPipeline(NoopPipeline):
        name = "slow"

        def process(self, image: np.ndarray) -> np.ndarray:
            time.sleep(0.1)
            return image

    pipeline_cls = SlowPipeline if pipeline_name == "slow" else NoopPipeline
    server = TrickleServer()
    for name in ("in", "out", "ev"):
        server.create_channel(name)
    session = LiveSession(
        "bench",
        pipeline_cls,
        pipeline_cls.parse_params({}),
        TrickleSource(LocalSubscriber(server, "in")),
        [TrickleSink(LocalPublisher(server, "out"))],
        SessionConfig(status_interval_s=3600, pace=realtime),
        events=LocalPublisher(server, "ev"),
    )
    stats = session.stats
    delays: list[tuple[float, float]] = []  # (time into the run, delay of the frame)
    task = session.start()
    publisher = LocalPublisher(server, "in")
    await _wait_online(session)
    start = time.monotonic()
    seen = 0
    index = 0
    for frames in clip.segments:
        async with publisher.segment() as writer:
            for data in frames:
                if realtime:
                    due = start + (clip.pts[index] - clip.pts[0]) / CLOCK
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                await writer.write(data)
                index += 1
                if not realtime:
                    # As fast as the session takes frames: the next one goes in once this
                    # one is decoded and the frame before it has left the slot.
                    while stats.frames_in < index or (
                        stats.frames_in - stats.frames_out - stats.frames_dropped > 2
                    ):
                        if task.done():
                            raise RuntimeError(f"session ended early: {session.ended}")
                        await asyncio.sleep(0.0002)
                # The session keeps the last 300 delays; sample the newest as frames leave.
                if stats.frames_out > seen and stats.latencies:
                    delays.append((time.monotonic() - start, stats.latencies[-1]))
                    seen = stats.frames_out
    # Let the last frames out before the input ends.
    for _ in range(2000):
        if stats.frames_out + stats.frames_dropped >= stats.frames_in:
            break
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - start
    await publisher.close()
    await asyncio.wait_for(task, 30)
    values = [d for _, d in delays] or list(stats.latencies)
    return {
        "fps": stats.frames_out / elapsed,
        "fps_in": stats.frames_in / elapsed,
        "frames_in": stats.frames_in,
        "frames_out": stats.frames_out,
        "dropped": stats.frames_dropped,
        **ms(values),
        "ended": session.ended,
        "delays": delays,
    }


async def two_sinks(seconds: float, size: int) -> dict[str, Any]:
    """One session, 30 fps in real time from memory, a slow trickle sink and a fast one."""
    from live.memory_io import MemorySink, MemorySource
    from live.pipelines.passthrough import NoopPipeline
    from live.session import LiveSession, SessionConfig
    from live.trickle_io import TrickleSink
    from protocol.trickle import LocalPublisher, TrickleServer

    class SlowWriter:
        def __init__(self, writer: Any) -> None:
            self.writer = writer
            self.seq = writer.seq

        async def write(self, chunk: bytes) -> None:
            await asyncio.sleep(SLOW_WRITE_S)
            await self.writer.write(chunk)

    class SlowPublisher:
        """A publisher on a slow link: every write waits 50 ms before it goes."""

        def __init__(self, inner: LocalPublisher) -> None:
            self.inner = inner

        async def write(self, data: bytes) -> int:
            await asyncio.sleep(SLOW_WRITE_S)
            return await self.inner.write(data)

        def segment(self) -> Any:
            inner = self.inner

            class _Segment:
                async def __aenter__(self) -> SlowWriter:
                    self.cm = inner.segment()
                    return SlowWriter(await self.cm.__aenter__())

                async def __aexit__(self, *exc: Any) -> Any:
                    return await self.cm.__aexit__(*exc)

            return _Segment()

        async def close(self) -> None:
            await self.inner.close()

    class TimedTrickleSink(TrickleSink):
        """Notes when each frame's send returned (its bytes were written)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.delivered: list[tuple[float, float]] = []  # (arrived, sent)

        async def send(self, frame: Any, audio: Any) -> bool:
            sent = await super().send(frame, audio)
            if sent and not frame.loading:
                self.delivered.append((frame.arrived, time.monotonic()))
            return sent

    server = TrickleServer()
    server.create_channel("out")
    source = MemorySource()
    slow = TimedTrickleSink(SlowPublisher(LocalPublisher(server, "out")), name="slow", primary=True)
    fast = MemorySink(name="fast")
    session = LiveSession(
        "two-sinks",
        NoopPipeline,
        NoopPipeline.parse_params({}),
        source,
        [slow, fast],
        SessionConfig(status_interval_s=3600),
    )
    images = [numbered_frame(i, size, size) for i in range(30)]  # cycled: no 512x512 per frame
    frames = int(seconds * 30)
    task = session.start()
    # Loading frames until the pipeline is ready; the figures start with the first real frame.
    for i in range(frames):
        if session.state == "ONLINE":
            break
        source.put_image(images[i % 30], i * CLOCK // 30)
        await asyncio.sleep(1 / 30)
    await _wait_online(session)
    start = time.monotonic()
    for i in range(frames):
        await asyncio.sleep(max(0.0, start + i / 30 - time.monotonic()))
        source.put_image(images[i % 30], (frames + i) * CLOCK // 30)
    end = time.monotonic()
    await asyncio.sleep(0.5)
    source.end()
    await asyncio.wait_for(task, 30)
    result: dict[str, Any] = {"seconds": end - start, "frames_in": frames, "ended": session.ended}
    timings = {
        "slow": slow.delivered,
        "fast": [(d.frame.arrived, d.at) for d in fast.delivered if not d.frame.loading],
    }
    for name, delivered in timings.items():
        real = [(a, t) for a, t in delivered if a >= start]
        counts = session.stats.sinks[name]
        first = [t - a for a, t in real if t - start < 5]
        last = [t - a for a, t in real if t - start >= end - start - 5]
        result[name] = {
            "fps": len([1 for _, t in real if t <= end]) / (end - start),
            "sent": counts.sent,
            "dropped": counts.dropped,
            "first5": ms(first),
            "last5": ms(last),
        }
    return result


# -- the service in its own process -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Process:
    """A server in its own process, up once GET /health answers."""

    def __init__(self, command: Sequence[str], port: int) -> None:
        self.command = list(command)
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Process:
        self.proc = subprocess.Popen(self.command)
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(self.base + "/health"):
                        return self
                except aiohttp.ClientConnectionError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(f"{self.command} exited at start") from None
                    await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.command} did not answer in 30 s")

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Service(Process):
    """`python -m live serve` on a free port, for the outside cases (one session at a time)."""

    def __init__(self) -> None:
        port = _free_port()
        super().__init__(
            [sys.executable, "-m", "live", "serve", "--port", str(port), "--log-level", "ERROR"],
            port,
        )

    async def start_session(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.base + "/live-video-to-video", json={"model_id": "noop"}) as r,
        ):
            r.raise_for_status()
            info: dict[str, Any] = await r.json()
            return info

    async def status(self, session_id: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{self.base}/live-video-to-video/{session_id}") as r,
        ):
            if r.status != 200:
                return {}
            found: dict[str, Any] = await r.json()
            return found


async def _view(url: str, received: dict[int, float], audio: list[int] | None = None) -> None:
    """Read the output over HTTP; the time each numbered frame was decoded (and the audio
    packets' pts)."""
    decoder = StreamDecoder()
    async with TrickleSubscriber(url, start_seq=0) as sub:
        async for segment in sub:
            decoder.begin_segment()
            async for chunk in segment:
                now = time.monotonic()
                for item in decoder.feed(chunk):
                    if isinstance(item, VideoFrame):
                        index = read_index(item.image)
                        if index is not None:
                            received.setdefault(index, now)
                    elif audio is not None:
                        audio.append(item.pts)
            decoder.end_segment()


async def publish_paced(publisher: TricklePublisher, clip: Clip, sent: dict[int, float]) -> float:
    """Publish `clip` frame by frame at its presentation times, as a camera does, noting when
    each frame went (`sent`). Returns the seconds it took; the publisher stays open."""
    start = time.monotonic()
    index = 0
    for frames in clip.segments:
        async with publisher.segment() as writer:
            for data in frames:
                due = start + (clip.pts[index] - clip.pts[0]) / CLOCK
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                sent[index] = time.monotonic()
                await writer.write(data)
                index += 1
    return time.monotonic() - start


async def outside(service: Service, clip: Clip) -> dict[str, Any]:
    """Frames published one by one at their presentation times over HTTP."""
    info = await service.start_session()
    sent: dict[int, float] = {}
    received: dict[int, float] = {}
    audio: list[int] = []
    viewer = asyncio.create_task(_view(info["subscribe_url"], received, audio))
    cpu_start = _cpu_seconds(service.pid)
    publisher = TricklePublisher(info["publish_url"])
    elapsed = await publish_paced(publisher, clip, sent)
    cpu = _cpu_seconds(service.pid) - cpu_start
    await asyncio.sleep(0.3)  # the last frames on their way out
    status = await service.status(info.get("session_id", ""))
    await publisher.close()
    await asyncio.wait_for(viewer, 30)
    delays = [received[i] - sent[i] for i in received if i in sent]
    return {
        "frames_sent": len(sent),
        "frames_received": len(received),
        "fps": len(received) / elapsed,
        **ms(delays),
        "first_frame_ms": round((received.get(0, float("nan")) - sent[0]) * 1000, 1),
        "cpu_cores": round(cpu / elapsed, 3),
        "audio_sent": len(clip.audio_pts),
        "audio_received": len(audio),
        "service": {k: status.get(k) for k in ("frames_in", "frames_out", "frames_dropped")},
    }


async def whole_segments(service: Service, clip: Clip) -> dict[str, Any]:
    """Each segment POSTed in one write once its last frame would have been captured."""
    info = await service.start_session()
    received: dict[int, float] = {}
    viewer = asyncio.create_task(_view(info["subscribe_url"], received))
    cpu_start = _cpu_seconds(service.pid)
    publisher = TricklePublisher(info["publish_url"])
    frame_s = 1 / clip.fps
    capture: dict[int, float] = {}
    posted: dict[int, float] = {}
    start = time.monotonic()
    first = 0
    for frames in clip.segments:
        indices = range(first, first + len(frames))
        first += len(frames)
        seg_pts = clip.pts[indices[0]]
        duration = len(frames) * frame_s
        due = start + (seg_pts - clip.pts[0]) / CLOCK + duration
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        post = time.monotonic()
        for i in indices:
            posted[i] = post
            capture[i] = post - duration + (clip.pts[i] - seg_pts) / CLOCK
        await publisher.write(b"".join(frames))
    elapsed = time.monotonic() - start
    cpu = _cpu_seconds(service.pid) - cpu_start
    # The last segment is released over its own duration; then the counts are final.
    status: dict[str, Any] = {}
    for _ in range(30):
        await asyncio.sleep(0.1)
        status = await service.status(info.get("session_id", ""))
        done = status.get("frames_out", 0) + status.get("frames_dropped", 0)
        if status.get("frames_in", 0) >= len(posted) and done >= status.get("frames_in", 0):
            break
    await asyncio.sleep(0.3)
    await publisher.close()
    await asyncio.wait_for(viewer, 30)
    matched = [i for i in received if i in posted]
    return {
        "frames_sent": len(posted),
        "frames_received": len(received),
        "ratio": round(len(received) / len(posted), 3),
        "from_capture": ms([received[i] - capture[i] for i in matched]),
        "from_post": ms([received[i] - posted[i] for i in matched]),
        "cpu_cores": round(cpu / elapsed, 3),
        "service": {k: status.get(k) for k in ("frames_in", "frames_out", "frames_dropped")},
    }


# -- the run -----------------------------------------------------------------------------------


def _window(delays: list[tuple[float, float]], lo: float, hi: float) -> dict[str, float]:
    return ms([d for t, d in delays if lo <= t < hi])


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slow-seconds", type=float, default=20.0)
    parser.add_argument("--outside-seconds", type=float, default=10.0)
    parser.add_argument("--whole-seconds", type=float, default=30.0)
    parser.add_argument("--two-sink-seconds", type=float, default=15.0)
    parser.add_argument("--only", default=",".join(CASES), help="cases to run, comma-separated")
    parser.add_argument("--json", action="store_true", help="all figures as one JSON line")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(CASES):
        parser.error(f"unknown cases {sorted(only - set(CASES))}; known: {', '.join(CASES)}")

    print(
        f"# frame_loop python={platform.python_version()} av={av.__version__} "
        f"cpus={os.cpu_count()} size={args.size} frames={args.frames}",
        flush=True,
    )
    results: dict[str, Any] = {}
    if only & {"raw", "noop"}:
        clip = make_clip(args.frames, width=args.size, height=args.size)
    if "raw" in only:
        results["raw_fps"] = raw = raw_baseline(clip)
        print(f"raw pyav decode+encode        {raw:7.1f} fps", flush=True)
    if "noop" in only:
        results["session"] = noop = await in_process(clip, "noop", realtime=False)
        ratio = f"   ratio {noop['fps'] / results['raw_fps']:.2f}" if "raw" in only else ""
        print(
            f"noop session (in process)     {noop['fps']:7.1f} fps{ratio}   "
            f"dropped {noop['dropped']} (in: {noop['fps_in']:.1f} fps)"
        )
        print(f"noop session delay            p50 {noop['p50_ms']} ms   p95 {noop['p95_ms']} ms")
        noop.pop("delays")

    if "slow" in only:
        slow_clip = make_clip(int(args.slow_seconds * 30), width=args.size, height=args.size)
        slow = await in_process(slow_clip, "slow", realtime=True)
        delays = slow.pop("delays")
        slow["first5"] = first = _window(delays, 0, 5)
        slow["last5"] = last = _window(delays, args.slow_seconds - 5, float("inf"))
        results["slow"] = slow
        print(
            f"slow pipeline (10 fps of 30)  {slow['fps']:6.1f} fps out, dropped {slow['dropped']}"
        )
        print(
            f"slow pipeline delay           first 5 s p50 {first['p50_ms']} ms "
            f"p95 {first['p95_ms']} ms   last 5 s p50 {last['p50_ms']} ms p95 {last['p95_ms']} ms",
            flush=True,
        )

    if "two-sink" in only:
        results["two_sink"] = two = await two_sinks(args.two_sink_seconds, args.size)
        for name, label in (
            ("slow", f"slow (writes +{SLOW_WRITE_S * 1000:.0f} ms)"),
            ("fast", "fast (memory)"),
        ):
            s = two[name]
            print(
                f"two sinks, {label:22} {s['fps']:5.1f} fps out, dropped {s['dropped']:4}   "
                f"delay first 5 s p50 {s['first5']['p50_ms']} p95 {s['first5']['p95_ms']} ms   "
                f"last 5 s p50 {s['last5']['p50_ms']} p95 {s['last5']['p95_ms']} ms",
                flush=True,
            )

    if only & {"outside", "whole"}:
        async with Service() as service:
            if "outside" in only:
                for codec in ("aac", "opus"):
                    out_clip = make_clip(
                        int(args.outside_seconds * 30), width=512, height=512, audio=codec
                    )
                    results[f"outside_{codec}"] = ext = await outside(service, out_clip)
                    print(
                        f"outside {codec:4}, HTTP 512x512 30 fps: {ext['frames_received']}/"
                        f"{ext['frames_sent']} frames   p50 {ext['p50_ms']} ms   "
                        f"p95 {ext['p95_ms']} ms   first frame {ext['first_frame_ms']:.0f} ms   "
                        f"service CPU {ext['cpu_cores']:.2f} cores   "
                        f"audio packets {ext['audio_received']}/{ext['audio_sent']}",
                        flush=True,
                    )
            if "whole" in only:
                whole_clip = make_clip(int(args.whole_seconds * 30), width=512, height=512)
                results["whole"] = whole = await whole_segments(service, whole_clip)
                cap, post = whole["from_capture"], whole["from_post"]
                print(
                    f"whole segments, HTTP 512x512: {whole['frames_received']}/"
                    f"{whole['frames_sent']} frames out/in ({whole['ratio']:.2f})   "
                    f"from capture p50 {cap['p50_ms']} p95 {cap['p95_ms']} ms   "
                    f"from post p50 {post['p50_ms']} p95 {post['p95_ms']} ms   "
                    f"service CPU {whole['cpu_cores']:.2f} cores",
                    flush=True,
                )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
