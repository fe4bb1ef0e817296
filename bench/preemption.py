"""How long a live frame waits behind a batch job on the inference worker.

    python -m bench.preemption [--steps 20] [--step-ms 25] [--frames 150]

A batch job of `--steps` compute steps (NumPy matrix products sized to take about `--step-ms`
each, standing in for denoising steps) runs on the worker while a 30 fps live stream submits one
small compute item per frame. Printed: the live items' wait (submit to start) p50/p99/max, with
the job calling `yield_to_live()` between its steps and without, and the step time itself, so
the ratio "max wait / step" shows the preemption bound (goal: about 1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from runtime.worker import InferenceWorker


def calibrate(step_ms: float) -> int:
    """A matrix size whose product takes about `step_ms` here."""
    size = 64
    while True:
        a = np.random.rand(size, size).astype(np.float32)
        start = time.perf_counter()
        for _ in range(3):
            a @ a
        took = (time.perf_counter() - start) / 3 * 1000
        if took >= step_ms or size >= 4096:
            return size
        size = int(size * 1.25)


def run(
    worker: InferenceWorker, steps: int, step: float, size: int, frames: int, yielding: bool
) -> list[float]:
    matrix = np.random.rand(size, size).astype(np.float32)
    live = np.random.rand(128, 128).astype(np.float32)

    def batch_job() -> None:
        for _ in range(steps):
            matrix @ matrix
            if yielding:
                worker.yield_to_live()

    def live_item(submitted: float) -> float:
        waited = time.perf_counter() - submitted
        live @ live
        return waited

    # Enough jobs, queued back to back, to keep the device busy for the whole stream: without
    # yielding, live work gets in only between two jobs.
    jobs = [worker.submit_batch(batch_job) for _ in range(int(frames / 30 / (steps * step)) + 2)]
    waits = []
    start = time.perf_counter()
    for i in range(frames):
        time.sleep(max(0.0, start + i / 30 - time.perf_counter()))  # a 30 fps camera
        waits.append(worker.submit(live_item, time.perf_counter()))
    results = [future.result() for future in waits]
    for job in jobs:
        job.result()
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--step-ms", type=float, default=25.0)
    parser.add_argument("--frames", type=int, default=150)
    args = parser.parse_args()
    size = calibrate(args.step_ms)
    matrix = np.random.rand(size, size).astype(np.float32)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        matrix @ matrix
        timings.append(time.perf_counter() - start)
    step = statistics.median(timings)
    print(
        f"# preemption steps={args.steps} step={step * 1000:.1f} ms (matrix {size}) "
        f"frames={args.frames}"
    )
    worker = InferenceWorker("bench")
    try:
        for yielding in (False, True):
            waits = run(worker, args.steps, step, size, args.frames, yielding)
            label = "yield between steps" if yielding else "no yield (baseline)"
            print(
                f"{label:22} live wait p50 {pct(waits, 0.5) * 1000:7.1f} ms  "
                f"p99 {pct(waits, 0.99) * 1000:7.1f} ms  max {max(waits) * 1000:7.1f} ms  "
                f"max/step {max(waits) / step:5.2f}"
            )
    finally:
        worker.shutdown()


if __name__ == "__main__":
    main()
