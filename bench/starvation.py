"""Starvation benchmark: glass-to-glass delay of a WHIP-in/WHEP-out `cartoon` session on a quiet
machine and on one saturated by other work, alternating in one run.

    python -m bench.starvation [--hogs 2] [--rounds 2] [--seconds 10] [--codec vp8]
        [--width 640] [--height 480] [--model cartoon] [--no-floor] [--json]

An aiortc publisher (a 30 fps camera whose frames carry their index, as in
`bench.webrtc_latency`) publishes over WHIP into a fresh session of the real service
(`python -m live serve`, its own process) and one aiortc viewer in this process watches over
WHEP; delay = the frame handed to the publisher's encoder -> the frame decoded by the viewer
(one clock for both ends). The viewer ends frames on their RTP marker bit, as a browser does.

Each round runs a quiet phase, then a saturated one: `--hogs` busy-loop processes (same nice
level as the service, started and stopped here) run from before the warm-up to the end of the
window. Before each session phase, under the same load, the floor: the publisher's peer answers
the viewer's itself (no server, no model), i.e. what the client alone costs; the session's
line says how far above it the session is. Frames that the service or the client is too
starved to carry are dropped somewhere (fps falls); the product rule is that delay must not
grow instead. Printed per phase: fps decoded by the viewer, p50/p90/max delay, frames sent in
the window (aiortc's sender takes a frame only once the last is encoded, so a starved
publisher sends fewer than 30 fps) and lost, the session's counters (in, out, dropped) and CPU,
and the machine's load average, since other users' work weighs on every phase (quiet is only
as quiet as the machine is).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiortc
import av
import numpy as np

from bench.frame_loop import Process, _cpu_seconds, pct
from bench.webrtc_latency import (
    FIRST_FRAME_TIMEOUT_S,
    TAIL_S,
    PaintedCamera,
    Viewer,
    codec_preferences,
    connect_direct,
    delete,
    frame_on_marker,
    loopback_peer,
    negotiate,
    open_session,
    service_process,
)
from live.webrtc import restrict_host_addresses
from protocol.clips import BITS, numbered_frame

WARMUP_S = 3.0  # hogs running and the stream settled before the window opens
HOG = "while True: pass"


class WideCamera(PaintedCamera):
    """`PaintedCamera` at any width and height (a webcam's 640x480 by default)."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__(width)
        self.height = height

    def _paint(self, index: int) -> av.VideoFrame:
        image = numbered_frame(index, self.size, self.height)
        return av.VideoFrame.from_ndarray(image, format="rgb24")


class Hogs:
    """`count` busy-loop processes, each a core's worth of demand, at this process's nice level."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(self.count)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)
        self.procs = []


async def run_phase(
    args: argparse.Namespace, service: Process | None, hogs: Hogs | None
) -> dict[str, Any]:
    """One phase through a fresh session of `service`, or, with no service, the floor: the
    publisher's peer answers the viewer's itself (one aiortc hop, no server, no model), what
    this process alone costs under the same load."""
    target = await open_session(service, args.model) if service is not None else None
    publisher = loopback_peer()
    camera = WideCamera(args.width, args.height)
    viewer = Viewer(args.codec)
    locations: list[str] = []
    try:
        if target is None:
            publisher.addTrack(camera)  # answering: the codec is the one the viewer offered
            await connect_direct(publisher, viewer)
        else:
            publisher.addTransceiver(camera, direction="sendonly").setCodecPreferences(
                codec_preferences(args.codec)
            )
            locations.append(await negotiate(publisher, target.whip_url))
            locations.append(await negotiate(viewer.pc, target.whep_url))
        async with asyncio.timeout(FIRST_FRAME_TIMEOUT_S):
            await viewer.first.wait()
        if hogs is not None:
            hogs.start()
        await asyncio.sleep(WARMUP_S)
        before = await target.status() if target else {}
        cpu = _cpu_seconds(service.pid) if service else 0.0
        load = os.getloadavg()[0]
        start = time.monotonic()
        await asyncio.sleep(args.seconds)
        end = time.monotonic()
        cpu = _cpu_seconds(service.pid) - cpu if service else 0.0
        after = await target.status() if target else {}
        await asyncio.sleep(TAIL_S)
        load = max(load, os.getloadavg()[0])
    finally:
        if hogs is not None:
            hogs.stop()
        for location in locations:
            await delete(location)
        await viewer.close()
        await publisher.close()
        camera.stop()
        if target is not None:
            await target.end()
    window = [i for i, t in camera.sent.items() if start <= t < end]
    delays = [viewer.decoded[i] - camera.sent[i] for i in window if i in viewer.decoded]
    counters = {k: after.get(k, 0) - before.get(k, 0) for k in ("frames_in", "frames_out")}
    counters["dropped"] = after.get("frames_dropped", 0) - before.get("frames_dropped", 0)
    return {
        "phase": "saturated" if hogs is not None else "quiet",
        "case": "session" if service is not None else "floor",
        "fps": round(len(delays) / (end - start), 1),
        "p50_ms": round(pct(delays, 0.5) * 1000, 1),
        "p90_ms": round(pct(delays, 0.9) * 1000, 1),
        "max_ms": round(max(delays, default=float("nan")) * 1000, 1),
        "sent": len(window),
        "lost": len(window) - len(delays),
        "service": counters if service is not None else None,
        "service_cpu_cores": round(cpu / (end - start), 2) if service is not None else None,
        "load1": round(load, 2),
        "stages": after.get("stages", {}),
    }


def _line(r: dict[str, Any], floor: dict[str, Any] | None) -> str:
    line = (
        f"{r['phase']:9} {r['case']:7}  {r['fps']:5.1f} fps  p50 {r['p50_ms']:6.1f} ms  "
        f"p90 {r['p90_ms']:6.1f} ms  max {r['max_ms']:7.1f} ms  "
        f"sent {r['sent']:3} lost {r['lost']:3}  load1 {r['load1']:5.2f}"
    )
    if r["service"] is not None:
        s = r["service"]
        line += (
            f"  service in {s['frames_in']} out {s['frames_out']} dropped {s['dropped']} "
            f"cpu {r['service_cpu_cores']:.2f}"
        )
    if floor is not None:
        line += f"  p50 vs floor +{r['p50_ms'] - floor['p50_ms']:.1f} ms"
    return line


async def main(args: argparse.Namespace) -> None:
    restrict_host_addresses(["127.0.0.1"])
    frame_on_marker()  # the viewer frames as a browser does
    print(
        f"# starvation python={platform.python_version()} aiortc={aiortc.__version__} "
        f"av={av.__version__} numpy={np.__version__} cpus={os.cpu_count()} "
        f"model={args.model} size={args.width}x{args.height} codec={args.codec} "
        f"hogs={args.hogs} seconds={args.seconds} rounds={args.rounds} "
        f"nice={os.nice(0)} load1_at_start={os.getloadavg()[0]:.2f}",
        flush=True,
    )
    hogs = Hogs(args.hogs)
    results: list[dict[str, Any]] = []
    async with service_process() as service:
        for _ in range(args.rounds):
            for saturated in (False, True):
                # The floor right before the session, so that other load weighs on both alike.
                floor = None
                if not args.no_floor:
                    floor = await run_phase(args, None, hogs if saturated else None)
                    print(_line(floor, None), flush=True)
                    results.append(floor)
                result = await run_phase(args, service, hogs if saturated else None)
                print(_line(result, floor), flush=True)
                results.append(result)
    for phase in ("quiet", "saturated"):
        for case in ("floor", "session"):
            mine = [r for r in results if r["phase"] == phase and r["case"] == case]
            if mine:
                print(
                    f"# {phase:9} {case:7} median of rounds: "
                    f"{np.median([r['fps'] for r in mine]):.1f} fps, "
                    f"p50 {np.median([r['p50_ms'] for r in mine]):.1f} ms, "
                    f"max {max(r['max_ms'] for r in mine):.1f} ms",
                    flush=True,
                )
    if args.json:
        print(json.dumps(results))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hogs", type=int, default=2, help="busy-loop processes when saturated")
    parser.add_argument("--rounds", type=int, default=2, help="quiet + saturated pairs")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per phase")
    parser.add_argument("--codec", default="vp8", choices=("vp8", "h264"))
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--model", default="cartoon", help="the session's pipeline")
    parser.add_argument(
        "--no-floor", action="store_true", help="skip the no-server floor before each phase"
    )
    parser.add_argument("--json", action="store_true", help="all phases as one JSON line")
    args = parser.parse_args(argv)
    if args.hogs < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--hogs and --rounds must be at least 1, --seconds positive")
    if (args.seconds + WARMUP_S + TAIL_S + FIRST_FRAME_TIMEOUT_S) * 30 >= 1 << BITS:
        parser.error("--seconds is too long for the painted index")
    if args.width // BITS < 6 or args.height < 32:
        parser.error(f"--width must be at least {6 * BITS}, --height at least 32")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
