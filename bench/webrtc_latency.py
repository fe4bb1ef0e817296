"""WebRTC benchmark: glass-to-glass delay through a `noop` session, against a plain aiortc relay.

    python -m bench.webrtc_latency [--seconds 10] [--size 512] [--viewers 1,3]
        [--codec h264|vp8|h264,vp8] [--browser-viewers] [--no-gstreamer] [--json]

An aiortc publisher (a 30 fps camera whose frames carry their index, painted by
`protocol.clips.numbered_frame`) publishes over WHIP and aiortc viewers watch over WHEP, all in
this process, so one clock times both ends: delay = the frame handed to the publisher's encoder
-> the frame decoded by a viewer (its index read back with `read_index`). Cases, for each codec
(forced on every peer with `setCodecPreferences`):

1. direct, for scale: the publisher's peer answers one viewer's peer itself, no server: one
   hop (encode, RTP over loopback, aiortc's receive buffering, decode).
2. relay (the baseline), per viewer count: a helper process (this module, `--relay-helper
   PORT`) with one aiortc peer that receives the publisher and `MediaRelay` tracks that forward
   its decoded frames to each viewer's peer (one encoder per viewer, newest frame only:
   `buffered=False`), no session. Two hops, as the session.
3. session, per viewer count: the real service (`python -m live serve`) in its own process, a
   fresh `noop` session per case, WHIP into it and WHEP out of it. What it adds over the relay:
   the frame loop and its slots (for `noop` no RGB conversion, and no trickle output encode
   while nobody reads the output).

The relay and the service run in processes of their own so that their CPU (from /proc, user +
system seconds / wall seconds over the measured window) compares like with like; "client" is
this process (publisher encode, viewers' decode). fps is the frames sent in the window that the
slowest viewer decoded, / the window; lost counts the others. aiortc's sender pulls the next
frame only once the last one is encoded, so on a saturated machine fewer than 30 fps are sent
(`sent` below 30 x seconds). Every peer gathers host candidates on 127.0.0.1 only, no ICE server.

aiortc's receivers hand a video frame to the decoder only when the next frame's first packet
arrives, one frame interval (33 ms at 30 fps) late, on every hop; browsers end a frame on its
RTP marker bit. `--browser-viewers` makes the viewers here do the same (the servers' receivers
are unchanged), to show what a browser watching would see.

The first second after every viewer decoded its first frame is left out (encoders' first
keyframes, bitrate ramp-up).

4. gst, per codec: the session path again with GStreamer's webrtcbin at both ends
   (examples/gstreamer_webrtc.py under Debian's python3, two subprocesses): the publisher
   pushes frames painted with their index through x264enc or vp8enc, one viewer decodes them
   (no jitter buffer, `--latency 0`) and reads the index back. Each end stamps its frames on
   CLOCK_MONOTONIC, the clock of time.monotonic() here, so the delay is the same measure as
   the aiortc cases': handed to the encoder -> decoded. Its ratio is against the aiortc
   session case with the first viewer count (aiortc's viewers end frames one frame late
   unless `--browser-viewers`; GStreamer's end them on the marker bit). "client" CPU is the
   two GStreamer processes. Left out when /usr/bin/python3 has no GStreamer webrtcbin, or
   with `--no-gstreamer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import aiortc
import av
from aiohttp import web
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpCodecCapability,
    RTCRtpSender,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError

from bench.frame_loop import Process, _cpu_seconds, _free_port, ms
from live.webrtc import restrict_host_addresses
from protocol.clips import BITS, numbered_frame, read_index

FPS = 30
WARMUP_S = 1.0
FIRST_FRAME_TIMEOUT_S = 30.0
TAIL_S = 1.0  # after the window, for frames still on their way to the viewers
MIME = {"h264": "video/H264", "vp8": "video/VP8"}


def loopback_peer() -> RTCPeerConnection:
    # An empty list, not None: aiortc's default would contact a public STUN server.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def codec_preferences(codec: str) -> list[RTCRtpCodecCapability]:
    """The codec's entries (every H.264 profile aiortc has) and RTX, so that retransmission
    stays on as it is by default."""
    wanted = (MIME[codec], "video/rtx")
    return [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType in wanted]


def frame_on_marker() -> None:
    """Make this process's video receivers end a frame on its RTP marker bit, as browsers do.

    aiortc's jitter buffer hands a frame to the decoder only once the next frame's first
    packet arrives, i.e. one frame interval (33 ms at 30 fps) after its last packet; a browser
    viewer does not wait. For `--browser-viewers`: patches aiortc's private `JitterBuffer`
    for the whole process (the viewers here; the servers' receivers are left as they are)."""
    from aiortc import jitterbuffer

    aiortc_remove_frame = jitterbuffer.JitterBuffer._remove_frame

    def remove_frame(
        self: jitterbuffer.JitterBuffer, sequence_number: int
    ) -> jitterbuffer.JitterFrame | None:
        if not self._is_video:
            return aiortc_remove_frame(self, sequence_number)
        packets: list[Any] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:
                return None  # a gap: the frame is not complete yet
            ends = packet.marker
            if packets and packet.timestamp != packets[0].timestamp:
                ends, count = True, count - 1  # a frame whose marker packet was lost
            else:
                packets.append(packet)
            if ends:
                self.remove(count + 1)
                data = b"".join(p._data for p in packets)
                return jitterbuffer.JitterFrame(data=data, timestamp=packets[0].timestamp)
        return None

    jitterbuffer.JitterBuffer._remove_frame = remove_frame  # type: ignore[method-assign]


# -- the ends in this process ------------------------------------------------------------------


class PaintedCamera(VideoStreamTrack):
    """A 30 fps camera whose frames carry their index; `sent[i]` is when frame i was handed to
    the encoder."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.sent: dict[int, float] = {}
        # Painting takes a few ms of numpy: off the event loop, so the viewers' decode times
        # are stamped when their frames arrive, not after a painting.
        self._painter = ThreadPoolExecutor(1, thread_name_prefix="paint")

    def _paint(self, index: int) -> av.VideoFrame:
        image = numbered_frame(index, self.size, self.size)
        return av.VideoFrame.from_ndarray(image, format="rgb24")

    async def recv(self) -> av.VideoFrame:
        index = len(self.sent)
        if index >= 1 << BITS:
            raise MediaStreamError  # the painted index would wrap
        # Painted before the pacing wait: the send time is the frame's due time, not the due
        # time plus the painting.
        frame = await asyncio.get_running_loop().run_in_executor(self._painter, self._paint, index)
        frame.pts, frame.time_base = await self.next_timestamp()
        self.sent[index] = time.monotonic()
        return frame

    def stop(self) -> None:
        super().stop()
        self._painter.shutdown(wait=False)


class Viewer:
    """A WHEP viewer: when each painted index was decoded (its first copy)."""

    def __init__(self, codec: str) -> None:
        self.pc = loopback_peer()
        self.pc.addTransceiver("video", direction="recvonly").setCodecPreferences(
            codec_preferences(codec)
        )
        self.decoded: dict[int, float] = {}
        self.first = asyncio.Event()
        self.location: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.pc.on(
            "track", lambda track: self._tasks.append(asyncio.create_task(self._read(track)))
        )

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()  # before the RGB conversion: the decode is done
                index = read_index(frame.to_ndarray(format="rgb24"))
                if index is not None:
                    self.decoded.setdefault(index, now)
                    self.first.set()

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def negotiate(pc: RTCPeerConnection, url: str) -> str:
    """WHIP/WHEP: POST the offer, apply the answer; returns the resource's absolute URL."""
    await pc.setLocalDescription(await pc.createOffer())
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            url, data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        ) as response,
    ):
        body = await response.text()
        if response.status != 201:
            raise RuntimeError(f"POST {url}: {response.status} {body}")
        location = urljoin(url, response.headers["Location"])  # the service answers a path
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return location


async def delete(url: str) -> None:
    with contextlib.suppress(aiohttp.ClientError):
        async with aiohttp.ClientSession() as http, http.delete(url):
            pass


# -- the processes -----------------------------------------------------------------------------


def service_process() -> Process:
    port = _free_port()
    command = [sys.executable, "-m", "live", "serve", "--port", str(port)]
    return Process([*command, "--ice-host-addresses", "127.0.0.1", "--log-level", "WARNING"], port)


def relay_process() -> Process:
    port = _free_port()
    return Process(
        [sys.executable, "-m", "bench.webrtc_latency", "--relay-helper", str(port)], port
    )


@dataclass
class Target:
    """Where a case publishes and watches, and how it is taken down."""

    whip_url: str
    whep_url: str
    status: Callable[[], Awaitable[dict[str, Any]]]
    end: Callable[[], Awaitable[None]]


async def open_session(service: Process, model: str = "noop") -> Target:
    """A session of `model` on `service`; no size asked, so the output has the camera's, as
    from a browser."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(service.base + "/live-video-to-video", json={"model_id": model}) as response,
    ):
        if response.status >= 300:
            raise RuntimeError(f"session start: {response.status} {await response.text()}")
        info = await response.json()
    url = f"{service.base}/live-video-to-video/{info['session_id']}"

    async def status() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            found: dict[str, Any] = await response.json() if response.status == 200 else {}
            return found

    return Target(info["whip_url"], info["whep_url"], status, lambda: delete(url))


async def open_relay(relay: Process) -> Target:
    async def status() -> dict[str, Any]:
        return {}

    return Target(relay.base + "/whip", relay.base + "/whep", status, lambda: delete(relay.base))


# -- one case ----------------------------------------------------------------------------------


@dataclass
class Case:
    codec: str
    size: int
    viewers: int
    seconds: float


async def connect_direct(publisher: RTCPeerConnection, viewer: Viewer) -> None:
    """The publisher answers the viewer's offer itself: one aiortc hop, no server."""
    await viewer.pc.setLocalDescription(await viewer.pc.createOffer())
    await publisher.setRemoteDescription(viewer.pc.localDescription)
    await publisher.setLocalDescription(await publisher.createAnswer())
    await viewer.pc.setRemoteDescription(publisher.localDescription)


async def run_case(case: Case, process: Process | None, target: Target | None) -> dict[str, Any]:
    """One publisher and `case.viewers` viewers through `target` (served by `process`), or
    straight from the publisher to one viewer without them."""
    publisher = loopback_peer()
    camera = PaintedCamera(case.size)
    viewers = [Viewer(case.codec) for _ in range(case.viewers)]
    locations: list[str] = []
    pids = [os.getpid()] if process is None else [os.getpid(), process.pid]
    try:
        if target is None:
            # Answering: the codec is the one the viewer offered alone.
            publisher.addTrack(camera)
            await connect_direct(publisher, viewers[0])
        else:
            publisher.addTransceiver(camera, direction="sendonly").setCodecPreferences(
                codec_preferences(case.codec)
            )
            locations.append(await negotiate(publisher, target.whip_url))
            for viewer in viewers:
                locations.append(await negotiate(viewer.pc, target.whep_url))
        async with asyncio.timeout(FIRST_FRAME_TIMEOUT_S):
            await asyncio.gather(*(viewer.first.wait() for viewer in viewers))
        await asyncio.sleep(WARMUP_S)
        before = await target.status() if target else {}
        cpu = [_cpu_seconds(pid) for pid in pids]
        start = time.monotonic()
        await asyncio.sleep(case.seconds)
        end = time.monotonic()
        cpu = [_cpu_seconds(pid) - used for pid, used in zip(pids, cpu, strict=True)]
        after = await target.status() if target else {}
        await asyncio.sleep(TAIL_S)
    finally:
        for location in locations:
            await delete(location)
        for viewer in viewers:
            await viewer.close()
        await publisher.close()
        camera.stop()
        if target is not None:
            await target.end()
    window = [i for i, t in camera.sent.items() if start <= t < end]
    delays: list[float] = []
    per_viewer: list[dict[str, Any]] = []
    for viewer in viewers:
        mine = [viewer.decoded[i] - camera.sent[i] for i in window if i in viewer.decoded]
        delays += mine
        per_viewer.append({**ms(mine), "fps": round(len(mine) / (end - start), 2)})
    slowest = min(per_viewer, key=lambda v: v["frames"])
    result: dict[str, Any] = {
        **ms(delays),
        "fps": slowest["fps"],
        "sent": len(window),
        "lost": len(window) - slowest["frames"],
        "client_cpu_cores": round(cpu[0] / (end - start), 3),
        "cpu_cores": round(cpu[1] / (end - start), 3) if len(cpu) > 1 else None,
        "viewers": per_viewer,
    }
    if before and after:
        result["service"] = {
            k: after.get(k, 0) - before.get(k, 0)
            for k in ("frames_in", "frames_out", "frames_dropped")
        }
    return result


# -- the GStreamer client (webrtcbin, another WebRTC stack) ------------------------------------

GST_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gstreamer_webrtc.py"
GST_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gi (the venv has no PyGObject)


def gstreamer_missing() -> str | None:
    """Why the GStreamer client cannot run here, or None."""
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0');"
        "from gi.repository import Gst; Gst.init(None);"
        "raise SystemExit(0 if Gst.ElementFactory.find('webrtcbin') else 3)"
    )
    try:
        done = subprocess.run([GST_PYTHON, "-c", probe], capture_output=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"{GST_PYTHON}: {exc}"
    return None if done.returncode == 0 else "no PyGObject with GStreamer's webrtcbin"


class GstClient:
    """examples/gstreamer_webrtc.py in a subprocess: when each painted index was sent (publish)
    or first decoded (watch, `--read-index`), on CLOCK_MONOTONIC, which is time.monotonic()
    here too."""

    def __init__(self, *args: str) -> None:
        self.args = [GST_PYTHON, str(GST_SCRIPT), *args, "--ice-address", "127.0.0.1"]
        self.times: dict[int, float] = {}
        self.connected = asyncio.Event()
        self.first = asyncio.Event()
        self.ended = asyncio.Event()
        self.error: str | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        try:
            async for line in self.process.stdout:
                event = json.loads(line)
                kind = event["event"]
                if kind in ("sent", "frame") and event["index"] is not None:
                    self.times.setdefault(event["index"], event["at"])
                    self.first.set()
                elif kind == "connected":
                    self.connected.set()
                elif kind == "error":
                    self.error = event["detail"]
        finally:
            self.ended.set()

    async def until(self, event: asyncio.Event) -> None:
        """`event`, or the client's own error if it ends first."""
        ended = asyncio.ensure_future(self.ended.wait())
        waiting = asyncio.ensure_future(event.wait())
        try:
            async with asyncio.timeout(FIRST_FRAME_TIMEOUT_S):
                await asyncio.wait((ended, waiting), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            waiting.cancel()
        if not event.is_set():
            raise RuntimeError(f"{' '.join(self.args[2:4])}: {self.error or 'ended early'}")

    async def stop(self) -> None:
        """Ctrl-C (the script leaves with DELETE), then wait for it."""
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await self._reader


async def run_gstreamer_case(case: Case, service: Process) -> dict[str, Any]:
    """A GStreamer publisher (frames painted with their index, pushed at 30 fps) into a fresh
    `noop` session, one GStreamer viewer out of it; both are subprocesses of this one."""
    target = await open_session(service)
    lasts = FIRST_FRAME_TIMEOUT_S + WARMUP_S + case.seconds + TAIL_S + 10
    common = ("--codec", case.codec, "--seconds", str(lasts))
    publisher = GstClient(
        "publish", target.whip_url, *common, "--source", "numbered", "--size", str(case.size)
    )
    # No jitter buffer (GStreamer's default holds 200 ms): frames go to the decoder as
    # their last packet arrives, as a browser's would on a clean loopback.
    viewer = GstClient("watch", target.whep_url, *common, "--read-index", "--latency", "0")
    try:
        await publisher.start()
        await publisher.until(publisher.connected)
        await viewer.start()
        await viewer.until(viewer.first)
        await asyncio.sleep(WARMUP_S)
        pids = [publisher.pid, viewer.pid, service.pid]
        before = await target.status()
        cpu = [_cpu_seconds(pid) for pid in pids]
        start = time.monotonic()
        await asyncio.sleep(case.seconds)
        end = time.monotonic()
        cpu = [_cpu_seconds(pid) - used for pid, used in zip(pids, cpu, strict=True)]
        after = await target.status()
        await asyncio.sleep(TAIL_S)
    finally:
        await viewer.stop()
        await publisher.stop()
        await target.end()
    window = [i for i, t in publisher.times.items() if start <= t < end]
    delays = [viewer.times[i] - publisher.times[i] for i in window if i in viewer.times]
    result: dict[str, Any] = {
        **ms(delays),
        "fps": round(len(delays) / (end - start), 2),
        "sent": len(window),
        "lost": len(window) - len(delays),
        "client_cpu_cores": round((cpu[0] + cpu[1]) / (end - start), 3),
        "cpu_cores": round(cpu[2] / (end - start), 3),
    }
    if before and after:
        result["service"] = {
            k: after.get(k, 0) - before.get(k, 0)
            for k in ("frames_in", "frames_out", "frames_dropped")
        }
    return result


# -- the relay helper (its own process) ------------------------------------------------------


def relay_app() -> web.Application:
    """WHIP in, WHEP out, one publisher at a time, through `MediaRelay`; DELETE / ends all."""
    relay = MediaRelay()
    peers: dict[str, RTCPeerConnection] = {}
    source: list[MediaStreamTrack] = []  # the publisher's video track, once it came

    async def answer(request: web.Request, pc: RTCPeerConnection) -> web.Response:
        peer_id = secrets.token_hex(8)
        peers[peer_id] = pc
        await pc.setRemoteDescription(RTCSessionDescription(await request.text(), "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            text=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/peer/{peer_id}"},
        )

    async def whip(request: web.Request) -> web.Response:
        pc = loopback_peer()
        pc.on("track", lambda track: source.append(track) if track.kind == "video" else None)
        return await answer(request, pc)

    async def whep(request: web.Request) -> web.Response:
        if not source:
            return web.Response(status=409, text="no publisher yet")
        pc = loopback_peer()
        # Newest frame only, as a session's viewer slot: a slow encoder drops, never queues.
        pc.addTrack(relay.subscribe(source[-1], buffered=False))
        return await answer(request, pc)

    async def leave(request: web.Request) -> web.Response:
        pc = peers.pop(request.match_info["peer_id"], None)
        if pc is None:
            return web.Response(status=404)
        await pc.close()
        return web.Response()

    async def reset(request: web.Request) -> web.Response:
        for pc in list(peers.values()):
            await pc.close()
        peers.clear()
        source.clear()
        return web.Response()

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/whip", whip)
    app.router.add_post("/whep", whep)
    app.router.add_delete("/peer/{peer_id}", leave)
    app.router.add_delete("/", reset)
    app.router.add_get("/health", health)
    return app


def serve_relay(port: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    restrict_host_addresses(["127.0.0.1"])
    web.run_app(relay_app(), host="127.0.0.1", port=port, print=None)


# -- the run -----------------------------------------------------------------------------------


def _line(
    codec: str,
    name: str,
    viewers: int,
    r: dict[str, Any],
    base: dict[str, Any],
    against: str = "relay",
) -> str:
    server = "" if r["cpu_cores"] is None else f"server CPU {r['cpu_cores']:.2f} cores  "
    ratio = ""
    if base is not r:
        ratio = (
            f"  vs {against}: p50 x{r['p50_ms'] / base['p50_ms']:.2f}, "
            f"CPU x{r['cpu_cores'] / base['cpu_cores']:.2f}"
        )
    if "service" in r:
        ratio += f"  session dropped {r['service']['frames_dropped']}"
    return (
        f"{codec:4} {name:7} {viewers} viewer{'s' if viewers > 1 else ' '}  "
        f"p50 {r['p50_ms']:6.1f} ms  p95 {r['p95_ms']:6.1f} ms  {r['fps']:5.1f} fps  "
        f"lost {r['lost']:3}/{r['sent']}  {server}client {r['client_cpu_cores']:.2f}{ratio}"
    )


async def main(args: argparse.Namespace) -> None:
    restrict_host_addresses(["127.0.0.1"])
    if args.browser_viewers:
        frame_on_marker()
    codecs = args.codec.split(",")
    counts = [int(n) for n in args.viewers.split(",")]
    print(
        f"# webrtc_latency python={platform.python_version()} aiortc={aiortc.__version__} "
        f"av={av.__version__} cpus={os.cpu_count()} size={args.size} seconds={args.seconds} "
        f"fps={FPS} codecs={','.join(codecs)} viewers={args.viewers} "
        f"viewer_framing={'marker' if args.browser_viewers else 'aiortc'}",
        flush=True,
    )
    gstreamer = None if args.no_gstreamer else gstreamer_missing()
    if args.no_gstreamer:
        gstreamer = "--no-gstreamer"
    elif gstreamer is not None:
        print(f"# GStreamer client left out: {gstreamer}", flush=True)
    results: dict[str, Any] = {}
    async with service_process() as service, relay_process() as relay:
        for codec in codecs:
            # One hop, for scale: the relay and the session are two (publisher -> server ->
            # viewer), each paying an encode, a decode and aiortc's receive buffering.
            direct = await run_case(Case(codec, args.size, 1, args.seconds), None, None)
            print(_line(codec, "direct", 1, direct, direct), flush=True)
            results[codec] = {"direct": direct}
            for viewers in counts:
                # Relay then session, back to back, so that load from others on the machine
                # weighs on both alike.
                case = Case(codec, args.size, viewers, args.seconds)
                base = await run_case(case, relay, await open_relay(relay))
                print(_line(codec, "relay", viewers, base, base), flush=True)
                session = await run_case(case, service, await open_session(service))
                print(_line(codec, "session", viewers, session, base), flush=True)
                results[codec][f"viewers_{viewers}"] = {"relay": base, "session": session}
            if gstreamer is None:
                # The same session path with GStreamer's webrtcbin at both ends (publisher
                # and one viewer), beside the aiortc clients' figure above.
                case = Case(codec, args.size, 1, args.seconds)
                gst = await run_gstreamer_case(case, service)
                aiortc_session = results[codec][f"viewers_{counts[0]}"]["session"]
                print(_line(codec, "gst", 1, gst, aiortc_session, "aiortc session"), flush=True)
                results[codec]["gstreamer"] = gst
    if args.json:
        print(json.dumps(results))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per case")
    parser.add_argument("--size", type=int, default=512, help="frame width and height")
    parser.add_argument("--viewers", default="1,3", help="viewer counts, comma-separated")
    parser.add_argument("--codec", default="h264", help="h264, vp8, or both comma-separated")
    parser.add_argument(
        "--browser-viewers",
        action="store_true",
        help="viewers end each frame on its RTP marker bit, as browsers do, not one frame later "
        "as aiortc does (the servers' receivers are unchanged)",
    )
    parser.add_argument(
        "--no-gstreamer",
        action="store_true",
        help="leave out the GStreamer client case (examples/gstreamer_webrtc.py)",
    )
    parser.add_argument("--json", action="store_true", help="all figures as one JSON line")
    parser.add_argument("--relay-helper", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if unknown := set(args.codec.split(",")) - set(MIME):
        parser.error(f"unknown codecs {sorted(unknown)}; known: {', '.join(MIME)}")
    if not all(n.strip().isdigit() and int(n) > 0 for n in args.viewers.split(",")):
        parser.error("--viewers takes positive counts, comma-separated")
    # The index painted in 12 bits must not wrap within a case (first frame, warm-up, window).
    if (args.seconds + WARMUP_S + TAIL_S + 10) * FPS >= 1 << BITS:
        parser.error(f"--seconds must stay under {(1 << BITS) // FPS - WARMUP_S - TAIL_S - 10:.0f}")
    if args.size // BITS < 6:
        parser.error(f"--size must be at least {6 * BITS} to carry the painted index")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.relay_helper:
        serve_relay(arguments.relay_helper)
    else:
        asyncio.run(main(arguments))
