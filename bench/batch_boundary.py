"""The batch routes' cost of the worker-process boundary: the HTTP overhead with and without it.

    python -m bench.batch_boundary [--requests 24] [--size 64] [--steps 4]

Two services run in this process on 127.0.0.1 with the same tiny SDXL-shaped text-to-image
model (built into a temp dir): one runs jobs on its own inference thread, the other
(`--worker-process`) in the device's worker process. Alternated, so that all three see the same
machine: the route's own `generate` and PNG encoding called in this process (no HTTP, no
queue: the baseline), a request to each service. Printed: p50/p95 of each, and each service's
overhead against the baseline (the in-process goal: under 5 %), and what the boundary adds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.batch import SDXL, in_process, load_run, request_arguments, summary
from live.app import create_app
from live.keys import RUNTIME
from live.settings import Settings
from runtime.tiny import build_tiny_sdxl


@asynccontextmanager
async def service(models: Path, worker_process: bool) -> AsyncIterator[tuple[web.Application, str]]:
    settings = Settings(
        models_dir=models, warm="text-to-image", device="cpu", worker_process=worker_process
    )
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            while (await (await session.get(f"{base}/health")).json())["status"] == "LOADING":
                await asyncio.sleep(0.1)
        yield app, f"{base}/text-to-image"
    finally:
        await runner.cleanup()


def overhead(name: str, latencies: list[float], baseline: float) -> str:
    median = statistics.median(latencies)
    return (
        f"{name:<22} {summary(latencies)}  overhead {(median - baseline) * 1000:6.1f} ms "
        f"({(median / baseline - 1) * 100:5.1f} %)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    request_arguments(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process and in the worker process (default 1: two "
        "processes' thread pools on a small machine's cores fight, which the service, whose "
        "own process runs no model with --worker-process, never sees)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    body: dict[str, Any] = {
        "prompt": "a lighthouse",
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        build_tiny_sdxl(models / SDXL)
        async with (
            service(models, worker_process=False) as (app, threaded),
            service(models, worker_process=True) as (remote, boundary),
            aiohttp.ClientSession() as session,
        ):
            for worker in remote[RUNTIME].process_workers():
                await worker.call("torch:set_num_threads", args.threads)
            for url in (threaded, boundary):
                await load_run(session, url, body, 2, 1)  # warm-up
            runtime = app[RUNTIME]
            raw: list[float] = []
            thread: list[float] = []
            process: list[float] = []
            with runtime.models.acquire(runtime.key("text-to-image", SDXL), lambda: None) as pipe:
                for _ in range(args.requests):
                    raw += await asyncio.to_thread(in_process, pipe, body, 1)
                    thread += (await load_run(session, threaded, body, 1, 1))[1]
                    process += (await load_run(session, boundary, body, 1, 1))[1]
    baseline = statistics.median(raw)
    print(
        f"# text-to-image, tiny SDXL, {args.size}x{args.size}, {args.steps} steps, "
        f"{args.requests} requests each, alternated, {args.threads} torch thread(s)"
    )
    print(f"{'in process (no HTTP)':<22} {summary(raw)}")
    print(overhead("HTTP, worker thread", thread, baseline))
    print(overhead("HTTP, worker process", process, baseline))
    added = statistics.median(process) - statistics.median(thread)
    print(f"the process boundary adds {added * 1000:.1f} ms per request (p50 against p50)")


if __name__ == "__main__":
    asyncio.run(main())
