"""What the worker-process boundary costs per frame, against today's in-process worker.

    python -m bench.process_boundary [--size 512] [--rounds 20] [--calls 50] [--json]
        [--sessions-only | --no-sessions] [--session-rounds 2] [--session-frames 150]

A `noop` operation (the frame back, unchanged) is called one frame at a time, as a frame loop
does, two ways in the same run, in alternating rounds of `--calls` calls so that both see the
same load:

1. in-process: `loop.run_in_executor(InferenceWorker, noop, frame)`, today's path (the frame
   passed by reference, the result handed back by reference);
2. process: `ProcessWorker.call("runtime.worker_ops:noop", frame=frame)`: the frame copied
   into a shared-memory slot, a message to the child, the child copying its result into a
   reply slot, a message back, the result copied out for the caller.

Printed: p50/p95 per call of each path and what the process boundary adds (goal: at most
0.5 ms at p50 for 512x512 RGB), with the load average; and for scale, one copy of the frame.

Then end to end, sessions: a `noop` and a `cartoon` LiveSession over in-process trickle
channels (the real decoder, frame loop and encoder), a `--size` clip published at 30 fps in
real time, each pipeline twice per round: in this process (`ThreadCalls`, today's default) and
in a worker process (`ProcessCalls`, `--worker-process`), alternating in `--session-rounds`
rounds so both see the same load. Per case: the session's own delay per frame (input bytes
arrived -> output written) p50/p95, the inference stage p50 (the pipeline call, with the
boundary when in a worker), fps out, dropped frames.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

import numpy as np

from runtime.worker import InferenceWorker
from runtime.worker_ops import noop
from runtime.worker_process import ProcessWorker, ProcessWorkerConfig


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def measure(size: int, rounds: int, calls: int) -> dict[str, float]:
    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    loop = asyncio.get_running_loop()
    threaded = InferenceWorker("bench")
    process = ProcessWorker(ProcessWorkerConfig(name="bench", slot_bytes=frame.nbytes))
    await process.start()
    inside: list[float] = []
    across: list[float] = []
    try:
        for _ in range(5):  # warm both paths
            await loop.run_in_executor(threaded, noop, frame)
            await process.call("runtime.worker_ops:noop", frame=frame)
        for _ in range(rounds):
            for _ in range(calls):
                start = time.perf_counter()
                await loop.run_in_executor(threaded, noop, frame)
                inside.append(time.perf_counter() - start)
            for _ in range(calls):
                start = time.perf_counter()
                result = await process.call("runtime.worker_ops:noop", frame=frame)
                across.append(time.perf_counter() - start)
        assert np.array_equal(result, frame)
    finally:
        await process.close()
        threaded.shutdown()
    copy = np.empty_like(frame)
    copies = []
    for _ in range(200):
        start = time.perf_counter()
        np.copyto(copy, frame)
        copies.append(time.perf_counter() - start)
    ms = 1000.0
    return {
        "inside_p50_ms": pct(inside, 0.5) * ms,
        "inside_p95_ms": pct(inside, 0.95) * ms,
        "process_p50_ms": pct(across, 0.5) * ms,
        "process_p95_ms": pct(across, 0.95) * ms,
        "added_p50_ms": (pct(across, 0.5) - pct(inside, 0.5)) * ms,
        "added_p95_ms": (pct(across, 0.95) - pct(inside, 0.95)) * ms,
        "frame_copy_ms": statistics.median(copies) * ms,
        "calls": float(len(across)),
    }


async def session_run(
    pipeline_name: str, worker: bool, frames: int, size: int, device: object
) -> dict[str, float]:
    """One session over in-process trickle channels, fed `frames` in real time."""
    from live.pipelines.effects import CartoonPipeline
    from live.pipelines.passthrough import NoopPipeline
    from live.process_calls import ProcessCalls
    from live.session import LiveSession, SessionConfig
    from live.trickle_io import TrickleSink, TrickleSource
    from protocol.clips import make_clip
    from protocol.media import CLOCK
    from protocol.trickle import LocalPublisher, LocalSubscriber, TrickleServer

    cls = {"noop": NoopPipeline, "cartoon": CartoonPipeline}[pipeline_name]
    clip = make_clip(frames, width=size, height=size)
    server = TrickleServer()
    for name in ("in", "out"):
        server.create_channel(name)
    config = SessionConfig(status_interval_s=3600)
    if worker:
        config.calls = lambda c, log: ProcessCalls(c, device, log)  # type: ignore[arg-type]
    session = LiveSession(
        "bench",
        cls,
        cls.parse_params({}),
        TrickleSource(LocalSubscriber(server, "in")),
        [TrickleSink(LocalPublisher(server, "out"))],
        config,
    )
    task = session.start()
    publisher = LocalPublisher(server, "in")
    await asyncio.wait_for(session.wait_ready(), 60)
    start = time.monotonic()
    index = 0
    delays: list[float] = []
    seen = 0
    stats = session.stats
    for segment in clip.segments:
        async with publisher.segment() as writer:
            for data in segment:
                due = start + (clip.pts[index] - clip.pts[0]) / CLOCK
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await writer.write(data)
                index += 1
                if stats.frames_out > seen and stats.latencies:
                    delays.append(stats.latencies[-1])
                    seen = stats.frames_out
    for _ in range(2000):  # the last frames out before the input ends
        if stats.frames_out + stats.frames_dropped >= stats.frames_in:
            break
        await asyncio.sleep(0.001)
    elapsed = time.monotonic() - start
    await publisher.close()
    await asyncio.wait_for(task, 30)
    inference = sorted(stats.stages["inference"])
    return {
        "delays": delays,  # type: ignore[dict-item]
        "inference": inference,  # type: ignore[dict-item]
        "fps": stats.frames_out / elapsed,
        "dropped": float(stats.frames_dropped),
    }


async def sessions(rounds: int, frames: int, size: int) -> dict[str, dict[str, float]]:
    from runtime.runtime import Runtime, RuntimeConfig

    runtime = Runtime(RuntimeConfig(device="cpu", worker_process=True))
    device = runtime.device()
    await device.process_worker()
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for _ in range(rounds):
            for name in ("noop", "cartoon"):
                for worker in (False, True):
                    key = f"{name} {'worker process' if worker else 'in process'}"
                    runs.setdefault(key, []).append(
                        await session_run(name, worker, frames, size, device)
                    )
    finally:
        await runtime.close()
    figures = {}
    for key, done in runs.items():
        delays = [d for run in done for d in run["delays"]]  # type: ignore[attr-defined]
        inference = [d for run in done for d in run["inference"]]  # type: ignore[attr-defined]
        figures[key] = {
            "delay_p50_ms": pct(delays, 0.5) * 1000,
            "delay_p95_ms": pct(delays, 0.95) * 1000,
            "inference_p50_ms": pct(inference, 0.5) * 1000,
            "fps": statistics.mean(run["fps"] for run in done),
            "dropped": sum(run["dropped"] for run in done),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sessions-only", action="store_true", help="only the sessions part")
    which.add_argument("--no-sessions", action="store_true", help="only the boundary part")
    parser.add_argument("--session-rounds", type=int, default=2)
    parser.add_argument("--session-frames", type=int, default=150)
    args = parser.parse_args()
    if not args.sessions_only:
        boundary(args)
    if not args.no_sessions:
        load_before = os.getloadavg()
        figures = asyncio.run(sessions(args.session_rounds, args.session_frames, args.size))
        load_after = os.getloadavg()
        if args.json:
            print(json.dumps({"sessions": figures, "load1": [load_before[0], load_after[0]]}))
            return
        print(
            f"# sessions end to end, {args.size}x{args.size} at 30 fps, "
            f"{args.session_rounds} x {args.session_frames} frames per case, interleaved, "
            f"load {load_before[0]:.2f} -> {load_after[0]:.2f}"
        )
        for key, f in figures.items():
            print(
                f"{key:24} delay p50 {f['delay_p50_ms']:6.1f} ms  p95 {f['delay_p95_ms']:6.1f} ms"
                f"  inference p50 {f['inference_p50_ms']:6.2f} ms  fps {f['fps']:5.1f}"
                f"  dropped {int(f['dropped'])}"
            )


def boundary(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()
    figures = asyncio.run(measure(args.size, args.rounds, args.calls))
    load_after = os.getloadavg()
    figures["load1_before"], figures["load1_after"] = load_before[0], load_after[0]
    if args.json:
        print(json.dumps(figures))
        return
    print(
        f"# process boundary, {args.size}x{args.size} RGB noop, {int(figures['calls'])} calls "
        f"each way, {os.cpu_count()} CPUs, load {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    for label, key in (("in-process worker", "inside"), ("worker process", "process")):
        print(
            f"{label:18} p50 {figures[key + '_p50_ms']:6.3f} ms  "
            f"p95 {figures[key + '_p95_ms']:6.3f} ms"
        )
    print(
        f"{'added':18} p50 {figures['added_p50_ms']:6.3f} ms  "
        f"p95 {figures['added_p95_ms']:6.3f} ms  (goal: p50 <= 0.5 ms)"
    )
    print(f"{'one frame copy':18} p50 {figures['frame_copy_ms']:6.3f} ms")


if __name__ == "__main__":
    main()
