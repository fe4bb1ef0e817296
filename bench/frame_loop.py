"""Frame-loop benchmark: the cost of a live session against raw PyAV, and its delay.

    python -m bench.frame_loop [--frames 300] [--size 512] [--slow-seconds 60] [--json]

1. raw: the clip decoded and re-encoded by PyAV in one loop (FFmpeg demuxer, libx264 with the
   session's settings), the baseline;
2. session: a `noop` LiveSession over in-process trickle channels, the clip published as fast as
   the session takes it (one segment in flight), fps and ingest-to-output delay per frame;
3. slow: a pipeline at 10 fps fed 30 fps in real time; delay at the start and at the end;
4. outside: the real service in its own process, a 30 fps clip published over HTTP trickle in real
   time and read back over HTTP; frames matched by their painted index; delay, first frame, CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
import av
import numpy as np

from live.pipelines.passthrough import NoopPipeline
from live.session import LiveSession, SessionChannels, SessionConfig
from protocol.clips import Clip, make_clip, read_index
from protocol.media import StreamDecoder
from protocol.trickle import (
    LocalPublisher,
    LocalSubscriber,
    TricklePublisher,
    TrickleServer,
    TrickleSubscriber,
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


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


class SlowPipeline(NoopPipeline):
    name = "slow"

    def process(self, image: np.ndarray) -> np.ndarray:
        time.sleep(0.1)
        return image


async def in_process(clip: Clip, pipeline_cls: type, realtime: bool) -> dict[str, object]:
    server = TrickleServer()
    for name in ("in", "out", "ev"):
        server.create_channel(name)
    session = LiveSession(
        "bench",
        pipeline_cls,
        pipeline_cls.parse_params({}),
        SessionChannels(
            input=LocalSubscriber(server, "in"),
            output=LocalPublisher(server, "out"),
            events=LocalPublisher(server, "ev"),
        ),
        SessionConfig(status_interval_s=3600),
    )
    delays: list[tuple[float, float]] = []  # (time into the run, delay of the frame)
    task = session.start()
    publisher = LocalPublisher(server, "in")
    while session.state != "ONLINE":
        await asyncio.sleep(0.01)
    start = time.monotonic()
    seen = 0
    index = 0
    for frames in clip.segments:
        async with publisher.segment() as writer:
            for data in frames:
                if realtime:
                    due = start + (clip.pts[index] - clip.pts[0]) / 90_000
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                await writer.write(data)
                index += 1
                if not realtime:
                    # As fast as the session takes frames: the next one goes in once this
                    # one is decoded and the frame before it has left the slot.
                    while session.frames_in < index or (
                        session.frames_in - session.frames_out - session.frames_dropped > 2
                    ):
                        await asyncio.sleep(0.0002)
                # The session keeps the last 300 delays; sample the newest as frames leave.
                if session.frames_out > seen and session.latencies:
                    delays.append((time.monotonic() - start, session.latencies[-1]))
                    seen = session.frames_out
    # Let the last frames out before the input ends (a closed channel drops what it holds).
    for _ in range(2000):
        if session.frames_out + session.frames_dropped >= session.frames_in:
            break
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - start
    await publisher.close()
    await task
    values = [d for _, d in delays] or list(session.latencies)
    return {
        "fps": session.frames_out / elapsed,
        "frames_out": session.frames_out,
        "dropped": session.frames_dropped,
        "p50_ms": pct(values, 0.5) * 1000,
        "p95_ms": pct(values, 0.95) * 1000,
        "delays": delays,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def outside(clip: Clip) -> dict[str, float]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "live", "serve", "--port", str(port), "--log-level", "WARNING"]
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(base + "/health"):
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            async with http.post(base + "/live-video-to-video", json={"model_id": "noop"}) as r:
                info = await r.json()
        sent: dict[int, float] = {}
        received: dict[int, float] = {}

        async def view() -> None:
            decoder = StreamDecoder()
            async with TrickleSubscriber(info["subscribe_url"], start_seq=0) as sub:
                async for segment in sub:
                    decoder.begin_segment()
                    async for chunk in segment:
                        now = time.monotonic()
                        for item in decoder.feed(chunk):
                            index = read_index(item.image)  # type: ignore[union-attr]
                            if index is not None:
                                received.setdefault(index, now)
                    decoder.end_segment()

        viewer = asyncio.create_task(view())
        cpu_start = _cpu_seconds(proc.pid)
        publisher = TricklePublisher(info["publish_url"])
        start = time.monotonic()
        index = 0
        for frames in clip.segments:
            async with publisher.segment() as writer:
                for data in frames:
                    due = start + (clip.pts[index] - clip.pts[0]) / 90_000
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    sent[index] = time.monotonic()
                    await writer.write(data)
                    index += 1
        elapsed = time.monotonic() - start
        cpu = _cpu_seconds(proc.pid) - cpu_start
        await publisher.close()
        await asyncio.wait_for(viewer, 30)
        delays = [received[i] - sent[i] for i in received if i in sent]
        return {
            "frames_sent": len(sent),
            "frames_received": len(received),
            "fps": len(received) / elapsed,
            "p50_ms": pct(delays, 0.5) * 1000,
            "p95_ms": pct(delays, 0.95) * 1000,
            "first_frame_ms": (received.get(0, float("nan")) - sent[0]) * 1000,
            "cpu_cores": cpu / elapsed,
        }
    finally:
        proc.terminate()
        proc.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slow-seconds", type=float, default=60.0)
    parser.add_argument("--outside-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    print(
        f"# frame_loop python={platform.python_version()} av={av.__version__} "
        f"cpus={os.cpu_count()} size={args.size} frames={args.frames}"
    )
    clip = make_clip(args.frames, width=args.size, height=args.size)
    raw = raw_baseline(clip)
    session = await in_process(clip, NoopPipeline, realtime=False)
    print(f"raw pyav decode+encode      {raw:7.1f} fps")
    print(
        f"noop session (in process)   {session['fps']:7.1f} fps   ratio {session['fps'] / raw:.2f}"
        f"   dropped {session['dropped']}"
    )
    print(
        f"noop session delay          p50 {session['p50_ms']:.1f} ms   "
        f"p95 {session['p95_ms']:.1f} ms"
    )

    slow_clip = make_clip(int(args.slow_seconds * 30), width=args.size, height=args.size)
    slow = await in_process(slow_clip, SlowPipeline, realtime=True)
    delays = slow["delays"]
    assert isinstance(delays, list)
    early = [d for t, d in delays if t < 5]
    late = [d for t, d in delays if t > args.slow_seconds - 5]
    print(f"slow pipeline (10 fps of 30) {slow['fps']:6.1f} fps out, dropped {slow['dropped']}")
    print(
        f"slow pipeline delay          first 5 s p50 {statistics.median(early) * 1000:.1f} ms"
        f"   last 5 s p50 {statistics.median(late) * 1000:.1f} ms"
    )

    out_clip = make_clip(int(args.outside_seconds * 30), width=512, height=512)
    ext = await outside(out_clip)
    print(
        f"outside, HTTP trickle 512x512 30 fps: {ext['frames_received']}/{ext['frames_sent']} "
        f"frames, {ext['fps']:.1f} fps"
    )
    print(
        f"outside delay                p50 {ext['p50_ms']:.1f} ms   p95 {ext['p95_ms']:.1f} ms"
        f"   first frame {ext['first_frame_ms']:.0f} ms   service CPU {ext['cpu_cores']:.2f} cores"
    )
    if args.json:
        session.pop("delays")
        slow.pop("delays")
        print(json.dumps({"raw_fps": raw, "session": session, "slow": slow, "outside": ext}))


if __name__ == "__main__":
    asyncio.run(main())
