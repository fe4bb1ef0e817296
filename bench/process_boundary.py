"""What the worker-process boundary costs per frame, against today's in-process worker.

    python -m bench.process_boundary [--size 512] [--rounds 20] [--calls 50] [--json]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
