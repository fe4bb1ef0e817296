"""Placement benchmark: two live sessions of a device-bound pipeline on two workers
(`--devices cpu,cpu`) against the same two on one worker (`--devices cpu`), alternating in one
run.

    python -m bench.placement [--rounds 2] [--seconds 8] [--size 128] [--work-ms 40]
        [--wait] [--json]

The service runs in this process (`create_app`, started as `serve` starts it, no HTTP: the
frames go in through its own trickle channels, so that the figures are the workers', not the
HTTP stack's). Its only pipeline, `work`, runs on its device's inference worker (`uses_device`)
and costs about `--work-ms` of real CPU per frame: a stack of convolutions in torch with one
intra-op thread, which releases the GIL as a GPU kernel would, so two workers can run at once
on two cores. With `--wait` a frame instead waits `--work-ms` without using the CPU, as a worker
thread waits for its GPU's kernels: the placement alone, without the machine's load. Each
session is fed the same clip at 30 fps, faster than one worker sustains.

Printed per phase: each session's fps out over the window (after a warm-up) and the device it
was placed on, the sum, and per round the ratio two workers / one worker; the machine's load
average beside each, since other work on the machine weighs on both (the ratio is at most 2,
and only with two idle cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import numpy as np

from live.pipelines.base import LivePipeline
from protocol.api import LiveVideoToVideoParams
from protocol.clips import Clip, make_clip
from protocol.media import CLOCK

WARMUP_S = 2.0
FPS = 30


class WorkPipeline(LivePipeline):
    """A model's cost without its weights: `convs` 3x3 convolutions over the frame."""

    name = "work"
    uses_device = True
    convs = 8
    wait_s = 0.0
    """When set, a frame waits this long instead of computing (`--wait`)."""

    def load(self) -> None:
        import torch

        self._torch = torch
        generator = torch.Generator().manual_seed(0)
        self._weight = torch.randn(16, 16, 3, 3, generator=generator) * 0.05
        self._lift = torch.randn(16, 3, 1, 1, generator=generator) * 0.3

    def process(self, image: np.ndarray) -> np.ndarray:
        if self.wait_s:
            time.sleep(self.wait_s)  # a GPU's kernel time: the worker waits, the CPU is free
            return image
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            h = torch.nn.functional.conv2d(x, self._lift)
            for _ in range(self.convs):
                h = torch.tanh(torch.nn.functional.conv2d(h, self._weight, padding=1))
        return image


def calibrate(size: int, work_ms: float) -> float:
    """Set `WorkPipeline.convs` so that a frame costs about `work_ms` here, now; the measured
    ms per frame."""
    pipeline = WorkPipeline(WorkPipeline.parse_params({}))
    pipeline.load()
    image = np.zeros((size, size, 3), np.uint8)
    WorkPipeline.convs = 4
    for _ in range(3):
        pipeline.process(image)
        started = time.perf_counter()
        for _ in range(5):
            pipeline.process(image)
        per_frame = (time.perf_counter() - started) / 5 * 1000
        WorkPipeline.convs = max(1, round(WorkPipeline.convs * work_ms / per_frame))
    started = time.perf_counter()
    for _ in range(10):
        pipeline.process(image)
    return (time.perf_counter() - started) / 10 * 1000


async def feed(publisher: Any, clip: Clip, stop: asyncio.Event) -> None:
    """Publish `clip` at its presentation times, over and over until `stop`."""
    start = time.monotonic()
    offset = 0.0
    while not stop.is_set():
        index = 0
        for frames in clip.segments:
            async with publisher.segment() as writer:
                for data in frames:
                    due = start + offset + (clip.pts[index] - clip.pts[0]) / CLOCK
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    await writer.write(data)
                    index += 1
        offset += len(clip.pts) / FPS
        if stop.is_set():
            break


async def phase(devices: str, clip: Clip, seconds: float) -> dict[str, Any]:
    """Two sessions of `work` on a service with `devices`; their fps over the window."""
    from aiohttp import web

    from live.app import create_app
    from live.keys import SESSIONS, TRICKLE
    from live.settings import Settings
    from protocol.trickle import LocalPublisher

    settings = Settings(devices=devices, status_interval_s=3600, log_level="WARNING")
    app = create_app(settings, {WorkPipeline.name: WorkPipeline})
    runner = web.AppRunner(app)
    await runner.setup()
    stop = asyncio.Event()
    feeders: list[asyncio.Task[None]] = []
    try:
        manager = app[SESSIONS]
        sessions = []
        for _ in range(2):
            started = await manager.start(
                LiveVideoToVideoParams(model_id=WorkPipeline.name), "http://127.0.0.1"
            )
            session = manager.sessions[started.session_id]
            sessions.append(session)
            publisher = LocalPublisher(app[TRICKLE], session.channels["input"])
            feeders.append(asyncio.create_task(feed(publisher, clip, stop)))
        placed = [manager.admission.device_of(s.id) for s in sessions]
        await asyncio.sleep(WARMUP_S)  # a bench's window, not a test's wait
        before = [s.stats.frames_out for s in sessions]
        load_before = os.getloadavg()[0]
        started_at = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - started_at
        after = [s.stats.frames_out for s in sessions]
        fps = [(b - a) / elapsed for a, b in zip(before, after, strict=True)]
        return {
            "devices": devices,
            "placed": placed,
            "fps": fps,
            "total_fps": sum(fps),
            "load_avg_1m": (load_before + os.getloadavg()[0]) / 2,
        }
    finally:
        stop.set()
        for task in feeders:
            task.cancel()
        await asyncio.gather(*feeders, return_exceptions=True)
        await runner.cleanup()


async def run(rounds: int, seconds: float, size: int) -> list[dict[str, Any]]:
    clip = make_clip(FPS * 2, width=size, height=size)
    results = []
    for round_index in range(rounds):
        one = await phase("cpu", clip, seconds)
        two = await phase("cpu,cpu", clip, seconds)
        results.append(
            {
                "round": round_index + 1,
                "one": one,
                "two": two,
                "ratio": two["total_fps"] / one["total_fps"] if one["total_fps"] else None,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--work-ms", type=float, default=40.0)
    parser.add_argument("--wait", action="store_true", help="wait instead of computing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # one core per worker: the workers, not torch, run in parallel
    if args.wait:
        WorkPipeline.wait_s = args.work_ms / 1000
        per_frame = args.work_ms
    else:
        per_frame = calibrate(args.size, args.work_ms)
    results = asyncio.run(run(args.rounds, args.seconds, args.size))
    if args.json:
        print(json.dumps({"ms_per_frame": per_frame, "rounds": results}, indent=2))
        return 0
    work = (
        "waiting, no CPU (--wait)"
        if args.wait
        else f"on one core ({WorkPipeline.convs} convolutions)"
    )
    print(
        f"work: {per_frame:.1f} ms per {args.size}x{args.size} frame {work}; "
        f"input 30 fps per session; cores: {os.cpu_count()}"
    )
    for r in results:
        for name in ("one", "two"):
            p = r[name]
            sessions = ", ".join(
                f"{fps:.1f} fps on {device}"
                for fps, device in zip(p["fps"], p["placed"], strict=True)
            )
            print(
                f"round {r['round']} --devices {p['devices']:<8} {sessions}; "
                f"total {p['total_fps']:.1f} fps (load avg {p['load_avg_1m']:.2f})"
            )
        ratio = r["ratio"]
        print(f"round {r['round']} two workers / one worker: {ratio:.2f}x" if ratio else "n/a")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
