"""Soak: N concurrent `noop` sessions at 30 fps for a set time, over real HTTP.

    python -m bench.soak [--sessions 2] [--seconds 30] [--size 256] [--json]

The service runs in its own process (`python -m live serve`, as `bench.frame_loop` does). Each
session gets the same numbered clip, published frame by frame at its presentation times over
HTTP trickle, and a viewer reading the output back over HTTP; frames are matched by their
painted index. Per session: fps out (frames the viewer decoded / publishing time), p50/p95
delay (frame's bytes sent -> frame decoded by the viewer), frames dropped (sent but never
seen; the service's own `frames_dropped` beside it). For the service: RSS once it is up, after
the sessions started and at the end, and its CPU cores (CPU seconds / wall seconds).

Full frame rate: every session at >= 29 fps out with under 5 percent of its frames dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from bench.frame_loop import Service, _cpu_seconds, _view, ms, publish_paced
from protocol.clips import Clip, make_clip
from protocol.trickle import TricklePublisher

FPS = 30
FULL_RATE_FPS = 29.0
MAX_DROPPED = 0.05


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def one_session(service: Service, clip: Clip, started: asyncio.Event) -> dict[str, Any]:
    info = await service.start_session()
    sent: dict[int, float] = {}
    received: dict[int, float] = {}
    viewer = asyncio.create_task(_view(info["subscribe_url"], received))
    started.set()
    publisher = TricklePublisher(info["publish_url"])
    try:
        elapsed = await publish_paced(publisher, clip, sent)
        await asyncio.sleep(0.3)  # the last frames on their way out
        status = await service.status(info.get("session_id", ""))
    finally:
        await publisher.close()
    try:
        await asyncio.wait_for(viewer, 30)
    except TimeoutError:
        viewer.cancel()
    delays = [received[i] - sent[i] for i in received if i in sent]
    return {
        "session": info.get("session_id", "")[:8],
        "frames_sent": len(sent),
        "frames_received": len(received),
        "fps": round(len(received) / elapsed, 2),
        "dropped": len(sent) - len(received),
        "service_dropped": status.get("frames_dropped"),
        **ms(delays),
    }


async def soak(sessions: int, seconds: float, size: int) -> dict[str, Any]:
    frames = int(seconds * FPS)
    clip = await asyncio.to_thread(make_clip, frames, FPS, size, size)
    service = Service()
    service.command += ["--max-sessions", str(max(sessions, 1))]
    async with service:
        rss_start = rss_mb(service.pid)
        cpu_start = _cpu_seconds(service.pid)
        wall_start = time.monotonic()
        events = [asyncio.Event() for _ in range(sessions)]
        runs = [asyncio.create_task(one_session(service, clip, e)) for e in events]
        await asyncio.gather(*(e.wait() for e in events))
        rss_running = rss_mb(service.pid)
        results = await asyncio.gather(*runs)
        wall = time.monotonic() - wall_start
        cpu = _cpu_seconds(service.pid) - cpu_start
        rss_end = rss_mb(service.pid)
    full = all(
        r["fps"] >= FULL_RATE_FPS and r["dropped"] <= MAX_DROPPED * r["frames_sent"]
        for r in results
    )
    return {
        "sessions": sessions,
        "seconds": seconds,
        "size": size,
        "per_session": results,
        "rss_mb": {
            "start": round(rss_start, 1),
            "running": round(rss_running, 1),
            "end": round(rss_end, 1),
        },
        "cpu_cores": round(cpu / wall, 2),
        "full_rate": full,
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['sessions']} noop sessions x {report['seconds']:g} s at {FPS} fps, "
        f"{report['size']}x{report['size']}"
    )
    print(f"{'session':10s} {'fps':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'dropped':>8s} {'svc':>5s}")
    for r in report["per_session"]:
        print(
            f"{r['session']:10s} {r['fps']:6.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
            f"{r['dropped']:8d} {r['service_dropped']!s:>5s}"
        )
    rss = report["rss_mb"]
    print(
        f"service RSS MB: start {rss['start']} running {rss['running']} end {rss['end']}; "
        f"CPU cores {report['cpu_cores']}; full frame rate: {report['full_rate']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2, help="concurrent sessions")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each publishes")
    parser.add_argument("--size", type=int, default=256, help="frame width and height")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0 or args.size < 16 or args.size % 2:
        parser.error("--sessions >= 1, --seconds > 0, --size even and >= 16")
    report = asyncio.run(soak(args.sessions, args.seconds, args.size))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
